"""The unstructured mode: weights zeroed in place by a metric (per output row, per layer, or N:M),
with one-shot or sequential statistics; SparseGPT as its method; a per-block sparsity allocation
and given masks as its other candidates.
"""

from __future__ import annotations

import time
from dataclasses import asdict

import torch

from prunerzero.primitives.stats import ActivationAccumulator, LayerStats, x_for_units

from ..candidates import Allocation, MaskSet, Method
from ..masks import check_pattern_fits, select_mask, zero_masked
from ..recipe import option_list, option_number, unsupported
from ..reduce import unit_scores
from ..report import PruneReport
from ..sequential import run_sequential
from .allocation import owl_sparsities
from .sparsegpt import prune_sparsegpt, prune_with_metric_update
from .target import PruneTarget


@torch.no_grad()
def prune_with_metric(units, stats, metric, target: PruneTarget, report: PruneReport | None = None,
                      sparsity_of: dict[int, float] | None = None) -> PruneReport:
    """Zero, in every unit, the weights the metric scores lowest within each comparison group.
    With `report`, the units are added to it (sequential pruning's one report for all blocks).
    `sparsity_of`: block index -> sparsity, overriding the target's (an allocation)."""
    check_pattern_fits({u.name: u.shape for u in units}, target.nm)
    missing = [t for t in metric.needs if not stats.has(t)]
    if missing:
        raise ValueError(f"metric {metric.name!r} needs statistic(s) {missing} that were not collected")
    t0 = time.perf_counter()
    if report is None:
        report = PruneReport(target=target, method=getattr(metric, "name", str(metric)))
    for unit in units:
        sparsity = sparsity_of[unit.block] if sparsity_of else target.sparsity
        mask = select_mask(unit_scores(metric, unit, stats), sparsity, target.nm, target.group, unit.name)
        zero_masked(unit.weight, mask)
        report.add_mask(unit.name, mask)
    report.add_units(units)
    report.seconds += time.perf_counter() - t0
    return report


def prune_with_metric_sequential(model, adapter, windows: torch.Tensor, metric, target: PruneTarget,
                                 dense_stats=None, batch_size: int = 8,
                                 sparsity_of: dict[int, float] | None = None) -> PruneReport:
    """Metric pruning with sequential statistics: block i's X comes from the outputs of blocks
    0..i-1 as already pruned (official Wanda's schedule). G, when the metric needs it, is the
    dense model's (as GBLM-Pruner and Pruner-Zero compute it)."""
    report = PruneReport(target=target, method=getattr(metric, "name", str(metric)))
    t0 = time.perf_counter()

    def process_block(i: int, run_block) -> None:
        acc = ActivationAccumulator()
        with adapter.capture(acc, blocks=[i]):
            run_block()
        units = adapter.block_units(i)
        stats = LayerStats(X=x_for_units(units, acc), G=dense_stats.G if dense_stats else {})
        prune_with_metric(units, stats, metric, target, report, sparsity_of)

    check_pattern_fits({u.name: u.shape for u in adapter.prunable()}, target.nm)
    run_sequential(model, adapter, windows, process_block, batch_size)
    report.seconds = time.perf_counter() - t0
    return report


@torch.no_grad()
def prune_with_masks(units, masks, target: PruneTarget) -> PruneReport:
    """Zero the weights given masks mark (True = pruned); units without a mask stay dense."""
    unknown = sorted(set(masks) - {u.name for u in units})
    if unknown:
        raise ValueError(f"masks for unknown unit(s) {unknown[:3]}")
    report = PruneReport(target=target, method="masks")
    given = [u for u in units if u.name in masks]
    for unit in given:
        mask = masks[unit.name].to(unit.weight.device, torch.bool)
        if mask.shape != unit.shape:
            raise ValueError(f"mask for {unit.name} has shape {tuple(mask.shape)}, the weight {tuple(unit.shape)}")
        zero_masked(unit.weight, mask)
        report.add_mask(unit.name, mask)
    report.add_units(given)
    return report


def _sparsegpt(ctx, target: PruneTarget) -> PruneReport:
    return prune_sparsegpt(ctx.model, ctx.adapter, ctx.calibration, target)


METHODS = {"sparsegpt": _sparsegpt}  # name -> (ctx, target) -> PruneReport
METHOD_STATS = {"sparsegpt": "sequential"}  # SparseGPT calibrates block by block, whatever the protocol


def leaderboard_targets(options) -> list[dict]:
    """Each unstructured sparsity (`--sparsity`) and each N:M pattern once (`--pattern`), per `--group`."""
    sparsities = [option_number(s, "--sparsity") for s in option_list(options.get("sparsity") or "0.5")]
    return unstructured_targets(sparsities, option_list(options.get("pattern") or "unstructured"),
                                options.get("group") or "row")


def unstructured_targets(sparsities, patterns, group: str = "row") -> list[dict]:
    """Targets of the unstructured mode: each unstructured sparsity, and each N:M pattern once."""
    out = []
    for pattern in patterns:
        if pattern.strip().lower() == "unstructured":
            out += [asdict(PruneTarget(s, "unstructured", group)) for s in sparsities]
        else:
            out.append(asdict(PruneTarget(0.0, pattern, group)))
    return out


def check_unstructured(ctx, target: PruneTarget) -> None:
    check_pattern_fits({u.name: u.shape for u in ctx.units}, target.nm)


def apply_unstructured(ctx, candidate, target: PruneTarget) -> PruneReport:
    """Prune `ctx`'s model in place with a metric, a method, an allocation or masks."""
    if isinstance(candidate, Method):
        if candidate.name not in METHODS:
            raise unsupported("unstructured", candidate)
        return METHODS[candidate.name](ctx, target)
    if isinstance(candidate, MaskSet):
        return prune_with_masks(ctx.units, candidate.masks, target)
    sparsity_of = None
    if isinstance(candidate, Allocation):
        sparsity_of = _block_sparsities(ctx, candidate, target)
        candidate = candidate.resolved
    if not callable(candidate) or not hasattr(candidate, "needs"):
        raise unsupported("unstructured", candidate)
    stats = ctx.stats(candidate.needs | ({"X"} if target.allocation == "owl" else set()))
    if target.allocation == "owl" and sparsity_of is None:
        sparsity_of = owl_sparsities(ctx.units, stats, target.sparsity)
    if target.update != "none":
        return prune_with_metric_update(ctx.model, ctx.adapter, ctx.calibration, candidate, target, stats,
                                        sparsity_of=sparsity_of)
    if ctx.stats_mode == "sequential":
        return prune_with_metric_sequential(ctx.model, ctx.adapter, ctx.calibration, candidate, target, stats,
                                            sparsity_of=sparsity_of)
    return prune_with_metric(ctx.units, stats, candidate, target, sparsity_of=sparsity_of)


def _block_sparsities(ctx, allocation: Allocation, target: PruneTarget) -> dict[int, float]:
    blocks = len(ctx.adapter.blocks)
    if target.nm is not None:
        raise ValueError(f"an allocation sets a sparsity per block; pattern {target.pattern} fixes it at "
                         f"{target.expected_sparsity:g}")
    if len(allocation.sparsities) != blocks:
        raise ValueError(f"allocation has {len(allocation.sparsities)} sparsities for {blocks} blocks")
    return dict(enumerate(allocation.sparsities))
