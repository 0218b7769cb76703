"""The structured mode (MDP for LLMs): heads, MLP channel groups, whole sublayers and whole blocks
removed under a latency budget measured on this machine, chosen jointly by a MILP.

    importance of every unit (any metric through the reducer, or first-order Taylor)
      → per block, the importance of its best configuration at every size (options)
      → the latency table (latency.py) prices every option
      → selection.py: one option per block and sublayer, latency ≤ budget, importance maximal
      → slicing.py / removal.py cut the weights out (a smaller model, not a masked one)
      → optional recovery: the following projection refit by least squares (recovery.py)

Baselines at the same budget: `solver = "greedy"` and `"uniform"`, and the method `shortgpt`
(whole blocks by block influence).
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np
import torch

from prunerzero.models.adapter import ModelAdapter
from prunerzero.models.structure import Group, Part

from ..candidates import Method
from ..influence import removal_losses, scale_to_losses
from ..interventions import Edits
from ..recipe import unsupported
from ..reduce import check_reducer, reduce_groups, weight_scores
from ..removal import remove_block, remove_sublayer
from ..report import PruneReport
from ..reshaped import load_reshaped, save_reshaped
from ..slicing import slice_attention, slice_mlp
from .latency import PHASES, LatencyTable, load_or_measure
from .recovery import collect_grams, refit_following
from .selection import SOLVERS, Selection, select
from .shortgpt import shortgpt_plan

RECOVERIES = ("none", "lsq")
SCALES = ("none", "removal")


@dataclass(frozen=True)
class StructuredTarget:
    latency: float = 0.7  # the pruned model's latency as a fraction of the dense model's, measured here
    phase: str = "prefill"  # which latency: a prefill of (batch, seq_len) tokens, or one decoded token
    width: int = 64  # MLP channels removed in groups of this many (a hardware-friendly width)
    solver: str = "milp"  # or the baselines "greedy", "uniform"
    reducer: str = "sum"  # weight scores -> unit scores (pruning/reduce.py)
    normalize: str = "none"
    scale: str = "removal"  # "removal": each sublayer's unit scores sum to its measured removal loss (influence.py)
    recovery: str = "none"  # "lsq": refit o_proj / down_proj on calibration data, no training
    batch: int = 1  # the shape the latency table is measured at
    seq_len: int = 256

    def __post_init__(self) -> None:
        if not 0.0 < self.latency < 1.0:
            raise ValueError(f"latency budget {self.latency} must be a fraction of the dense model's in (0, 1)")
        if self.phase not in PHASES:
            raise ValueError(f"unknown latency phase {self.phase!r}: use one of {', '.join(PHASES)}")
        if self.width < 1:
            raise ValueError(f"channel group width must be >= 1, got {self.width}")
        if self.solver not in SOLVERS:
            raise ValueError(f"unknown solver {self.solver!r}: use one of {', '.join(SOLVERS)}")
        if self.scale not in SCALES:
            raise ValueError(f"unknown importance scale {self.scale!r}: use one of {', '.join(SCALES)}")
        if self.recovery not in RECOVERIES:
            raise ValueError(f"unknown recovery {self.recovery!r}: use one of {', '.join(RECOVERIES)}")
        if self.batch < 1 or self.seq_len < 1:
            raise ValueError(f"latency shape must be positive, got batch {self.batch}, seq_len {self.seq_len}")
        check_reducer(self.reducer, self.normalize)

    def describe(self) -> str:
        extra = "" if self.scale == "removal" else f", {self.scale} scale"
        extra += "" if self.recovery == "none" else f" + {self.recovery} recovery"
        return f"{self.latency:g}x {self.phase} latency, {self.solver}{extra}"


# ------------------------------------------------------------------ importance
def _kv_groups(structure) -> list[Group]:
    """Key/value heads by their own k and v rows (the query heads they serve score separately)."""
    out = []
    for a in structure.attentions:
        d = a.head_dim
        for kv in range(a.n_kv_heads):
            out.append(Group("kv_head", a.block, kv, f"block{a.block}.kv{kv}",
                             (Part(a.k, 0, kv * d, (kv + 1) * d), Part(a.v, 0, kv * d, (kv + 1) * d))))
    return out


def unit_importance(ctx, metric, target: StructuredTarget) -> dict[str, np.ndarray]:
    """(blocks, units) arrays: query heads, KV heads (k, v rows), MLP channel groups, by a metric's
    weight scores through the target's reducer."""
    def reduce(groups):
        units = {p.unit.name: p.unit for gs in groups.values() for g in gs for p in g.parts}
        scores = weight_scores(metric, ctx.stats(metric.needs), units.values())
        return lambda gs: reduce_groups(gs, scores, target.reducer, target.normalize)
    return _importance(ctx, target, reduce)


