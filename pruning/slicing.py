"""Physical interventions by structure, all through an `Edits` journal (so all restorable):
MLP channels and attention heads sliced out of the weights (a smaller, faster model, not a
masked one), experts removed or merged with their router rows, top-k changed.

Each function works on the structure words of models/structure.py, for every family the adapter
supports; none knows a family by name.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from prunerzero.models.structure import Attention, Experts, Mlp, expert_count_attrs

from .interventions import Edits


def _linear(parent: nn.Module, unit) -> nn.Linear:
    return getattr(parent, unit.name.rpartition(".")[2])


def _index(keep, device) -> torch.Tensor:
    return torch.as_tensor(list(keep), dtype=torch.long, device=device)


@torch.no_grad()
def slice_linear(edits: Edits, linear: nn.Linear, rows: torch.Tensor | None = None,
                 cols: torch.Tensor | None = None) -> None:
    """Keep only `rows` (outputs) and `cols` (inputs) of a Linear; its bias follows its rows."""
    w = linear.weight
    if rows is not None:
        w = w.index_select(0, rows)
    if cols is not None:
        w = w.index_select(1, cols)
    edits.set_param(linear, "weight", w.contiguous())
    if linear.bias is not None and rows is not None:
        edits.set_param(linear, "bias", linear.bias.index_select(0, rows).contiguous())
    edits.set_attr(linear, "out_features", w.shape[0])
    edits.set_attr(linear, "in_features", w.shape[1])


def slice_mlp(edits: Edits, mlp: Mlp, keep: Sequence[int]) -> None:
    """Keep the intermediate channels `keep` of a gated MLP: gate and up rows, down columns."""
    keep = sorted(int(k) for k in keep)
    if keep and (keep[0] < 0 or keep[-1] >= mlp.width):  # checked on ints: the weights may be on the meta device
        raise IndexError(f"{mlp.name}: channels out of range [0, {mlp.width})")
    idx = _index(keep, mlp.gate.weight.device)
    slice_linear(edits, _linear(mlp.module, mlp.gate), rows=idx)
    slice_linear(edits, _linear(mlp.module, mlp.up), rows=idx)
    slice_linear(edits, _linear(mlp.module, mlp.down), cols=idx)
    if hasattr(mlp.module, "intermediate_size"):
        edits.set_attr(mlp.module, "intermediate_size", len(idx))


def head_rows(attn: Attention, heads: Sequence[int]) -> list[int]:
    d = attn.head_dim
    return [r for h in heads for r in range(h * d, (h + 1) * d)]


def slice_attention(edits: Edits, attn: Attention, heads: Sequence[Sequence[int]]) -> None:
    """Keep, for each key/value head kv, the query heads `heads[kv]` (global query-head indices
    of that KV head's group); a KV head with none is removed. Every kept KV head must keep the
    same number of query heads: the grouped-query forward repeats each key/value head equally."""
    if len(heads) != attn.n_kv_heads:
        raise ValueError(f"{attn.name}: give the kept query heads of each of its {attn.n_kv_heads} KV heads")
    kept_kv = [kv for kv, hs in enumerate(heads) if len(hs)]
    sizes = {len(heads[kv]) for kv in kept_kv}
    if len(sizes) > 1:
        raise ValueError(f"{attn.name}: kept KV heads keep {sorted(sizes)} query heads; they must keep equally many")
    for kv in kept_kv:
        bad = [h for h in heads[kv] if attn.kv_of(h) != kv]
        if bad:
            raise ValueError(f"{attn.name}: query heads {bad} do not read KV head {kv}")
    q_heads = [h for kv in kept_kv for h in sorted(heads[kv])]
    dev = attn.q.weight.device
    q_rows, kv_rows = _index(head_rows(attn, q_heads), dev), _index(head_rows(attn, kept_kv), dev)
    module = attn.module
    slice_linear(edits, _linear(module, attn.q), rows=q_rows)
    slice_linear(edits, _linear(module, attn.k), rows=kv_rows)
    slice_linear(edits, _linear(module, attn.v), rows=kv_rows)
    slice_linear(edits, _linear(module, attn.o), cols=q_rows)
    _slice_projection_norms(edits, attn, q_rows, kv_rows)
    if kept_kv:
        edits.set_attr(module, "num_key_value_groups", sizes.pop())


def _slice_projection_norms(edits: Edits, attn: Attention, q_rows: torch.Tensor, kv_rows: torch.Tensor) -> None:
    """Norms over a whole projection's width (OLMoE's q_norm, k_norm) lose the removed heads'
    features too. Their statistic then spans fewer features, so for such families head slicing
    is not exactly the masked model. Per-head norms (Gemma3, width head_dim) are left alone."""
    for name, rows, width in (("q_norm", q_rows, attn.q.shape[0]), ("k_norm", kv_rows, attn.k.shape[0])):
        norm = getattr(attn.module, name, None)
        weight = getattr(norm, "weight", None)
        if weight is not None and weight.dim() == 1 and weight.shape[0] == width != attn.head_dim:
            edits.set_param(norm, "weight", weight.index_select(0, rows).contiguous())


@torch.no_grad()
def remove_experts(edits: Edits, experts: Experts, keep: Sequence[int],
                   merge: torch.Tensor | None = None, router_merge: torch.Tensor | None = None) -> None:
    """Keep the experts `keep` (router rows removed with the others, so the softmax renormalises
    over the kept ones). `merge` (len(keep), E): kept expert i becomes Σ_j merge[i, j] · expert j
    (rows usually sum to 1; the one-hot rows of `keep` leave the experts as they are).
    `router_merge` (len(keep), E) likewise combines router rows (default: the kept rows)."""
    n = experts.n_experts
    keep = list(keep)
    if not keep or len(set(keep)) != len(keep) or min(keep) < 0 or max(keep) >= n:
        raise ValueError(f"{experts.name}: keep {keep} must be distinct experts in [0, {n})")
    module, router = experts.module, experts.router_module
    gate_up, down, rw = module.gate_up_proj, module.down_proj, router.weight
    idx = _index(keep, gate_up.device)
    if merge is None:
        new_gate_up, new_down = gate_up.index_select(0, idx), down.index_select(0, idx)
    else:
        _check_merge(merge, len(keep), n, "merge", experts.name)
        m = merge.to(gate_up.device, torch.float32)
        new_gate_up = torch.einsum("ke,eoi->koi", m, gate_up.float()).to(gate_up.dtype)
        new_down = torch.einsum("ke,eoi->koi", m, down.float()).to(down.dtype)
    if router_merge is None:
        new_router = rw.index_select(0, idx)
    else:
        _check_merge(router_merge, len(keep), n, "router_merge", experts.name)
        new_router = (router_merge.to(rw.device, torch.float32) @ rw.float()).to(rw.dtype)
    edits.set_param(module, "gate_up_proj", new_gate_up.contiguous())
    edits.set_param(module, "down_proj", new_down.contiguous())
    edits.set_param(router, "weight", new_router.contiguous())
    if getattr(router, "bias", None) is not None:
        edits.set_param(router, "bias", router.bias.index_select(0, idx))
    for mod in (module, router, experts.moe):
        for attr in expert_count_attrs(mod):
            edits.set_attr(mod, attr, len(keep))
    if experts.top_k > len(keep):
        set_top_k(edits, experts, len(keep))


def set_top_k(edits: Edits, experts: Experts, k: int) -> None:
    """Route each token to `k` experts (fewer active experts: less compute per token)."""
    if not 1 <= k <= experts.module.gate_up_proj.shape[0]:
        raise ValueError(f"{experts.name}: top-k {k} must be in [1, {experts.module.gate_up_proj.shape[0]}]")
    for mod in (experts.router_module, experts.moe):
        if isinstance(getattr(mod, "top_k", None), int):
            edits.set_attr(mod, "top_k", k)


def _check_merge(m: torch.Tensor, rows: int, cols: int, what: str, name: str) -> None:
    if tuple(m.shape) != (rows, cols) or not torch.isfinite(m).all():
        raise ValueError(f"{name}: {what} must be a finite ({rows}, {cols}) matrix, got {tuple(m.shape)}")
