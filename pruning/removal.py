"""Whole sublayers and blocks removed from the forward (not multiplied by zero): the block calls a
module that returns nothing to add to the residual stream, or a removed block passes its input on.

The KV cache: a removed attention still registers its tokens in its cache layer, as a
(batch, 1, tokens, 1) tensor of zeros — one float per token instead of 2·kv_heads·head_dim — so
the cache's length (which transformers reads from layer 0 for positions and masks) stays right
whichever layers are removed, and generation works.
"""

from __future__ import annotations

import torch
from torch import nn

from .interventions import Edits


def _register_tokens(layer_idx: int | None, hidden: torch.Tensor, kwargs: dict) -> None:
    cache = kwargs.get("past_key_values", kwargs.get("past_key_value"))
    if cache is not None and layer_idx is not None:
        mark = hidden.new_zeros(hidden.shape[0], 1, hidden.shape[1], 1)
        cache.update(mark, mark, layer_idx)


class RemovedAttention(nn.Module):
    """Stands in for a block's attention: adds nothing, costs nothing but the cache mark."""

    def __init__(self, layer_idx: int | None) -> None:
        super().__init__()
        self.layer_idx = layer_idx

    def forward(self, hidden_states: torch.Tensor, *args, **kwargs):
        _register_tokens(self.layer_idx, hidden_states, kwargs)
        return torch.zeros_like(hidden_states), None


class RemovedMlp(nn.Module):
    def forward(self, hidden_states: torch.Tensor, *args, **kwargs):
        return torch.zeros_like(hidden_states)


class RemovedBlock(nn.Module):
    """Stands in for a whole decoder block: the residual stream passes through unchanged."""

    def __init__(self, layer_idx: int, attention_type: str | None = None) -> None:
        super().__init__()
        self.layer_idx = layer_idx
        if attention_type is not None:  # families with per-layer attention types read it off the block
            self.attention_type = attention_type

    def forward(self, hidden_states: torch.Tensor, *args, **kwargs):
        _register_tokens(self.layer_idx, hidden_states, kwargs)
        return hidden_states


class ReplayedBlock(RemovedBlock):
    """Stands in for a decoder block whose output is already known (from an earlier forward on
    the same tokens): returns it without computing anything, so a forward that changes only later
    blocks does not pay again for the ones before."""

    def __init__(self, layer_idx: int, output: torch.Tensor, attention_type: str | None = None) -> None:
        super().__init__(layer_idx, attention_type)
        self.output = output

    def forward(self, hidden_states: torch.Tensor, *args, **kwargs):
        _register_tokens(self.layer_idx, hidden_states, kwargs)
        return self.output


def remove_sublayer(edits: Edits, sublayer) -> None:
    """Replace a block's attention or MLP (a models.structure.Sublayer) by its removed stand-in."""
    if sublayer.kind == "attention":
        stand_in = RemovedAttention(getattr(sublayer.module, "layer_idx", sublayer.block))
    else:
        stand_in = RemovedMlp()
    edits.set_module(sublayer.parent, sublayer.attr, stand_in)


def remove_block(edits: Edits, blocks: nn.ModuleList, index: int) -> None:
    block = blocks[index]
    edits.set_module(blocks, str(index), RemovedBlock(index, getattr(block, "attention_type", None)))


def replay_prefix(edits: Edits, blocks: nn.ModuleList, index: int, outputs: list[torch.Tensor]) -> None:
    """Blocks before `index` skipped: block index-1 returns its recorded output `outputs[index-1]`,
    the ones before it pass their input on (what they return is never read)."""
    for j in range(index - 1):
        remove_block(edits, blocks, j)
    if index:
        j = index - 1
        edits.set_module(blocks, str(j), ReplayedBlock(j, outputs[j], getattr(blocks[j], "attention_type", None)))
