"""The experts mode: routed experts of a Mixture-of-Experts model removed or merged, and fewer
experts active per token — driven by any metric, by routing statistics, or by an evolved plan.

    importance of every expert: a metric's weight scores reduced over the expert (reduce.py)
        × a routing statistic on calibration tokens (`signal`: frequency, gate mass, REAP) — or
        a method: `frequency`, `gate`, `reap` (gate × output norm), `naee` (each layer's subset
        with the least output error, enumerated), `random`
      → a budget of experts per layer (`experts`, or a list `per_layer`), or in total across
        layers (`allocation = "global"`: different counts per layer)
      → slicing.remove_experts: the kept experts and their router rows (the softmax renormalises
        over them); with `merge = "aligned"` each removed expert is merged into the kept one its
        tokens go to next, neurons aligned first, weighted by routing mass; with `merge = "refit"`
        the kept experts' down projections are refit by least squares to the unpruned layer's
        routed output on calibration tokens (the removed experts' work folded into the kept ones)
      → slicing.set_top_k: `top_k` active experts per token (fewer: less compute per token)

An `ExpertPlan` (evolve/experts_problem.py's EEP search) names the kept experts and merge
coefficients per layer by *rank* under a method or metric, so a plan is plain data a driver
without the model can write, and the metric-driven choice is the plan that keeps ranks 0..n-1.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from prunerzero.models.adapter import ModelAdapter
from prunerzero.models.loading import REAL_CONFIG
from prunerzero.models.structure import expert_count_attrs
from prunerzero.primitives.metric import resolve_metric

from ..candidates import Method
from ..interventions import Edits
from ..recipe import unsupported
from ..reduce import check_reducer, group_scores
from ..report import PruneReport
from ..reshaped import load_reshaped, save_reshaped
from ..slicing import remove_experts, set_top_k
from .plan import METHODS as EXPERT_METHODS, ExpertPlan
from .signals import (LayerRouting, alignment, collect_routing, merge_targets, naee_keep, permute_neurons,
                      refit_down, renormalises, routed_reference)

SIGNALS = ("none", "frequency", "gate", "reap")
MERGES = ("none", "aligned", "refit")
ALLOCATIONS = ("uniform", "global")
MARKER = "prunerzero_experts.json"


class ExpertsError(ValueError):
    """A target or model the experts mode cannot take (the message names it)."""


@dataclass(frozen=True)
class ExpertsTarget:
    experts: int = 4  # experts kept per MoE layer (with allocation "global": on average)
    per_layer: str = ""  # experts kept in each MoE layer, comma-separated (overrides `experts`)
    allocation: str = "uniform"  # "global": experts x layers kept in total, ranked across layers
    # experts active per token after pruning; 0: the model's (at most the kept count), never written by hand
    top_k: int = field(default=0, metadata={"given_min": 1, "default_means": "the model's own top-k"})
    merge: str = "none"  # "aligned": removed experts averaged into kept ones (routing-mass weights);
    # "refit": what the removed experts did folded into the kept ones' down projections by least squares
    merge_weight: float = 1.0  # a merged expert's routing mass counts this much beside the kept one's
    rescale: bool = True  # routers that do not renormalise top-k: kept experts scaled by the mass they held
    signal: str = "reap"  # routing statistic a metric's score is multiplied by: none, frequency, gate, reap
    reducer: str = "sum"  # metric weight scores -> expert scores (pruning/reduce.py)
    normalize: str = "none"
    tokens: int = 4096  # calibration tokens sampled per layer for NAEE, merge targets and the refit (memory bound)
    seed: int = 0  # the `random` method's choice

    def __post_init__(self) -> None:
        if self.experts < 1:
            raise ExpertsError(f"experts budget {self.experts} must keep at least one expert per layer")
        counts = self.counts
        if counts is not None and (not counts or min(counts) < 1):
            raise ExpertsError(f"per_layer {self.per_layer!r} must give at least one expert for every layer")
        if self.allocation not in ALLOCATIONS:
            raise ExpertsError(f"unknown allocation {self.allocation!r}: use one of {', '.join(ALLOCATIONS)}")
        if self.allocation == "global" and counts is not None:
            raise ExpertsError("per_layer fixes every layer's count; allocation 'global' chooses them: give one")
        if self.top_k < 0:
            raise ExpertsError(f"top_k {self.top_k} must be >= 1 (or 0: the model's)")
        if self.merge not in MERGES:
            raise ExpertsError(f"unknown merge {self.merge!r}: use one of {', '.join(MERGES)}")
        if not 0 < self.merge_weight <= 1:
            raise ExpertsError(f"merge_weight {self.merge_weight} must be in (0, 1]")
        if self.signal not in SIGNALS:
            raise ExpertsError(f"unknown routing signal {self.signal!r}: use one of {', '.join(SIGNALS)}")
        if self.tokens < 16:
            raise ExpertsError(f"tokens {self.tokens} must be >= 16 (the sample NAEE and merging route)")
        check_reducer(self.reducer, self.normalize)

    @property
    def counts(self) -> list[int] | None:
        if not self.per_layer.strip():
            return None
        try:
            return [int(c) for c in self.per_layer.split(",")]
        except ValueError:
            raise ExpertsError(f"per_layer {self.per_layer!r} must be integers separated by commas") from None

    def describe(self) -> str:
        kept = f"per-layer experts [{self.per_layer}]" if self.counts else f"{self.experts} experts per layer"
        extra = ", global allocation" if self.allocation == "global" else ""
        extra += f", top-{self.top_k}" if self.top_k else ""
        if self.merge == "aligned":
            extra += ", merged" + (f" x{self.merge_weight:g}" if self.merge_weight != 1 else "")
        extra += ", refit" if self.merge == "refit" else ""
        extra += ", not rescaled" if not self.rescale else ""
        return kept + extra


# ------------------------------------------------------------------ checks
def check_experts(ctx, target: ExpertsTarget) -> None:
    """Fail before any work: a dense model, a budget above E or below the active experts."""
    layers = ctx.structure.expert_layers
    if not layers:
        raise ExpertsError(f"the experts mode takes a Mixture-of-Experts model; {type(ctx.model).__name__} has no "
                           "routed experts (use the structured mode for dense MLPs)")
    counts = _counts(target, layers)
    for layer, n in zip(layers, counts):
        if n > layer.n_experts:
            raise ExpertsError(f"experts budget {n} is larger than the {layer.n_experts} experts of {layer.name}")
        active = target.top_k or layer.top_k
        if target.top_k > layer.n_experts:
            raise ExpertsError(f"top_k {target.top_k} is larger than the {layer.n_experts} experts of {layer.name}")
        if n < active:
            raise ExpertsError(f"experts budget {n} for {layer.name} is below the {active} experts each token is "
                               f"routed to (top-k); keep at least {active} or lower top_k")


def _counts(target: ExpertsTarget, layers) -> list[int]:
    counts = target.counts
    if counts is None:
        return [target.experts] * len(layers)
    if len(counts) != len(layers):
        raise ExpertsError(f"per_layer gives {len(counts)} counts; the model has {len(layers)} MoE layers")
    return counts


# ------------------------------------------------------------------ importance
def routing(ctx, target: ExpertsTarget) -> list[LayerRouting]:
    """Routing statistics of the dense MoE on the calibration windows, once per model."""
    layers = ctx.structure.expert_layers
    return ctx.remember(("routing", target.tokens),
                        lambda: collect_routing(ctx.model, layers, ctx.calibration, target.tokens))


def _signal(name: str):
    def signal(ctx, target: ExpertsTarget) -> torch.Tensor:
        return torch.stack([getattr(s, name) for s in routing(ctx, target)]).double()
    return signal


def _random(ctx, target: ExpertsTarget) -> torch.Tensor:
    stats = routing(ctx, target)
    g = torch.Generator().manual_seed(target.seed)
    return torch.rand(len(stats), len(stats[0].frequency), generator=g, dtype=torch.float64)


# the methods that score experts: name -> (ctx, target) -> (layers, E) importance
SCORES = {"frequency": _signal("frequency"), "gate": _signal("gate"), "reap": _signal("reap"), "random": _random}


def importance(ctx, candidate, target: ExpertsTarget) -> torch.Tensor:
    """(layers, E) expert importance, higher = keep: a method's signal, or a metric's reduced
    weight scores (normalised per layer) times the target's routing signal."""
    stats = routing(ctx, target)
    if isinstance(candidate, Method) and candidate.name in SCORES:
        return SCORES[candidate.name](ctx, target)
    if isinstance(candidate, Method) or not hasattr(candidate, "needs"):
        raise unsupported("experts", candidate)
    layers = ctx.structure.expert_layers
    scores = group_scores(candidate, ctx.stats(candidate.needs), ctx.structure.experts(), target.reducer,
                          target.normalize).cpu().reshape(len(layers), -1)
    scores = scores / scores.abs().mean(1, keepdim=True).clamp_min(1e-30)
    if target.signal != "none":
        scores = scores * torch.stack([getattr(s, target.signal) for s in stats]).double()
    return scores


