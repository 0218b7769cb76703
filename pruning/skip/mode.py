"""The skip mode (SkipGPT): attention and MLP sublayers skipped per token by trained routers, with
the compute really skipped (skipping.py), and static baselines at the same module budget.

Candidates:
- method `router`: routers trained on the train split with the base frozen (routers.py; cached, resumable),
  optionally initialised from a static ranking (`router_init`) and followed by LoRA (`lora_steps`);
  the keep threshold is set so the calibration tokens skip exactly `ratio` (`calibrate`);
- method `shortgpt`: the `ratio` of sublayers with the least influence on the residual stream
  (1 − cos of its input and output, ShortGPT's measure per sublayer) removed for every token;
- method `removal`: the sublayers whose removal alone costs the least calibration loss removed;
- any metric: sublayers ranked by the metric's weight scores reduced over each sublayer (`reducer`),
  the lowest removed — so a campaign in this mode evolves the metric that ranks sublayers;
- a `SkipPlan` (plan.py): the removed sublayers named explicitly — what the removal-set search
  (`[search] problem = "skip_plan"`, evolve/skip_problem.py) evolves.
"""

from __future__ import annotations

import dataclasses
import math
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from prunerzero.core.integrity import CorruptCache
from prunerzero.models.adapter import ModelAdapter

from ..candidates import Method
from ..influence import removal_losses, sublayer_influence
from ..interventions import Edits
from ..recipe import resolve_candidate, unsupported
from ..reduce import check_reducer, group_scores
from ..removal import remove_sublayer
from ..report import PruneReport
from ..reshaped import load_reshaped, save_reshaped
from .lora import apply_deltas
from .plan import SkipPlan
from .routers import (BUDGETS, RouterError, RouterSet, TrainConfig, Training, default_bias, load_or_train, routed,
                      sublayer_costs)
from .skipping import EXECUTIONS, Router, calibrate_threshold, install, skip_counts

KINDS = {"both": ("attention", "mlp"), "attention": ("attention",), "mlp": ("mlp",)}
MARKER = "prunerzero_skip.json"


@dataclass(frozen=True)
class SkipTarget(Training):
    """The skip mode's budget and how it is reached; the router training's fields (steps, lr,
    budget, lora_steps, …) are routers.Training's."""

    ratio: float = 0.25  # fraction of (sublayer, token) pairs skipped; static methods: of sublayers removed
    modules: str = "both"  # which sublayers may be skipped: both, attention, mlp
    execution: str = "gather"  # gather: skipped tokens are not computed; multiply: computed, then zeroed
    reducer: str = "mean"  # metric weight scores -> sublayer importance (pruning/reduce.py)
    normalize: str = "none"
    router_init: str = "removal"  # a static ranking (shortgpt, removal, a metric) the routers start from, or none
    routers: str = ""  # a directory of routers trained before (routers.safetensors + routers.json)
    calibrate: bool = True  # keep threshold set on calibration tokens so exactly `ratio` is skipped

    def __post_init__(self) -> None:
        if not (isinstance(self.ratio, (int, float)) and 0.0 <= self.ratio < 1.0):
            raise ValueError(f"skip ratio {self.ratio} must be in [0, 1): the fraction of modules skipped")
        if self.modules not in KINDS:
            raise ValueError(f"unknown modules {self.modules!r}: use one of {', '.join(KINDS)}")
        if self.execution not in EXECUTIONS[:2]:
            raise ValueError(f"unknown execution {self.execution!r}: use gather or multiply")
        if self.steps < 1 or self.batch < 1 or self.seq_len < 2 or self.lora_steps < 0 or self.lora_rank < 1:
            raise ValueError("router training needs steps >= 1, batch >= 1, seq_len >= 2, lora_steps >= 0, lora_rank >= 1")
        if not (self.lr > 0 and self.weight >= 0 and 0 < self.t_end <= self.t_start and 0 <= self.explore <= 1):
            raise ValueError("router training needs lr > 0, weight >= 0, 0 < t_end <= t_start and 0 <= explore <= 1")
        if self.budget not in BUDGETS:
            raise ValueError(f"unknown skip budget {self.budget!r}: use one of {', '.join(BUDGETS)}")
        if self.holdout < 0 or self.eval_every < 1:
            raise ValueError("router training needs holdout >= 0 windows and eval_every >= 1 steps")
        check_reducer(self.reducer, self.normalize)

    @property
    def kinds(self) -> tuple[str, ...]:
        return KINDS[self.modules]

    def describe(self) -> str:
        scope = "modules" if self.modules == "both" else f"{self.modules} modules"
        extra = "" if self.execution == "gather" else f", {self.execution}"
        extra += f", LoRA {self.lora_steps} steps" if self.lora_steps else ""
        return f"{self.ratio:g} of {scope} skipped{extra}"

    def train_config(self, init: tuple[float, ...] = ()) -> TrainConfig:
        return TrainConfig(self.ratio, self.kinds, init=init,
                           **{f.name: getattr(self, f.name) for f in dataclasses.fields(Training)})


