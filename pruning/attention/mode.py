"""The attention mode: q and k masks optimised for the softmax attention itself.

Wanda and SparseGPT keep each linear layer's *output* close (a linear reconstruction); for the
query and key projections what matters is the attention matrix after the softmax, which is not
linear in them ("Beyond Linear Approximations", Liang et al., ICLR 2025). Here, block by block,
the q and k masks start as any metric's masks (top-(1-s) of its scores per output row or per
layer, exactly the unstructured mode's) and are then moved by gradient descent on calibration
tokens so that every head's attention probabilities — the model's own RoPE, grouped-query
layout, causal mask (pruning/attention/loss.py) — stay close to the dense model's:

- the parameters are the metric's scores, standardised per comparison group (threshold at 0);
- a relaxed keep-mask sigmoid((z - t) / tau), t the group's threshold at the target sparsity,
  tau annealed geometrically (the first `soft` fraction of the steps), then straight-through:
  the forward uses the binary top-(1-s) mask, the backward the sigmoid's gradient;
- the binary mask is always the top-(1-s) of z, so its sparsity is exact; the best binary mask
  seen (the metric's own included) is kept, so the result is never worse than the metric's on
  the calibration tokens.

v, o and the MLP keep metric masks at the same sparsity (or stay dense: `others = "dense"`).
With the sequential protocol each block is calibrated on the outputs of the pruned prefix;
one-shot, on the dense model's (the masks are applied after the last block).
"""

from __future__ import annotations

import math
import statistics
import time
from contextlib import nullcontext
from dataclasses import dataclass

import torch

from prunerzero.core.protocol import check_sparsity
from prunerzero.models.adapter import UnsupportedModelError
from prunerzero.primitives.stats import ActivationAccumulator, LayerStats, x_for_units

from ..masks import GROUPS, select_mask, zero_masked
from ..recipe import ModeError, unsupported
from ..reduce import unit_scores
from ..report import PruneReport
from ..sequential import run_sequential
from .loss import OBJECTIVES, AttentionInputs, BlockAttention, Objective

OTHERS = ("metric", "dense")
MIN_TOKENS = 8  # fewer tokens per window than this cannot say much about an attention pattern
TAU_END = 0.02  # the relaxation's last temperature, and the straight-through gradient's


@dataclass(frozen=True)
class AttentionTarget:
    sparsity: float = 0.5  # fraction of q and k (and, with others = "metric", of v, o, MLP) pruned
    group: str = "row"  # comparison group of every mask: "row" (as Wanda) or "layer"
    objective: str = "frobenius"  # or "kl", "output" (pruning/attention/loss.py)
    others: str = "metric"  # v, o, MLP: metric masks at `sparsity`, or "dense"
    steps: int = 100  # gradient steps per block (0: the metric's masks, the linear baseline)
    lr: float = 0.05  # Adam's step on the standardised scores
    soft: float = 0.5  # fraction of the steps with the sigmoid relaxation; the rest straight-through
    temperature: float = 0.5  # the relaxation's first temperature (it ends at TAU_END)
    windows: int = 8  # calibration windows the optimiser reads (the first ones)
    tokens: int = 0  # tokens per window it reads (the first ones; 0 = the whole window)
    chunk: int = 128  # queries per attention chunk (memory: windows x heads x chunk x tokens)

    def __post_init__(self) -> None:
        check_sparsity(self.sparsity)
        for name, value, known in (("group", self.group, GROUPS), ("objective", self.objective, OBJECTIVES),
                                   ("others", self.others, OTHERS)):
            if value not in known:
                raise ValueError(f"unknown {name} {value!r}: use one of {', '.join(known)}")
        for name, least in (("steps", 0), ("windows", 1), ("chunk", 1)):
            if getattr(self, name) < least:
                raise ValueError(f"{name} must be >= {least}, got {getattr(self, name)}")
        if self.tokens < 0 or self.lr <= 0 or not 0 <= self.soft <= 1 or self.temperature <= 0:
            raise ValueError(f"need tokens >= 0, lr > 0, soft in [0, 1], temperature > 0; got tokens={self.tokens}, "
                             f"lr={self.lr}, soft={self.soft}, temperature={self.temperature}")

    @property
    def expected_sparsity(self) -> float:
        return self.sparsity

    def describe(self) -> str:
        tokens = f" x {self.tokens} tokens" if self.tokens else ""
        return (f"q/k {self.sparsity:g} per {self.group}, attention {self.objective} GD "
                f"({self.steps} steps on {self.windows} windows{tokens}); v/o/MLP {self.others}")