def ranking(ctx, order: str, target: ExpertsTarget) -> list[list[int]]:
    """Experts of every layer from most to least important under a method or metric (stable).
    NAEE ranks its chosen subset (for the target's counts) first, each part by REAP."""
    def compute():
        if order == "naee":
            keep, _ = metric_choice(ctx, Method("naee"), target)
            reap = importance(ctx, Method("reap"), target)
            by_reap = [torch.argsort(-row, stable=True).tolist() for row in reap]
            return [[e for e in r if e in k] + [e for e in r if e not in k] for r, k in zip(by_reap, keep)]
        thing = Method(order) if order in METHODS else resolve_metric(order, allow_code=False)  # plan data never imports
        return [torch.argsort(-row, stable=True).tolist() for row in importance(ctx, thing, target)]
    return ctx.remember(("expert ranking", order, target.signal, target.reducer, target.normalize, target.seed,
                         target.tokens, target.rescale, target.counts or target.experts), compute)


def allocate(scores: torch.Tensor, target: ExpertsTarget, floor: list[int]) -> list[int]:
    """Experts kept per layer: the target's counts, or (global) the `experts` x layers experts
    with the highest per-layer-normalised scores overall, each layer keeping at least `floor`."""
    layers, n = scores.shape
    if target.allocation != "global":
        return _counts(target, range(layers))
    share = scores / scores.abs().sum(1, keepdim=True).clamp_min(1e-30)
    counts = list(floor)
    order = torch.argsort(-share.flatten(), stable=True).tolist()
    ranked = [torch.argsort(-share[b], stable=True).tolist() for b in range(layers)]
    position = [{e: r for r, e in enumerate(ranked[b])} for b in range(layers)]
    for flat in order:
        if sum(counts) >= target.experts * layers:
            break
        b, e = divmod(flat, n)
        if position[b][e] >= counts[b] and counts[b] < n:  # the layer's next-best expert
            counts[b] += 1
    return counts