# ------------------------------------------------------------------ static rankings
# the static rankings: name -> (ctx, target) -> (blocks, 2) importance
SCORES = {"shortgpt": lambda ctx, target: sublayer_influence(ctx), "removal": lambda ctx, target: removal_losses(ctx)}
STATIC = tuple(SCORES)


def importance(ctx, candidate, target: SkipTarget) -> np.ndarray:
    """(blocks, 2) importance of each block's attention (0) and MLP (1); higher = keep."""
    if isinstance(candidate, Method) and candidate.name in SCORES:
        return SCORES[candidate.name](ctx, target)
    if isinstance(candidate, Method) or not hasattr(candidate, "needs"):
        raise unsupported("skip", candidate)
    groups = ctx.structure.sublayers()
    scores = group_scores(candidate, ctx.stats(candidate.needs), groups, target.reducer, target.normalize)
    out = np.zeros((len(ctx.structure.blocks), 2))
    for g, s in zip(groups, scores.cpu().tolist()):
        out[g.block, g.index] = s
    return out


def static_plan(imp: np.ndarray, target: SkipTarget, costs: dict | None = None) -> list[tuple[int, str]]:
    """In-scope sublayers of least importance, as (block, kind) in block order, removed until
    they hold the `ratio` of the budget (of the modules, or of their `costs` for a FLOPs budget:
    the nearest share reachable in that order)."""
    names = [(b, kind) for b in range(imp.shape[0]) for kind in ("attention", "mlp") if kind in target.kinds]
    values = np.array([imp[b, 0 if kind == "attention" else 1] for b, kind in names])
    cost = np.array([1.0 if costs is None else costs[n] for n in names])
    goal, total, chosen = target.ratio * cost.sum(), 0.0, []
    for i in np.argsort(values, kind="stable"):
        if total + cost[i] / 2 > goal:
            break
        chosen.append(names[i])
        total += cost[i]
    return sorted(chosen)


def ranked(ctx, candidate, target: SkipTarget) -> tuple[list[tuple[int, str]], list[tuple[int, str]]]:
    """(in-scope sublayers from least to most important, the plan the target removes) under a ranking."""
    imp = importance(ctx, candidate, target)
    names = [(s.block, s.kind) for s in routed(ctx.structure, target.kinds)]
    values = [imp[b, 0 if kind == "attention" else 1] for b, kind in names]
    order = [names[i] for i in np.argsort(values, kind="stable")]
    return order, static_plan(imp, target, costs_of(ctx, target))


def removed_count(sublayers: int, ratio: float) -> int:
    """How many of `sublayers` unit-cost sublayers `static_plan` removes at `ratio` (its rounding)."""
    return min(sublayers, max(0, math.floor(ratio * sublayers - 0.5) + 1))


def given_plan(ctx, plan: SkipPlan, target: SkipTarget) -> list[tuple[int, str]]:
    """A SkipPlan's sublayers, checked: each in the model and the target's scope, and (a modules
    budget) exactly as many as the target's ratio removes, so plans compare at one budget."""
    scope = {(s.block, s.kind) for s in routed(ctx.structure, target.kinds)}
    stray = [k for k in plan.removed if k not in scope]
    if stray:
        raise ValueError(f"skip plan: {stray[:3]} are not {target.modules} sublayers of this model "
                         f"({len(ctx.structure.blocks)} blocks)")
    want = removed_count(len(scope), target.ratio)
    if target.budget == "modules" and len(plan.removed) != want:
        raise ValueError(f"skip plan removes {len(plan.removed)} sublayers; ratio {target.ratio:g} of "
                         f"{len(scope)} removes {want}")
    return list(plan.removed)


def costs_of(ctx, target: SkipTarget, budget: str | None = None) -> dict[tuple[int, str], float]:
    """What skipping a token saves in each routed sublayer, in the budget's unit (or `budget`'s)."""
    subs = routed(ctx.structure, target.kinds)
    return dict(zip([(s.block, s.kind) for s in subs], sublayer_costs(ctx.structure, subs, budget or target.budget)))


