"""One block's attention probabilities as the model computes them, and their distance to the dense
model's — the objective of the attention mode (pruning/attention/mode.py).

Why not call the attention module: the objective must be differentiable in the q/k masks and
memory-bounded on long sequences, while the module materialises (or fuses away) the whole
T x T matrix. So the queries and keys are rebuilt here with the module's own pieces — its q/k
projections (with their biases), its q/k norms where the family has them (Qwen3, Gemma3), its
family's `apply_rotary_pos_emb` on the position embeddings the block received, its `scaling`,
its sliding window — key heads expanded to the query heads that read them (grouped-query
attention), and the probabilities built a chunk of queries at a time under the causal mask.
A test checks them against the model's own eager attention weights.

Objectives (each normalised so that 0 is the dense model and the scale does not depend on the
number of tokens):
- "frobenius": sum ||P - P_dense||_F^2 over heads and windows / sum ||P_dense||_F^2 (the paper's);
- "kl": mean over query rows of KL(P_dense || P);
- "output": sum ||P V - P_dense V||^2 / sum ||P_dense V||^2 with the dense values V (the effect of
  the q/k masks on the attention output, apart from v's own pruning).
"""

from __future__ import annotations

import sys
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from prunerzero.models.adapter import UnsupportedModelError

OBJECTIVES = ("frobenius", "kl", "output")


@dataclass
class AttentionInputs:
    """What one block's attention received on the calibration windows the optimiser reads."""

    hidden: torch.Tensor  # (windows, T, hidden): the attention module's input (after the block's norm)
    cos: torch.Tensor  # rotary tables as the block received them, (1 or windows, T, d)
    sin: torch.Tensor