# ---------------------------------------------------------------- the optimiser
@dataclass
class QkResult:
    masks: tuple[torch.Tensor, torch.Tensor]  # (q, k), True = pruned
    init_error: float  # the metric masks' objective on the calibration tokens
    error: float  # the returned masks' (<= init_error)
    best_step: int  # -1: the metric's own masks were best
    seconds: float


def standardise(scores: torch.Tensor, sparsity: float, group: str) -> torch.Tensor:
    """Scores shifted so the group's threshold at `sparsity` is 0 and scaled by the median distance
    to it: one learning rate and temperature fit every metric's units."""
    flat = scores.float().reshape(scores.shape[0] if group == "row" else 1, -1)
    z = flat - _threshold(flat, sparsity)
    scale = z.abs().median(dim=1, keepdim=True).values.clamp_min(1e-12)
    return (z / scale).reshape(scores.shape)


def _threshold(flat: torch.Tensor, sparsity: float) -> torch.Tensor:
    """Per row of `flat`, the midpoint between the k-th and (k+1)-th lowest (k pruned)."""
    k = int(flat.shape[1] * sparsity)
    if k == 0:
        return flat.min(dim=1, keepdim=True).values - 1
    low = flat.kthvalue(k, dim=1, keepdim=True).values
    high = flat.kthvalue(k + 1, dim=1, keepdim=True).values if k < flat.shape[1] else low + 1
    return (low + high) / 2


def _soft_keep(z: torch.Tensor, sparsity: float, group: str, tau: float) -> torch.Tensor:
    flat = z.reshape(z.shape[0] if group == "row" else 1, -1)
    t = _threshold(flat.detach(), sparsity)
    return torch.sigmoid((flat - t) / tau).reshape(z.shape)


@torch.enable_grad()  # the block schedule runs without gradients
def optimise_qk(objective: Objective, wq: torch.Tensor, wk: torch.Tensor, score_q: torch.Tensor,
                score_k: torch.Tensor, target: AttentionTarget) -> QkResult:
    """Masks of q and k at `target.sparsity` (exact per group) that keep the objective low, starting
    from the metric's masks; the best binary masks seen are returned."""
    t0 = time.perf_counter()
    s, g = target.sparsity, target.group
    wq, wk = wq.detach().float(), wk.detach().float()

    def hard(zs):
        return tuple(select_mask(z.detach(), s, None, g) for z in zs)

    def error(masks):
        return objective.error(wq * ~masks[0], wk * ~masks[1])

    best = hard((score_q.float(), score_k.float()))  # exactly the metric's masks
    init_error = best_error = error(best)
    best_step = -1
    zs = [standardise(score_q, s, g).requires_grad_(), standardise(score_k, s, g).requires_grad_()]
    opt = torch.optim.Adam(zs, lr=target.lr)
    soft_steps = round(target.steps * target.soft)
    for step in range(target.steps):
        tau = _temperature(step, soft_steps, target.temperature)
        soft = [_soft_keep(z, s, g, tau) for z in zs]
        straight = step >= soft_steps
        if straight:
            masks = hard(zs)
            keeps = [(~m).float() + (p - p.detach()) for m, p in zip(masks, soft)]
        else:
            keeps = soft
        loss = objective.backward(wq * keeps[0], wk * keeps[1])
        if not straight and (step + 1 == soft_steps or step % 10 == 9):
            masks = hard(zs)
            loss = error(masks)
            straight = True
        if straight and loss < best_error:
            best, best_error, best_step = tuple(m.clone() for m in masks), loss, step
        opt.step()
        opt.zero_grad(set_to_none=True)
    last = hard(zs) if target.steps else best  # no steps: exactly the metric's masks
    last_error = error(last) if target.steps else best_error
    if last_error < best_error:
        best, best_error, best_step = last, last_error, target.steps
    if best_step >= 0:  # measured on one path, so the guarantee holds exactly: re-measure
        best_error = error(best)
        if best_error > init_error:
            best, best_error, best_step = hard((score_q.float(), score_k.float())), init_error, -1
    return QkResult(best, init_error, best_error, best_step, time.perf_counter() - t0)


def _temperature(step: int, soft_steps: int, start: float) -> float:
    if step >= soft_steps or soft_steps <= 1:
        return TAU_END
    return start * math.exp(math.log(TAU_END / start) * step / (soft_steps - 1))


