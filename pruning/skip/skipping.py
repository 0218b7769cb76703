"""Token-aware skipping of attention and MLP sublayers (SkipGPT), executed so the compute is saved.

A `Router` before each chosen sublayer reads the hidden state the sublayer receives and gives every
token a keep logit; `SkipSublayer` wraps the sublayer (through an `Edits` journal, so restorable)
and runs it in one of three ways:

- `train`: every token runs; the output is multiplied by a hard gate with a straight-through
  gradient — logistic (Gumbel-sigmoid) noise of scale `noise` explores early in training and is
  annealed to zero, so the last steps train the deterministic decisions inference takes;
- `multiply`: every token runs; skipped tokens' outputs are multiplied by zero — SkipGPT's released
  inference, no compute saved (kept for comparison: it must give the same perplexity as gather);
- `gather`: only kept tokens run. An MLP runs on the gathered kept tokens and its outputs are
  scattered back (zeros elsewhere). An attention still projects keys and values for every token
  — so every token stays in that layer's KV cache and later tokens attend to it exactly as in
  the multiply path (and as the routers were trained) — but the query projection, the attention
  itself and the output projection run only for kept queries (`KeptRows` on q_proj and o_proj,
  and the `prunerzero_skip` attention function, which gathers the kept queries and their mask
  rows, then calls the model's own attention implementation).

Skipping leaves the residual stream unchanged for that token. Nothing here knows a family by name:
q_proj / o_proj are found from the structure words, the attention function is looked up from the
model's configured implementation.
"""

from __future__ import annotations

import copy
import sys
from dataclasses import dataclass, field

import torch
from torch import nn

from ..interventions import Edits

EXECUTIONS = ("gather", "multiply", "train")
ATTN_IMPL = "prunerzero_skip"


class Router(nn.Module):
    """keep logit = w·x̂ + b per token, x̂ the hidden state scaled to unit RMS (float32, whatever
    the model's dtype): residual streams grow by orders of magnitude with depth, and one learning
    rate must suit every block's router."""

    prunerzero_role = "skip_router"  # models/adapter.py: not a weight of the model to prune

    def __init__(self, hidden: int, bias: float = 0.0) -> None:
        super().__init__()
        self.proj = nn.Linear(hidden, 1)
        nn.init.zeros_(self.proj.weight)
        nn.init.constant_(self.proj.bias, bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.float()
        return self.proj(x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6)).squeeze(-1)



def routed(structure, kinds) -> list:
    """The sublayers that get routers, in block order (attention before MLP)."""
    return [s for b in structure.blocks for s in b.sublayers if s.kind in kinds]


@dataclass(eq=False)
class SkipState:
    """What one wrapped sublayer decided for the current forward, shared with its q/o wrappers
    and the attention function; plus running counts of kept and seen tokens."""

    keep: torch.Tensor | None = None  # (batch, tokens) bool, only while the sublayer runs
    flat: torch.Tensor | None = None  # indices of kept tokens in the flattened (batch*tokens)
    kept: int = 0
    seen: int = 0
    all_kept: bool = False  # the current forward keeps every token (decode: often)
    none_kept: bool = False  # ... or none
    logits: list = field(default_factory=list)  # filled while `collect` is on (threshold calibration)
    collect: bool = False


def hard_concrete(logits: torch.Tensor, temperature: float, generator: torch.Generator | None,
                  noise: float = 1.0) -> torch.Tensor:
    """A {0, 1} gate with the gradient of its relaxation (Gumbel-sigmoid, straight-through).
    `noise` scales the logistic noise: 1 samples keep ~ Bernoulli(sigmoid(logit)), 0 is the
    deterministic gate logit > 0 that inference uses (with the sigmoid's gradient)."""
    u = torch.rand(logits.shape, generator=generator, device="cpu").to(logits.device).clamp_(1e-6, 1 - 1e-6)
    soft = torch.sigmoid((logits + noise * (torch.log(u) - torch.log1p(-u))) / temperature)
    return (soft > 0.5).to(soft.dtype) + soft - soft.detach()