def init_biases(plan: list[tuple[int, str]], costs: dict[tuple[int, str], float], ratio: float) -> tuple[float, ...]:
    """Router biases (in the order of `costs`, the routed sublayers) from a static plan: its
    sublayers start mostly skipped (keep 0.1), the others kept so that the budget's kept share is
    the target's."""
    if not plan:
        return tuple(default_bias(ratio) for _ in costs)
    low = 0.1
    share = sum(costs[k] for k in plan) / sum(costs.values())
    high = min((1 - ratio - share * low) / max(1 - share, 1e-9), 0.999)
    logit = lambda p: math.log(p / (1 - p))  # noqa: E731
    removed = set(plan)
    return tuple(round(logit(low if k in removed else max(high, 0.5)), 6) for k in costs)


# ------------------------------------------------------------------ applying
def model_id(ctx) -> str:
    """What a router set is trained for: the model's class, shape and a digest of its weights."""
    return ctx.identity()


def check_skip(ctx, target: SkipTarget) -> None:
    if ctx.structure.is_moe:
        raise ValueError("the skip mode takes dense models; this one has experts (use the experts mode)")
    if not routed(ctx.structure, target.kinds):
        raise ValueError(f"the model has no {target.modules} sublayers to skip")
    if target.routers:
        _given_routers(ctx, target)


def _given_routers(ctx, target: SkipTarget) -> RouterSet:
    try:
        found = RouterSet.load(Path(target.routers))
    except CorruptCache as e:
        raise RouterError(f"target.routers: {target.routers} holds no usable routers ({e})") from None
    found.check_fits(model_id(ctx), ctx.model.get_input_embeddings().weight.shape[1], len(ctx.structure.blocks),
                     f"target.routers {target.routers}")
    want = [(s.block, s.kind) for s in routed(ctx.structure, target.kinds)]
    if found.names != want:
        raise RouterError(f"target.routers: {target.routers} routes {len(found.names)} sublayers, "
                          f"the target's modules={target.modules!r} {len(want)}")
    return found


def apply_skip(ctx, candidate, target: SkipTarget) -> PruneReport:
    t0 = time.perf_counter()
    check_skip(ctx, target)
    report = PruneReport(target, getattr(candidate, "name", "metric"))
    if isinstance(candidate, Method):
        if candidate.name not in METHODS:
            raise unsupported("skip", candidate)
        extra = METHODS[candidate.name](ctx, candidate, target, report)
    else:
        extra = _static(ctx, candidate, target, report)
    report.extra.update(extra)
    report.seconds = time.perf_counter() - t0
    ctx.log(f"skip: {report.method} skips {extra['skip_ratio']:.3f} of {target.modules} modules, "
            f"{extra['flops_skip_ratio']:.3f} of their FLOPs (attention {extra['attention_skip_ratio']:.3f}, "
            f"MLP {extra['mlp_skip_ratio']:.3f})")
    return report


def _routed(ctx, candidate, target: SkipTarget, report: PruneReport) -> dict:
    """Routers (trained, cached or given) decide per token; the report folds their key in."""
    extra = _apply_routers(ctx, target)
    report.add_plan("routers", (extra["router_key"], round(extra["threshold"], 9), target.execution))
    return extra


def _static(ctx, candidate, target: SkipTarget, report: PruneReport) -> dict:
    """The least important sublayers (a static ranking or a metric's), or a plan's, removed for every token."""
    if isinstance(candidate, SkipPlan):
        plan = given_plan(ctx, candidate, target)
    else:
        plan = static_plan(importance(ctx, candidate, target), target, costs_of(ctx, target))
    by_name = {(s.block, s.kind): s for b in ctx.structure.blocks for s in b.sublayers}
    for key in plan:
        remove_sublayer(ctx.edits, by_name[key])
    flops = costs_of(ctx, target, "flops")
    extra = {"skip_ratio": len(plan) / len(flops), "flops_skip_ratio": sum(flops[k] for k in plan) / sum(flops.values()),
             "attention_skip_ratio": _share(plan, "attention", ctx),
             "mlp_skip_ratio": _share(plan, "mlp", ctx), "removed": [list(k) for k in plan]}
    report.add_plan("static", plan)
    return extra


# the mode's methods: name -> (ctx, candidate, target, report) -> the report's extra
METHODS = {"router": _routed, **{name: _static for name in STATIC}}


def _share(plan, kind: str, ctx) -> float:
    return sum(k == kind for _, k in plan) / len(ctx.structure.blocks)


