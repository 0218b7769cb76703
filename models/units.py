"""The prunable unit: one 2-D weight matrix (out, in) inside a decoder block.

A unit is either an `nn.Linear`'s weight or a slice of a fused parameter (transformers 5 stores
the experts of Mixtral, Qwen2-MoE and OLMoE as 3-D `gate_up_proj` / `down_proj` tensors). Every
pruning mode, the statistics accumulator and SparseGPT see only units and input taps, never a
model family.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
from torch import nn

ROLES = ("q", "k", "v", "o", "gate", "up", "down", "router", "shared_gate", "skip_router", "other")
# Roles pruned by default: every linear inside decoder blocks except the MoE routing gates,
# which are tiny and decide where every token goes.
DEFAULT_PRUNED_ROLES = frozenset(ROLES) - {"router", "shared_gate", "skip_router"}



class UnsupportedModelError(ValueError):
    """The model's structure is not one the adapter understands."""


@dataclass(frozen=True, eq=False)
class PrunableUnit:
    name: str  # unique, e.g. "model.layers.3.self_attn.q_proj", "model.layers.3.mlp.experts.gate_up_proj[5].gate"
    block: int  # decoder block index
    role: str  # one of ROLES
    expert: int | None  # expert index for MoE expert weights, else None
    param: nn.Parameter  # the parameter that holds the weight
    index: tuple  # index into param.data giving the (out, in) view; () for a Linear's weight
    tap: str  # name of the input tap that sees this unit's inputs (shared by units with one input)

    @property
    def weight(self) -> torch.Tensor:
        """A view of the weight (out, in): writing into it writes into the model."""
        return self.param.data[self.index] if self.index else self.param.data

    @property
    def shape(self) -> torch.Size:
        return self.weight.shape

    @property
    def grad(self) -> torch.Tensor | None:
        """The matching view of the parameter's gradient (out, in), or None before a backward."""
        grad = self.param.grad
        return None if grad is None else (grad[self.index] if self.index else grad)


# A tap hook receives a module call and yields (tap name, input rows (tokens, in)) pairs.
TapFn = Callable[[nn.Module, tuple, dict, object], "list[tuple[str, torch.Tensor]]"]


@dataclass(frozen=True, eq=False)
class InputTap:
    """Where the inputs of one or more units can be observed: a forward hook on `module`.

    One hook may serve several taps (a fused-experts module has one input tap and one
    intermediate tap per expert); `names` lists every tap name `fn` may yield.
    """

    module: nn.Module
    block: int
    names: tuple[str, ...]
    fn: TapFn