def taylor_importance(ctx, target: StructuredTarget) -> dict[str, np.ndarray]:
    """The same arrays by first-order Taylor: |Σ W·∂L/∂W| per group."""
    def reduce(groups):
        scores = taylor_scores(ctx)
        return lambda gs: reduce_groups(gs, scores, "sum").abs()
    return _importance(ctx, target, reduce)


def _importance(ctx, target: StructuredTarget, reducer) -> dict[str, np.ndarray]:
    s = ctx.structure
    groups = {"head": s.heads(), "kv": _kv_groups(s), "channel": s.channels(target.width)}
    reduce = reducer(groups)
    n = len(s.blocks)
    imp = {k: reduce(gs).cpu().numpy().reshape(n, -1) for k, gs in groups.items()}
    return scale_to_losses(imp, removal_losses(ctx)) if target.scale == "removal" else imp


def taylor_scores(ctx) -> dict[str, torch.Tensor]:
    """W · ∂L/∂W summed over the calibration windows (LLM-Pruner's first-order Taylor term),
    per prunable unit; once per model."""
    return ctx.remember("taylor", lambda: _taylor_scores(ctx))


def _taylor_scores(ctx) -> dict[str, torch.Tensor]:
    units = ctx.units
    params = list({id(u.param): u.param for u in units}.values())
    for p in params:
        p.requires_grad_(True)
        p.grad = None
    try:
        for window in ctx.calibration:
            ids = window[None].to(ctx.device)
            ctx.model(ids, labels=ids, use_cache=False).loss.backward()
        scores = {u.name: u.weight.float() * u.grad.float() for u in units}
    finally:
        for p in params:
            p.grad = None
            p.requires_grad_(False)
    return scores


# ------------------------------------------------------------------ options
def _attention_option(heads: np.ndarray, kv: np.ndarray, group: int, a: int, b: int):
    """The best choice of `a` KV heads with `b` query heads each: (importance, kept heads per KV)."""
    per_kv = []
    for k in range(len(kv)):
        mine = heads[k * group:(k + 1) * group]
        best = np.argsort(-mine, kind="stable")[:b]
        per_kv.append((kv[k] + mine[best].sum(), sorted(int(k * group + h) for h in best)))
    chosen = sorted(np.argsort(-np.array([v for v, _ in per_kv]), kind="stable")[:a])
    plan = [per_kv[k][1] if k in chosen else [] for k in range(len(kv))]
    return float(sum(per_kv[k][0] for k in chosen)), plan


def build_options(imp: dict[str, np.ndarray], table: LatencyTable, structure, phase: str):
    """The MILP's options for every block, and the kept units each option stands for."""
    group = structure.attentions[0].group_size
    n = len(structure.blocks)
    a_imp = np.zeros((n, len(table.attn_options)))
    a_plans = [[None] * len(table.attn_options) for _ in range(n)]
    m_imp = np.zeros((n, len(table.mlp_options)))
    m_plans = [[None] * len(table.mlp_options) for _ in range(n)]
    for b in range(n):
        for i, (a, k) in enumerate(table.attn_options):
            if a:
                a_imp[b, i], a_plans[b][i] = _attention_option(imp["head"][b], imp["kv"][b], group, a, k)
        order = np.argsort(-imp["channel"][b], kind="stable")
        for j in table.mlp_options:
            if j:
                m_imp[b, j] = imp["channel"][b][order[:j]].sum()
                m_plans[b][j] = sorted(int(c) for c in order[:j])
    return table.options(phase, a_imp, m_imp), a_plans, m_plans


def plan_of(selection: Selection, a_plans, m_plans, width: int) -> list[dict]:
    """Plain data per block: kept query heads per KV head (None: attention removed), kept MLP
    channels (None: MLP removed), whether the whole block is removed."""
    out = []
    for b, (a, m, gone) in enumerate(zip(selection.attn, selection.mlp, selection.removed)):
        channels = None if m == 0 else [g * width + i for g in m_plans[b][m] for i in range(width)]
        out.append({"heads": a_plans[b][a], "channels": channels, "removed": bool(gone)})
    return out