# ---------------------------------------------------------------- the mode
class _Grab:
    """Forward pre-hook on an attention module: its input and rotary tables on the first
    `windows` calibration windows (the first `tokens` tokens of each)."""

    def __init__(self, windows: int, tokens: int) -> None:
        self.windows, self.tokens = windows, tokens
        self.hidden, self.cos, self.sin = [], [], []

    def __call__(self, module, args, kwargs) -> None:
        left = self.windows - sum(h.shape[0] for h in self.hidden)
        if left <= 0:
            return
        hidden = args[0] if args else kwargs["hidden_states"]
        pos = kwargs.get("position_embeddings")
        if pos is None:

            raise UnsupportedModelError(f"{type(module).__name__} received no position_embeddings")
        t = self.tokens or hidden.shape[1]
        self.hidden.append(hidden[:left, :t].detach().float())
        for store, table in zip((self.cos, self.sin), pos):
            store.append(table[:left, :t].detach().float() if table.shape[0] > 1 else table[:, :t].detach().float())

    def inputs(self) -> AttentionInputs:
        def cat(tables):  # tables shared by the batch (1, T, d) are the same for every window
            return tables[0] if tables[0].shape[0] == 1 else torch.cat(tables)
        return AttentionInputs(torch.cat(self.hidden), cat(self.cos), cat(self.sin))


def check_attention(ctx, target: AttentionTarget) -> None:
    """The model has separate q and k projections in every block, and the calibration is large
    enough for the optimiser."""
    missing = [b.name for b in ctx.structure.blocks if b.attention is None]
    if missing:
        raise ModeError(f"mode 'attention' needs separate q and k projections (q_proj, k_proj, v_proj, o_proj) in "
                        f"every block; {missing[0]} has none (a fused qkv projection?)")
    windows, length = ctx.calibration.shape
    tokens = min(target.tokens or length, length)
    if windows < target.windows or tokens < MIN_TOKENS:
        raise ModeError(
            f"mode 'attention': calibration too small — {windows} window(s) of {length} tokens, the optimiser "
            f"reads windows={target.windows} of {tokens} tokens (at least {MIN_TOKENS} each): give more "
            f"calibration windows (--calib-windows) or --set windows={min(windows, target.windows)}")


def apply_attention(ctx, candidate, target: AttentionTarget) -> PruneReport:
    """Prune `ctx`'s model in place: metric masks everywhere, then q/k masks optimised for the
    attention, block by block."""
    if not callable(candidate) or not hasattr(candidate, "needs"):
        raise unsupported("attention", candidate)
    check_attention(ctx, target)
    sequential = ctx.stats_mode == "sequential"
    dense = ctx.stats(candidate.needs)
    attentions = {a.block: a for a in ctx.structure.attentions}
    report = PruneReport(target=target, method=getattr(candidate, "name", str(candidate)))
    deferred, errors, seconds = [], [], []
    t0 = time.perf_counter()
    n_blocks = len(ctx.adapter.blocks)

    def process_block(i: int, run_block) -> None:
        attn = attentions[i]
        grab = _Grab(target.windows, target.tokens)
        acc = ActivationAccumulator() if sequential else None
        handle = attn.module.register_forward_pre_hook(grab, with_kwargs=True)
        try:
            with ctx.adapter.capture(acc, blocks=[i]) if sequential else nullcontext():
                run_block()
        finally:
            handle.remove()
        units = ctx.adapter.block_units(i)
        stats = LayerStats(X=x_for_units(units, acc), G=dense.G) if sequential else dense
        masks = {u.name: select_mask(unit_scores(candidate, u, stats), target.sparsity, None, target.group, u.name)
                 for u in units if u.role not in ("q", "k") and target.others == "metric"}
        block = BlockAttention(attn, grab.inputs(), target.chunk)
        result = optimise_qk(Objective(block, attn.q.weight, attn.k.weight, target.objective),
                             attn.q.weight, attn.k.weight, unit_scores(candidate, attn.q, stats),
                             unit_scores(candidate, attn.k, stats), target)
        masks[attn.q.name], masks[attn.k.name] = result.masks
        for u in units:
            if u.name in masks:
                report.add_mask(u.name, masks[u.name])
                (zero_masked(u.weight, masks[u.name]) if sequential else deferred.append((u, masks[u.name])))
        errors.append((result.init_error, result.error))
        seconds.append(result.seconds)
        ctx.log(f"attention: block {i + 1}/{n_blocks}: {target.objective} error {result.init_error:.4g} -> "
                f"{result.error:.4g} ({_change(result.init_error, result.error)}) in {result.seconds:.1f} s")

    windows = ctx.calibration if sequential else ctx.calibration[: target.windows]
    run_sequential(ctx.model, ctx.adapter, windows, process_block, batch_size=8)
    with torch.no_grad():
        for unit, mask in deferred:
            zero_masked(unit.weight, mask)
    report.add_units(ctx.units)
    report.seconds = time.perf_counter() - t0
    report.extra.update({
        "attention_error_init": statistics.median(e for e, _ in errors),
        "attention_error": statistics.median(e for _, e in errors),
        "seconds_per_layer": statistics.median(seconds),
    })
    return report


def _change(before: float, after: float) -> str:
    return f"{(after - before) / before:+.1%}" if before > 0 else "dense"