def _apply_routers(ctx, target: SkipTarget, tokens: int = 256) -> dict:
    subs = routed(ctx.structure, target.kinds)
    costs, flops = costs_of(ctx, target), costs_of(ctx, target, "flops")
    if target.routers:
        routers = _given_routers(ctx, target)
    else:
        init = ()
        if target.router_init != "none":
            start = resolve_candidate(target.router_init, METHODS)
            init = init_biases(static_plan(importance(ctx, start, target), target, costs), costs, target.ratio)
        cfg = target.train_config(init)
        routers = ctx.remember(("routers", cfg), lambda: load_or_train(ctx, cfg, model_id(ctx), ctx.log))
    if routers.lora:
        apply_deltas(ctx.edits, ctx.units, routers.lora)
    attentions = {a.block: a for a in ctx.structure.attentions}
    wrapped = [install(ctx.edits, s, r.to(ctx.device), target.execution, 0.0, attentions.get(s.block),
                       costs[(s.block, s.kind)], flops[(s.block, s.kind)]) for s, r in zip(subs, routers.routers)]
    ids = ctx.calibration[:4, :tokens].to(ctx.device)
    threshold = calibrate_threshold(ctx.model, wrapped, ids, target.ratio) if target.calibrate else 0.0
    counts = skip_counts(ctx.model, reset=True)
    return {**counts, "threshold": threshold, "router_key": routers.meta.get("sha256", ""),
            "costs": [costs[(s.block, s.kind)] for s in subs], "flops": [flops[(s.block, s.kind)] for s in subs],
            "router_best": routers.meta.get("best", {}), "routers_dir": str(routers.path or ""),
            "router_train_seconds": routers.meta.get("train_seconds", 0.0),
            "router_untimed_steps": routers.meta.get("untimed_steps", 0), "routed": [list(n) for n in routers.names]}


# ------------------------------------------------------------------ saving and loading
def save_skip(ctx, report: PruneReport, out) -> None:
    """The base weights (with any LoRA merged), the routers inside the wrapped model and the plan;
    every prunerzero command loads the directory and runs it skipping."""
    x = report.extra
    plan = {"removed": x.get("removed", []), "routed": x.get("routed", []), "threshold": x.get("threshold", 0.0),
            "execution": report.target.execution, "model_id": model_id(ctx) if x.get("routed") else "",
            "costs": x.get("costs", []), "flops": x.get("flops", [])}
    save_reshaped(ctx.model, ctx.model.config, out, MARKER, "skip",
                  {"format": 1, "plan": plan, "budget": report.target.describe()})


def load_skip(path, dtype: torch.dtype):
    """A model saved by the skip mode: dense shapes from its config, the plan applied (routers
    with placeholder weights, removed sublayers), then every tensor loaded strictly."""
    return load_reshaped(path, dtype, MARKER, lambda doc: doc["plan"], _rebuild,
                         damaged="not a plan the skip mode wrote")


def _rebuild(model, plan, where: str) -> None:
    structure = ModelAdapter(model).structure
    by_name = {(s.block, s.kind): s for b in structure.blocks for s in b.sublayers}
    removed, routed_names = _check_plan(plan, by_name, where)
    attentions = {a.block: a for a in structure.attentions}
    edits, hidden = Edits(), model.get_input_embeddings().weight.shape[1]
    costs = plan.get("costs") or [1.0] * len(routed_names)
    flops = plan.get("flops") or [1.0] * len(routed_names)
    for (b, kind), cost, f in zip(routed_names, costs, flops):
        install(edits, by_name[(b, kind)], Router(hidden), plan["execution"], plan["threshold"], attentions.get(b), cost, f)
    for key in removed:
        remove_sublayer(edits, by_name[key])


def _check_plan(plan, by_name: dict, where: str) -> tuple[list, list]:
    """(removed, routed) sublayers of a plan read from a file, every field checked against the
    model (the marker is outside any checksum); errors name the field."""
    if not isinstance(plan, dict):
        raise ValueError(f"{where}: field 'plan' must be an object")
    names = {}
    for field in ("removed", "routed"):
        got = plan.get(field)
        if not isinstance(got, list) or not all(isinstance(k, list) and len(k) == 2 and type(k[0]) is int
                                                and isinstance(k[1], str) and tuple(k) in by_name for k in got):
            raise ValueError(f"{where}: plan.{field} must list [block, \"attention\" | \"mlp\"] sublayers "
                             f"of this model, got {got!r:.80}")
        names[field] = [tuple(k) for k in got]
    everything = names["removed"] + names["routed"]
    if len(set(everything)) != len(everything):
        raise ValueError(f"{where}: plan.removed and plan.routed name a sublayer twice")
    if plan.get("execution") not in EXECUTIONS[:2]:
        raise ValueError(f"{where}: plan.execution must be gather or multiply, got {plan.get('execution')!r:.40}")
    if not _finite(plan.get("threshold")):
        raise ValueError(f"{where}: plan.threshold must be a finite number")
    for field in ("costs", "flops"):
        got = plan.get(field) or []
        if not isinstance(got, list) or got and (len(got) != len(names["routed"])
                                                 or not all(_finite(c) and c > 0 for c in got)):
            raise ValueError(f"{where}: plan.{field} must give a positive number for each routed sublayer")
    return names["removed"], names["routed"]


def _finite(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)
