"""Metric-driven weight pruning (unstructured and N:M) applied in place, and the exact way back.

Shape shared by every pruning mode: (model adapter, statistics, metric, target) → report.
"""

from __future__ import annotations

import time

import torch

from .masks import check_pattern_fits, select_mask, zero_masked
from .sequential import run_sequential
from .target import PruneReport, PruneTarget


class DenseSnapshot:
    """A copy of the prunable weights taken once; `restore()` writes them back bit-identically.
    An evaluator keeps one for its lifetime: one extra copy of the pruned weights, never one per
    candidate."""

    def __init__(self, units, device: str | torch.device | None = None) -> None:
        self.units = list(units)
        self.copies = [u.weight.detach().to(device or u.weight.device, copy=True) for u in self.units]

    @torch.no_grad()
    def restore(self) -> None:
        for u, w in zip(self.units, self.copies):
            u.weight.copy_(w)


@torch.no_grad()
def unit_scores(metric, unit, stats) -> torch.Tensor:
    """Scores for one unit, computed in float32 whatever the weight's dtype."""
    G, X = stats.for_unit(unit.name, metric.needs)
    dev = unit.weight.device
    G = G.to(dev, torch.float32) if G is not None else None
    X = X.to(dev, torch.float32) if X is not None else None
    return metric(unit.weight.float(), G, X)


@torch.no_grad()
def prune_with_metric(units, stats, metric, target: PruneTarget, report: PruneReport | None = None) -> PruneReport:
    """Zero, in every unit, the weights the metric scores lowest within each comparison group.
    With `report`, the units are added to it (sequential pruning's one report for all blocks)."""
    check_pattern_fits({u.name: u.shape for u in units}, target.nm)
    missing = [t for t in metric.needs if not stats.has(t)]
    if missing:
        raise ValueError(f"metric {metric.name!r} needs statistic(s) {missing} that were not collected")
    t0 = time.perf_counter()
    if report is None:
        report = PruneReport(target=target, method=getattr(metric, "name", str(metric)))
    for unit in units:
        mask = select_mask(unit_scores(metric, unit, stats), target.sparsity, target.nm, target.group, unit.name)
        zero_masked(unit.weight, mask)
        report.add_mask(unit.name, mask)
    report.add_units(units)
    report.seconds += time.perf_counter() - t0
    return report


def prune_with_metric_sequential(model, adapter, windows: torch.Tensor, metric, target: PruneTarget,
                                 dense_stats=None, batch_size: int = 8) -> PruneReport:
    """Metric pruning with sequential statistics: block i's X comes from the outputs of blocks
    0..i-1 as already pruned (official Wanda's schedule). G, when the metric needs it, is the
    dense model's (as GBLM-Pruner and Pruner-Zero compute it)."""
    from prunerzero.primitives.stats import ActivationAccumulator, LayerStats, x_for_units

    report = PruneReport(target=target, method=getattr(metric, "name", str(metric)))
    t0 = time.perf_counter()

    def process_block(i: int, run_block) -> None:
        acc = ActivationAccumulator()
        with adapter.capture(acc, blocks=[i]):
            run_block()
        units = adapter.block_units(i)
        stats = LayerStats(X=x_for_units(units, acc), G=dense_stats.G if dense_stats else {})
        prune_with_metric(units, stats, metric, target, report)

    check_pattern_fits({u.name: u.shape for u in adapter.prunable()}, target.nm)
    run_sequential(model, adapter, windows, process_block, batch_size)
    report.seconds = time.perf_counter() - t0
    return report