class BlockAttention:
    """Queries, keys and probabilities of one block's attention (a `structure.Attention`)."""

    def __init__(self, attn, inputs: AttentionInputs, chunk: int = 128) -> None:
        self.attn, self.inputs, self.chunk = attn, inputs, max(1, int(chunk))
        module = attn.module
        self.q_lin = module.get_submodule(attn.q.name[len(attn.name) + 1:])
        self.k_lin = module.get_submodule(attn.k.name[len(attn.name) + 1:])
        self.v_lin = module.get_submodule(attn.v.name[len(attn.name) + 1:])
        self.q_norm, self.k_norm = getattr(module, "q_norm", None), getattr(module, "k_norm", None)
        self.rope = getattr(sys.modules[type(module).__module__], "apply_rotary_pos_emb", None)
        if self.rope is None:
            raise UnsupportedModelError(f"{attn.name}: its family's modelling code has no apply_rotary_pos_emb")
        self.scaling = float(getattr(module, "scaling", attn.head_dim ** -0.5))
        config = getattr(module, "config", None)
        self.softcap = getattr(config, "attn_logit_softcapping", None)
        self.window = getattr(module, "sliding_window", None)

    # ------------------------------------------------------------ queries, keys, values
    def _heads(self, x: torch.Tensor, norm) -> torch.Tensor:
        w, t = x.shape[:2]
        x = x.view(w, t, -1, self.attn.head_dim)
        return (norm(x) if norm is not None else x).transpose(1, 2)

    def qk(self, wq: torch.Tensor, wk: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Rotated queries (W, H, T, d) and keys expanded to the query heads (W, H, T, d)."""
        x = self.inputs.hidden
        q = self._heads(F.linear(x, wq.float(), _bias(self.q_lin)), self.q_norm)
        k = self._heads(F.linear(x, wk.float(), _bias(self.k_lin)), self.k_norm)
        q, k = self.rope(q, k, self.inputs.cos, self.inputs.sin)
        return q.float(), k.float().repeat_interleave(self.attn.group_size, dim=1)

    def values(self) -> torch.Tensor:
        x = self.inputs.hidden
        v = self._heads(F.linear(x, self.v_lin.weight.float(), _bias(self.v_lin)), None)
        return v.float().repeat_interleave(self.attn.group_size, dim=1)

    # ------------------------------------------------------------ probabilities, a chunk at a time
    def chunks(self):
        t = self.inputs.hidden.shape[1]
        return [(a, min(a + self.chunk, t)) for a in range(0, t, self.chunk)]

    def allowed(self, a: int, b: int, device) -> torch.Tensor:
        """(b-a, b): query a+i may read key j (causal, within the sliding window if any)."""
        i = torch.arange(a, b, device=device)[:, None]
        j = torch.arange(0, b, device=device)[None, :]
        ok = j <= i
        if self.window:
            ok &= (i - j) < self.window
        return ok

    def logits(self, q: torch.Tensor, k: torch.Tensor, a: int, b: int, allowed: torch.Tensor) -> torch.Tensor:
        s = q[:, :, a:b] @ k[:, :, :b].transpose(-1, -2) * self.scaling
        if self.softcap:
            s = torch.tanh(s / self.softcap) * self.softcap
        return s.masked_fill(~allowed, float("-inf"))


def _bias(linear) -> torch.Tensor | None:
    return None if linear.bias is None else linear.bias.float()


class Objective:
    """The distance of a masked q/k pair's attention to the dense one, on fixed inputs; the dense
    queries, keys and values are computed once (O(T d) memory, never T x T)."""

    def __init__(self, block: BlockAttention, wq: torch.Tensor, wk: torch.Tensor, kind: str = "frobenius") -> None:
        if kind not in OBJECTIVES:
            raise ValueError(f"unknown attention objective {kind!r}: use one of {', '.join(OBJECTIVES)}")
        self.block, self.kind = block, kind
        with torch.no_grad():
            self.q, self.k = block.qk(wq, wk)
            self.v = block.values() if kind == "output" else None
            self.norm = self._normaliser()

    def _normaliser(self) -> float:
        w, h, t, _ = self.q.shape
        if self.kind == "kl":
            return float(w * h * t)
        total = 0.0
        for a, b in self.block.chunks():
            p = self._dense(a, b)
            total += float((p @ self.v[:, :, :b]).square().sum() if self.kind == "output" else p.square().sum())
        return max(total, 1e-30)

    def _dense(self, a: int, b: int, allowed: torch.Tensor | None = None) -> torch.Tensor:
        allowed = self.block.allowed(a, b, self.q.device) if allowed is None else allowed
        return torch.softmax(self.block.logits(self.q, self.k, a, b, allowed), dim=-1)

    def chunk_loss(self, q: torch.Tensor, k: torch.Tensor, a: int, b: int) -> torch.Tensor:
        allowed = self.block.allowed(a, b, q.device)
        s = self.block.logits(q, k, a, b, allowed)
        with torch.no_grad():
            dense = self._dense(a, b, allowed)
        if self.kind == "kl":
            log_p = torch.log_softmax(s, dim=-1)
            log_d = torch.log(dense.clamp_min(1e-30))
            return (dense * (log_d - log_p)).masked_fill(~allowed, 0.0).sum()
        p = torch.softmax(s, dim=-1)
        if self.kind == "output":
            v = self.v[:, :, :b]
            return ((p - dense) @ v).square().sum()
        return (p - dense).square().sum()

    @torch.no_grad()
    def error(self, wq: torch.Tensor, wk: torch.Tensor) -> float:
        """The objective of masked weights (no gradient)."""
        q, k = self.block.qk(wq, wk)
        return sum(float(self.chunk_loss(q, k, a, b)) for a, b in self.block.chunks()) / self.norm

    def backward(self, wq: torch.Tensor, wk: torch.Tensor) -> float:
        """The objective of `wq`, `wk` (tensors in an autograd graph), its gradient accumulated into
        their leaves. Memory-bounded: the graph of one chunk of queries at a time is alive — the
        chunk losses are differentiated into detached copies of Q and K, which are then
        differentiated once through the projections."""
        q, k = self.block.qk(wq, wk)
        q_, k_ = q.detach().requires_grad_(), k.detach().requires_grad_()
        total = 0.0
        for a, b in self.block.chunks():
            loss = self.chunk_loss(q_, k_, a, b) / self.norm
            loss.backward()
            total += float(loss.detach())
        torch.autograd.backward([q, k], [q_.grad, k_.grad])
        return total