class SkipSublayer(nn.Module):
    """A sublayer behind a router. `kind` is "attention" (returns (output, weights)) or "mlp"."""

    def __init__(self, inner: nn.Module, router: Router, kind: str, execution: str = "gather",
                 threshold: float = 0.0, cost: float = 1.0, flops: float = 1.0) -> None:
        super().__init__()
        if execution not in EXECUTIONS:
            raise ValueError(f"unknown skip execution {execution!r}: use one of {', '.join(EXECUTIONS)}")
        self.inner, self.router, self.kind = inner, router, kind
        self.execution, self.threshold = execution, float(threshold)
        self.cost = float(cost)  # what skipping one token here saves, in the budget's unit (module or FLOPs)
        self.flops = float(flops)  # ... in multiply-adds (reported whatever the budget)
        self.state = SkipState()
        self.temperature, self.noise = 1.0, 1.0
        self.generator: torch.Generator | None = None
        self.gates: list[torch.Tensor] = []  # train: the gates of this forward (the sparsity loss reads them)

    def forward(self, hidden_states: torch.Tensor, *args, **kwargs):
        logits = self.router(hidden_states)
        if self.execution == "train":
            gate = hard_concrete(logits, self.temperature, self.generator, self.noise)
            self.gates.append(gate)
            return self._scaled(self.inner(hidden_states, *args, **kwargs), gate)
        keep = logits > self.threshold
        self._count(keep, logits)
        if self.execution == "gather" and self.state.all_kept:  # nothing skipped (often so in decode)
            return self.inner(hidden_states, *args, **kwargs)
        if self.execution == "multiply":
            return self._scaled(self.inner(hidden_states, *args, **kwargs), keep.to(hidden_states.dtype))
        if self.kind == "mlp":
            return self._gathered_mlp(hidden_states, keep, args, kwargs)
        self.state.keep, self.state.flat = keep, keep.flatten().nonzero().squeeze(1)
        try:
            return self.inner(hidden_states, *args, **kwargs)  # q/o and attention see state.keep
        finally:
            self.state.keep = self.state.flat = None

    def _count(self, keep: torch.Tensor, logits: torch.Tensor) -> None:
        kept = int(keep.sum())
        self.state.kept += kept
        self.state.seen += keep.numel()
        self.state.all_kept, self.state.none_kept = kept == keep.numel(), kept == 0
        if self.state.collect:
            self.state.logits.append(logits.detach().flatten().cpu())

    def _scaled(self, out, gate: torch.Tensor):
        if isinstance(out, tuple):
            return (out[0] * gate[..., None].to(out[0].dtype), *out[1:])
        return out * gate[..., None].to(out.dtype)

    def _gathered_mlp(self, x: torch.Tensor, keep: torch.Tensor, args, kwargs) -> torch.Tensor:
        if self.state.none_kept:
            return torch.zeros_like(x)
        flat = x.reshape(-1, x.shape[-1])
        idx = keep.flatten().nonzero().squeeze(1)
        out = torch.zeros_like(flat)
        if idx.numel():
            out.index_copy_(0, idx, self.inner(flat.index_select(0, idx)[None], *args, **kwargs)[0])
        return out.view_as(x)


class KeptRows(nn.Module):
    """A Linear that computes only the rows (tokens) its sublayer keeps; zeros elsewhere."""

    def __init__(self, linear: nn.Linear, state: SkipState, attr: str = "") -> None:
        super().__init__()
        self.linear, self.state = linear, state
        self.prunerzero_wraps = (attr, "linear")  # models/adapter.py: `.linear` is the q/o projection

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        idx = self.state.flat
        if idx is None:
            return self.linear(x)
        flat = x.reshape(-1, x.shape[-1])
        out = flat.new_zeros(flat.shape[0], self.linear.out_features)
        if idx.numel():
            out.index_copy_(0, idx, self.linear(flat.index_select(0, idx)))
        return out.view(*x.shape[:-1], self.linear.out_features)


# ------------------------------------------------------------------ attention for kept queries only
def _kept_positions(keep: torch.Tensor) -> torch.Tensor:
    """(batch, n): each row's kept positions, padded with its last kept one (or 0) to the longest."""
    n = int(keep.sum(1).max())
    order = torch.sort((~keep).to(torch.int8), dim=1, stable=True).indices[:, :n]  # kept first, in order
    counts = keep.sum(1, keepdim=True)
    pad = torch.arange(n, device=keep.device)[None] >= counts
    last = order.gather(1, (counts - 1).clamp(min=0))
    return torch.where(pad, last, order)