# ------------------------------------------------------------------ applying a choice
def apply_choice(ctx, keep: list[list[int]], merges: list[dict[int, tuple[int, float]]], top_k: int,
                 stats: list[LayerRouting], rescale: bool = True, refit: bool = False) -> None:
    """Keep `keep[l]` experts in layer l, each removed expert j with merges[l][j] = (into, c)
    merged into `into` (neurons aligned): into ← (m_i·into + c·m_j·j) / (m_i + c·m_j), m the
    routing mass; with `rescale`, for a router that does not renormalise its top-k weights, the
    kept experts' outputs scaled by the probability mass they held (LayerRouting.kept_mass);
    then `top_k` active experts (0: the model's, at most the kept count); with `refit`, the kept
    experts' down projections refit to the unpruned layer's routed output (refit_down)."""
    for layer, kept, merged, s in zip(ctx.structure.expert_layers, keep, merges, stats):
        reference = routed_reference(layer, s.inputs) if refit else None
        matrix = None
        if merged:
            permute_neurons(ctx.edits, layer, {j: alignment(layer, i, j) for j, (i, _) in merged.items()})
            mass = s.gate.double().clamp_min(1e-6)
            matrix = torch.zeros(len(kept), layer.n_experts, dtype=torch.float64)
            for r, i in enumerate(kept):
                matrix[r, i] = mass[i]
            for j, (i, c) in merged.items():
                matrix[kept.index(i), j] = c * mass[j]
            matrix = matrix / matrix.sum(1, keepdim=True)
        k_before = layer.top_k
        remove_experts(ctx.edits, layer, kept, merge=None if matrix is None else matrix.float())
        if rescale and not renormalises(layer) and len(kept) < layer.n_experts:
            down = layer.module.down_proj
            ctx.edits.set_param(layer.module, "down_proj", down * s.kept_mass(kept))
        set_top_k(ctx.edits, layer, min(top_k or k_before, len(kept)))
        if reference is not None:
            refit_down(ctx.edits, layer, s.inputs, reference)