# ------------------------------------------------------------------ applying a plan
def apply_plan(edits: Edits, adapter, plan: list[dict]) -> None:
    structure = adapter.structure
    if len(plan) != len(structure.blocks):
        raise ValueError(f"the plan has {len(plan)} blocks; the model has {len(structure.blocks)}")
    for block, step in zip(structure.blocks, plan):
        if step["removed"]:
            remove_block(edits, adapter.blocks, block.index)
            continue
        attn, mlp = block.attention, block.mlp
        if step["heads"] is None:
            remove_sublayer(edits, block.sublayers[0])
        elif sum(map(len, step["heads"])) < attn.n_heads:
            slice_attention(edits, attn, step["heads"])
        if step["channels"] is None:
            remove_sublayer(edits, block.sublayers[1])
        elif len(step["channels"]) < mlp.width:
            slice_mlp(edits, mlp, step["channels"])


def summary(plan: list[dict]) -> dict:
    return {"blocks_removed": sum(p["removed"] for p in plan),
            "attention_removed": sum(p["heads"] is None and not p["removed"] for p in plan),
            "mlp_removed": sum(p["channels"] is None and not p["removed"] for p in plan),
            "heads_kept": sum(sum(map(len, p["heads"])) for p in plan if p["heads"] and not p["removed"]),
            "channels_kept": sum(len(p["channels"]) for p in plan if p["channels"] and not p["removed"])}


def latency_table(ctx, target: StructuredTarget) -> LatencyTable:
    """The table for the target's shape: from this machine's cache, or measured once."""
    return ctx.remember(("latency", target.width, target.batch, target.seq_len),
                        lambda: load_or_measure(ctx.model, ctx.adapter, target.width, target.batch,
                                                target.seq_len, log=ctx.log))


def check_structured(ctx, target: StructuredTarget) -> None:
    for m in ctx.structure.mlps:
        if m.width % target.width:
            raise ValueError(f"channel group width {target.width} does not divide the MLP width {m.width} "
                             f"of {m.name}: use a divisor of {m.width}")
    if ctx.structure.is_moe:
        raise ValueError("structured pruning takes dense models; this one has experts (use the experts mode)")


def importance_plan(imp: dict[str, np.ndarray], ctx, table: LatencyTable, target: StructuredTarget):
    """(plan, selection): each block's option chosen under the budget from the units' importance
    (a metric's reduced scores, or Taylor's)."""
    opts, a_plans, m_plans = build_options(imp, table, ctx.structure, target.phase)
    sel = select(opts, target.latency * table.dense_latency(target.phase), target.solver)
    return plan_of(sel, a_plans, m_plans, target.width), sel


def _taylor(ctx, table: LatencyTable, target: StructuredTarget):
    return importance_plan(taylor_importance(ctx, target), ctx, table, target)


# the mode's methods: name -> (ctx, latency table, target) -> (plan, selection)
METHODS = {"taylor": _taylor, "shortgpt": shortgpt_plan}


def apply_structured(ctx, candidate, target: StructuredTarget) -> PruneReport:
    """Prune `ctx`'s model in place to the latency budget; the report's extra holds the plan's
    predicted latency, the solver's gap and time, and what was removed."""
    t0 = time.perf_counter()
    check_structured(ctx, target)
    table = latency_table(ctx, target)
    dense = table.dense_latency(target.phase)
    if isinstance(candidate, Method):
        if candidate.name not in METHODS:
            raise unsupported("structured", candidate)
        plan, sel = METHODS[candidate.name](ctx, table, target)
    elif not hasattr(candidate, "needs"):
        raise unsupported("structured", candidate)
    else:
        plan, sel = importance_plan(unit_importance(ctx, candidate, target), ctx, table, target)
    if target.recovery == "lsq":
        grams = ctx.remember("grams", lambda: collect_grams(ctx))  # of the dense model: before any edit
    apply_plan(ctx.edits, ctx.adapter, plan)
    if target.recovery == "lsq":
        refit_following(ctx.edits, ctx.structure, plan, grams)
    report = PruneReport(target, getattr(candidate, "name", "metric"))
    _count_removed(ctx, report)
    report.add_plan("structured", plan)
    report.extra.update(_extra(sel, dense, plan))
    report.extra["plan"] = plan
    report.seconds = time.perf_counter() - t0
    ctx.log(f"structured: predicted {report.extra['predicted_ratio']:.3f}x dense {target.phase} latency "
            f"({sel.solver}, gap {sel.gap:.2g}, {sel.seconds:.2f}s); {summary(plan)}")
    return report