def _mask_rows(mask: torch.Tensor | None, idx: torch.Tensor, q_len: int, kv_len: int, like: torch.Tensor,
               boolean: bool) -> torch.Tensor:
    """The attention mask's rows for the kept queries; a causal one when the model passed none."""
    if mask is not None:
        rows = mask.expand(idx.shape[0], *mask.shape[1:]) if mask.shape[0] != idx.shape[0] else mask
        return rows.gather(2, idx[:, None, :, None].expand(-1, rows.shape[1], -1, rows.shape[-1]))
    position = idx + (kv_len - q_len)  # the queries are the last q_len of kv_len positions
    allowed = torch.arange(kv_len, device=idx.device)[None, None] <= position[..., None]
    if boolean:
        return allowed[:, None]
    return torch.zeros(allowed.shape, dtype=like.dtype, device=like.device).masked_fill_(
        ~allowed, torch.finfo(like.dtype).min)[:, None]


def skip_attention(module, query, key, value, attention_mask, **kwargs):
    """The attention function of a wrapped attention: the kept queries only, by the model's own
    implementation; (batch, tokens, heads, head_dim) out, zeros for skipped queries (which the
    wrapped o_proj never reads)."""
    impl = module._pz_attention_impl
    state: SkipState = module._pz_skip_state
    keep = state.keep
    if keep is None or bool(keep.all()):
        return impl(module, query, key, value, attention_mask, **kwargs)
    b, h, t, d = query.shape
    out = query.new_zeros(b, t, h, value.shape[-1])
    if not bool(keep.any()):
        return out, None
    idx = _kept_positions(keep)
    q = query.gather(2, idx[:, None, :, None].expand(-1, h, -1, d))
    boolean = attention_mask is None or attention_mask.dtype == torch.bool
    mask = _mask_rows(attention_mask, idx, t, key.shape[2], query, boolean)
    kwargs.pop("is_causal", None)
    kept, weights = impl(module, q, key, value, mask, is_causal=False, **kwargs)
    out.scatter_(1, idx[:, :, None, None].expand(-1, -1, h, value.shape[-1]), kept)
    return out, weights


def _register_attention() -> None:
    # transformers takes seconds to import: only a kept-queries forward needs it
    from transformers import AttentionInterface

    if ATTN_IMPL not in AttentionInterface._global_mapping:
        AttentionInterface.register(ATTN_IMPL, skip_attention)


def _attention_impl(attn_module: nn.Module):
    """The function the attention would have called: its configured implementation (or eager)."""
    # transformers takes seconds to import: only a kept-queries forward needs it
    from transformers import AttentionInterface

    name = getattr(attn_module.config, "_attn_implementation", None) or "eager"
    if name == "eager":
        return getattr(sys.modules[type(attn_module).__module__], "eager_attention_forward")
    return AttentionInterface._global_mapping[name]


# ------------------------------------------------------------------ installing
def install(edits: Edits, sublayer, router: Router, execution: str, threshold: float = 0.0,
            attention=None, cost: float = 1.0, flops: float = 1.0) -> SkipSublayer:
    """Wrap one sublayer (models.structure.Sublayer) behind its router, through `edits`. For an
    attention in `gather` execution, `attention` (models.structure.Attention) names q and o."""
    wrapper = SkipSublayer(sublayer.module, router, sublayer.kind, execution, threshold, cost, flops)
    if sublayer.kind == "attention" and execution == "gather":
        if attention is None:
            raise ValueError(f"{sublayer.name}: gather execution of an attention needs its projections")
        _prepare_attention(edits, attention, wrapper.state)
    edits.set_module(sublayer.parent, sublayer.attr, wrapper)
    return wrapper