def plan_choice(ctx, plan: ExpertPlan, target: ExpertsTarget):
    """Kept expert ids and merges of an ExpertPlan (ranks under its order → experts)."""
    layers = ctx.structure.expert_layers
    if len(plan.keep) != len(layers):
        raise ExpertsError(f"the plan has {len(plan.keep)} layers; the model has {len(layers)} MoE layers")
    order = ranking(ctx, plan.order, target)
    keep, merges = [], []
    for b, (layer, ranks) in enumerate(zip(layers, plan.keep)):
        if max(ranks) >= layer.n_experts:
            raise ExpertsError(f"the plan keeps rank {max(ranks)} of {layer.name}, which has {layer.n_experts} experts")
        kept = sorted(order[b][r] for r in ranks)
        merged = {}
        if plan.merge:
            into = merge_targets(layer, routing(ctx, target)[b].inputs, kept)
            for r, level in enumerate(plan.merge[b][:layer.n_experts]):
                j = order[b][r]
                if level and j not in kept:
                    merged[j] = (into[j], level / plan.levels * plan.max_merge)
        keep.append(kept)
        merges.append(merged)
    return keep, merges


def _top(ctx, scores: torch.Tensor, target: ExpertsTarget) -> list[list[int]]:
    """Kept expert ids per layer: the highest `scores` at the budget (each layer keeps at least its top-k)."""
    floor = [min(target.top_k or layer.top_k, layer.n_experts) for layer in ctx.structure.expert_layers]
    counts = allocate(scores, target, floor)
    return [sorted(torch.argsort(-row, stable=True)[:n].tolist()) for row, n in zip(scores, counts)]


def _by_score(name: str):
    def choice(ctx, target: ExpertsTarget) -> list[list[int]]:
        return _top(ctx, importance(ctx, Method(name), target), target)
    return choice


def _naee(ctx, target: ExpertsTarget) -> list[list[int]]:
    """NAEE: each layer's subset of the target's count whose output is closest to the dense layer's."""
    if target.allocation == "global":
        raise ExpertsError("naee chooses each layer's subset for a given count: use experts or per_layer, "
                           "not allocation 'global'")
    layers = ctx.structure.expert_layers
    return [sorted(naee_keep(layer, s.inputs, n, target.top_k or None, s.prob if target.rescale else None)[0])
            for layer, s, n in zip(layers, routing(ctx, target), _counts(target, layers))]


# the mode's methods: name -> (ctx, target) -> kept expert ids per layer (order: experts/plan.py's METHODS)
METHODS = {name: _naee if name == "naee" else _by_score(name) for name in EXPERT_METHODS}


def metric_choice(ctx, candidate, target: ExpertsTarget):
    """Kept expert ids (and heuristic merges) from a metric or method at the target's budget."""
    layers = ctx.structure.expert_layers
    stats = routing(ctx, target)
    if isinstance(candidate, Method):
        if candidate.name not in METHODS:
            raise unsupported("experts", candidate)
        keep = METHODS[candidate.name](ctx, target)
    else:
        keep = _top(ctx, importance(ctx, candidate, target), target)
    merges = [{} for _ in layers]
    if target.merge == "aligned":
        for b, (layer, s, kept) in enumerate(zip(layers, stats, keep)):
            merges[b] = {j: (i, target.merge_weight) for j, i in merge_targets(layer, s.inputs, kept).items()}
    return keep, merges