def _count_removed(ctx, report: PruneReport) -> None:
    """Each prunable unit's removed weights as its 'zeros' (the report's sparsity: the fraction of
    prunable weights cut out); a unit whose module was removed counts whole."""
    for unit in ctx.units:
        try:
            now = ctx.model.get_submodule(unit.name).weight.numel()
        except AttributeError:
            now = 0
        report.add(unit, unit.weight.numel() - now)


def _extra(sel: Selection, dense: float, plan) -> dict:
    return {"solver": sel.solver, "solver_gap": sel.gap, "solver_seconds": sel.seconds, "importance": sel.importance,
            "predicted_ms": 1e3 * sel.latency, "predicted_dense_ms": 1e3 * dense,
            "predicted_ratio": sel.latency / dense, **summary(plan)}


# ------------------------------------------------------------------ saving and loading
MARKER = "prunerzero_structure.json"


def save_structured(ctx, report: PruneReport, out) -> None:
    """The sliced model as safetensors beside the dense config and the plan: transformers' config
    cannot say that block 3 keeps 6 heads and block 4 none, so `prunerzero.models.loading`
    (and every prunerzero command) rebuilds the shapes from the plan, then loads the weights."""
    doc = {"format": 1, "plan": report.extra["plan"], "budget": report.target.describe(),
           "predicted_ratio": report.extra["predicted_ratio"]}
    save_reshaped(ctx.model, ctx.model.config, out, MARKER, "structured", doc)


def load_structured(path, dtype: torch.dtype):
    """A model saved by the structured mode: dense shapes from its config, the plan applied, the
    sliced weights loaded (strictly: a missing or mis-shaped tensor is an error)."""
    def rebuild(model, plan, where: str) -> None:
        adapter = ModelAdapter(model)
        check_plan(plan, adapter.structure, where)
        apply_plan(Edits(), adapter, plan)
    return load_reshaped(path, dtype, MARKER, lambda doc: doc["plan"], rebuild,
                         damaged="not a plan the structured mode wrote")


def check_plan(plan, structure, where: str) -> None:
    """A plan read from a file: the steps the structured mode writes, one per block, every field
    of its type and in range (the marker is outside any checksum). Errors name the field."""
    if any(b.attention is None or b.mlp is None for b in structure.blocks):
        raise ValueError(f"{where}: its config builds a model with blocks the structured mode does not cut")
    if not isinstance(plan, list) or len(plan) != len(structure.blocks):
        raise ValueError(f"{where}: field 'plan' must list one step for each of the model's "
                         f"{len(structure.blocks)} blocks")
    for block, step in zip(structure.blocks, plan):
        at = f"{where}: plan[{block.index}]"
        if not isinstance(step, dict) or not {"heads", "channels", "removed"} <= step.keys():
            raise ValueError(f"{at} must be an object with heads, channels and removed")
        if not isinstance(step["removed"], bool):
            raise ValueError(f"{at}.removed must be true or false, got {step['removed']!r:.40}")
        _check_heads(step["heads"], block.attention, f"{at}.heads")
        _check_channels(step["channels"], block.mlp.width, f"{at}.channels")


def _ints(values) -> bool:
    return isinstance(values, list) and all(type(v) is int for v in values)


def _check_heads(heads, attn, at: str) -> None:
    """null (removed), or per KV head the kept query heads that read it, equally many per kept KV head."""
    if heads is None:
        return
    if not isinstance(heads, list) or len(heads) != attn.n_kv_heads or not all(map(_ints, heads)):
        raise ValueError(f"{at} must be null or {attn.n_kv_heads} lists (one per KV head) of query heads")
    for kv, hs in enumerate(heads):
        if len(set(hs)) != len(hs) or any(not 0 <= h < attn.n_heads or attn.kv_of(h) != kv for h in hs):
            raise ValueError(f"{at}[{kv}] must be distinct query heads of KV head {kv}, got {hs!r:.80}")
    sizes = {len(hs) for hs in heads if hs}
    if len(sizes) != 1:
        raise ValueError(f"{at}: the kept KV heads must keep equally many query heads, at least one")


def _check_channels(channels, width: int, at: str) -> None:
    """null (removed), or distinct channels in [0, width), at least one."""
    if channels is None:
        return
    if not _ints(channels) or not channels or len(set(channels)) != len(channels) \
            or not all(0 <= c < width for c in channels):
        raise ValueError(f"{at} must be null or distinct channels in [0, {width}), at least one")