def _prepare_attention(edits: Edits, attention, state: SkipState) -> None:
    module = attention.module
    for unit in (attention.q, attention.o):
        attr = unit.name.rpartition(".")[2]
        linear = getattr(module, attr)
        if not isinstance(linear, nn.Linear):
            raise ValueError(f"{unit.name}: gather execution needs an nn.Linear, found {type(linear).__name__}")
        edits.set_module(module, attr, KeptRows(linear, state, attr))
    _register_attention()
    edits.set_attr(module, "_pz_attention_impl", _attention_impl(module))
    edits.set_attr(module, "_pz_skip_state", state)
    config = copy.copy(module.config)  # this module's own: the model's masks keep their format
    config._attn_implementation_internal = ATTN_IMPL
    edits.set_attr(module, "config", config)


def wrappers(model: nn.Module) -> list[SkipSublayer]:
    return [m for m in model.modules() if isinstance(m, SkipSublayer)]


def skip_counts(model: nn.Module, reset: bool = False) -> dict[str, float]:
    """Fractions of tokens skipped since the last reset: overall, per kind, and weighted by each
    sublayer's multiply-adds (`flops_skip_ratio`: the share of the routed compute not done)."""
    out, totals, cost = {}, {}, [0.0, 0.0]
    for w in wrappers(model):
        k = totals.setdefault(w.kind, [0, 0])
        k[0] += w.state.seen - w.state.kept
        k[1] += w.state.seen
        cost[0] += w.flops * (w.state.seen - w.state.kept)
        cost[1] += w.flops * w.state.seen
        if reset:
            w.state.kept = w.state.seen = 0
    skipped, seen = sum(v[0] for v in totals.values()), sum(v[1] for v in totals.values())
    out["skip_ratio"] = skipped / seen if seen else 0.0
    out["flops_skip_ratio"] = cost[0] / cost[1] if cost[1] else 0.0
    for kind, (s, n) in totals.items():
        out[f"{kind}_skip_ratio"] = s / n if n else 0.0
    return out


# ------------------------------------------------------------------ one keep threshold for a budget
def budget_share(wrapped: list[SkipSublayer]) -> float:
    """The share of the budget (each sublayer's token weighed by its cost) skipped since the counts
    were last reset."""
    seen = sum(w.cost * w.state.seen for w in wrapped)
    return sum(w.cost * (w.state.seen - w.state.kept) for w in wrapped) / seen if seen else 0.0


def weighted_quantile(values: list[torch.Tensor], weights: list[float], q: float) -> float:
    """The threshold t whose skipped pairs (value <= t) carry the share of the total weight
    nearest to `q` (each tensor's entries weigh its weight). Cuts fall only between distinct
    values: tied logits (routers that still hold only their initial biases) are skipped or kept
    together, never all skipped because the quantile landed inside a tie."""
    v = torch.cat([t.double().flatten() for t in values])
    w = torch.cat([torch.full((t.numel(),), float(c), dtype=torch.float64) for t, c in zip(values, weights)])
    order = torch.argsort(v, stable=True)
    v, cum = v[order], torch.cumsum(w[order], 0)
    last = torch.ones_like(v, dtype=torch.bool)
    last[:-1] = v[1:] > v[:-1]  # the last of each run of equal values: a possible cut
    cuts, shares = v[last], cum[last] / cum[-1]
    j = int(torch.argmin((shares - q).abs()))
    return float(v[0]) - 1.0 if q < abs(float(shares[j]) - q) else float(cuts[j])


@torch.no_grad()
def calibrate_threshold(model: nn.Module, wrapped: list[SkipSublayer], ids: torch.Tensor, ratio: float,
                        rounds: int = 3) -> float:
    """One keep threshold on the router logits of every wrapped sublayer, set so that the tokens
    `ids` skip a share `ratio` of the (sublayer, token) pairs, each weighed by its sublayer's
    cost. Downstream logits depend on upstream decisions, so it is refit a few times (a fixed
    point); the counts then hold the skip rate reached on `ids`."""
    threshold = 0.0
    for _ in range(rounds):
        for w in wrapped:
            w.threshold, w.state.collect, w.state.logits = threshold, True, []
        skip_counts(model, reset=True)
        model(ids, use_cache=False, logits_to_keep=1)
        threshold = weighted_quantile([torch.cat(w.state.logits) for w in wrapped], [w.cost for w in wrapped], ratio)
    for w in wrapped:
        w.threshold, w.state.collect, w.state.logits = threshold, False, []
    skip_counts(model, reset=True)
    model(ids, use_cache=False, logits_to_keep=1)
    return threshold