def apply_experts(ctx, candidate, target: ExpertsTarget) -> PruneReport:
    """Prune `ctx`'s MoE in place: experts removed (or merged) per the candidate at the budget."""
    t0 = time.perf_counter()
    check_experts(ctx, target)
    if isinstance(candidate, ExpertPlan):
        keep, merges = plan_choice(ctx, candidate, target)
    else:
        keep, merges = metric_choice(ctx, candidate, target)
    apply_choice(ctx, keep, merges, target.top_k, routing(ctx, target), target.rescale, target.merge == "refit")
    plan = {"keep": keep, "merge": [{str(j): [i, round(c, 6)] for j, (i, c) in m.items()} for m in merges],
            "top_k": [layer.top_k for layer in ctx.structure.expert_layers]}
    report = PruneReport(target, getattr(candidate, "name", "metric"))
    report.add_plan("experts", plan)
    _count_removed(ctx, report, keep)
    report.extra.update({"plan": plan, "experts_kept": sum(map(len, keep)) / len(keep),
                         "active_experts": sum(plan["top_k"]) / len(keep),
                         "merged": sum(len(m) for m in merges)})
    report.seconds = time.perf_counter() - t0
    ctx.log(f"experts: kept {[len(k) for k in keep]} per layer, top-k {plan['top_k'][0]}, "
            f"{report.extra['merged']} merged ({report.seconds:.1f}s)")
    return report


def _count_removed(ctx, report: PruneReport, keep: list[list[int]]) -> None:
    """Each expert unit of a removed expert counts whole as 'zeros' (the report's sparsity: the
    fraction of expert weights removed); other units count none."""
    kept = {(layer.block, e) for layer, ks in zip(ctx.structure.expert_layers, keep) for e in ks}
    for unit in ctx.units:
        if unit.expert is not None:
            report.add(unit, 0 if (unit.block, unit.expert) in kept else unit.weight.numel())


# ------------------------------------------------------------------ saving and loading
def save_experts(ctx, report: PruneReport, out) -> None:
    """The pruned MoE as a model of the same family: config with fewer experts and its top-k.
    Equal counts in every layer: a plain transformers checkpoint (from_pretrained loads it).
    Different counts: the largest in the config, the counts in a marker file (loaded by
    prunerzero, which slices each layer to its count before loading the weights strictly)."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    counts = [len(k) for k in report.extra["plan"]["keep"]]
    config = ctx.model.config.__class__.from_dict(ctx.model.config.to_dict())
    for attr in expert_count_attrs(config):
        setattr(config, attr, max(counts))
    config.num_experts_per_tok = max(report.extra["plan"]["top_k"])
    if len(set(counts)) == 1 and len(set(report.extra["plan"]["top_k"])) == 1:
        ctx.model.save_pretrained(out)
        config.save_pretrained(out)
        for stale in (MARKER, REAL_CONFIG):  # of an earlier save into the same directory
            (out / stale).unlink(missing_ok=True)
        return
    doc = {"format": 1, "experts": counts, "top_k": report.extra["plan"]["top_k"], "budget": report.target.describe()}
    save_reshaped(ctx.model, config, out, MARKER, "experts", doc)


def load_experts(path, dtype: torch.dtype):
    """A model the experts mode saved with different expert counts per layer."""
    def rebuild(model, plan, where: str) -> None:
        counts, top_k = plan
        edits = Edits()
        layers = ModelAdapter(model).structure.expert_layers
        _check_counts(counts, top_k, layers, where)
        for layer, n, k in zip(layers, counts, top_k):
            if n < layer.n_experts:
                remove_experts(edits, layer, list(range(n)))
            set_top_k(edits, layer, k)
    return load_reshaped(path, dtype, MARKER, lambda doc: (doc["experts"], doc["top_k"]), rebuild, ExpertsError,
                         "not what the experts mode wrote")


def _check_counts(counts, top_k, layers, where: str) -> None:
    """Kept experts and top-k per MoE layer, read from a file: integers in range; errors name the field."""
    for field, got in (("experts", counts), ("top_k", top_k)):
        if not isinstance(got, list) or len(got) != len(layers) or not all(type(n) is int for n in got):
            raise ExpertsError(f"{where}: field {field!r} must give an integer for each of the config's "
                               f"{len(layers)} MoE layers, got {got!r:.80}")
    for i, (layer, n, k) in enumerate(zip(layers, counts, top_k)):
        if not 1 <= n <= layer.n_experts or not 1 <= k <= n:
            raise ExpertsError(f"{where}: layer {i} keeps {n} of {layer.n_experts} experts with top_k {k}: "
                               "need 1 <= top_k <= experts <= the config's")
