"""From per-weight scores to per-group scores: the reducer that lets one metric drive every mode.

A metric scores weights (one tensor per unit); a reducer, chosen by name, turns them into one
score per group — head, KV head, MLP channel group, expert, sublayer, block (models/structure.py):

    sum   Σ s over the group's weights            mean  Σ s / (number of weights)
    max   max s                                   norm  √(Σ s²)

Higher is more important, as for weights. `normalize` rescales each unit's scores before they
are pooled (Torch-Pruning's `_normalize`): a group spanning q rows and o columns otherwise adds
numbers of different scales. Reduction is vectorised per (unit, axis): each line (row or column)
of a unit is reduced once, then lines are summed into their groups with one index_add.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Mapping, Sequence

import torch

REDUCERS = ("sum", "mean", "max", "norm")
NORMALIZERS = ("none", "mean", "max")


@torch.no_grad()
def unit_scores(metric, unit, stats) -> torch.Tensor:
    """Scores for one unit, computed in float32 whatever the weight's dtype."""
    G, X = stats.for_unit(unit.name, metric.needs)
    dev = unit.weight.device
    G = G.to(dev, torch.float32) if G is not None else None
    X = X.to(dev, torch.float32) if X is not None else None
    return metric(unit.weight.float(), G, X)


def check_reducer(reducer: str, normalize: str = "none") -> None:
    if reducer not in REDUCERS:
        raise ValueError(f"unknown reducer {reducer!r}: use one of {', '.join(REDUCERS)}")
    if normalize not in NORMALIZERS:
        raise ValueError(f"unknown normalisation {normalize!r}: use one of {', '.join(NORMALIZERS)}")


def weight_scores(metric, stats, units) -> dict[str, torch.Tensor]:
    """The metric's float32 scores for each unit, by unit name."""
    return {u.name: unit_scores(metric, u, stats) for u in units}


def normalised(scores: torch.Tensor, normalize: str) -> torch.Tensor:
    if normalize == "none":
        return scores
    scale = scores.abs().mean() if normalize == "mean" else scores.abs().amax()
    return scores / scale if float(scale) > 0 else scores


def reduce_groups(groups: Sequence, scores: Mapping[str, torch.Tensor], reducer: str = "sum",
                  normalize: str = "none") -> torch.Tensor:
    """One float64 score per group from the per-weight `scores` of the units its parts slice."""
    check_reducer(reducer, normalize)
    n = len(groups)
    if n == 0:
        return torch.zeros(0, dtype=torch.float64)
    spans: dict[tuple[str, int], list[tuple[int, int, int]]] = defaultdict(list)
    units = {}
    for gid, group in enumerate(groups):
        for part in group.parts:
            spans[(part.unit.name, part.axis)].append((part.start, part.stop, gid))
            units[part.unit.name] = part.unit
    missing = sorted(name for name, _ in spans if name not in scores)
    if missing:
        raise KeyError(f"no scores for unit(s) {missing[:3]} of the groups")
    device = next(iter(scores.values())).device
    total = torch.zeros(n, dtype=torch.float64, device=device)
    squares = torch.zeros(n, dtype=torch.float64, device=device)
    count = torch.zeros(n, dtype=torch.float64, device=device)
    peak = torch.full((n,), -torch.inf, dtype=torch.float64, device=device)
    for (name, axis), unit_spans in spans.items():
        s = normalised(scores[name], normalize).double()
        other = 1 - axis
        for lines, gids in _line_groups(unit_spans, device):
            picked = s.index_select(axis, lines)
            total.index_add_(0, gids, picked.sum(other))
            squares.index_add_(0, gids, picked.square().sum(other))
            count.index_add_(0, gids, torch.full_like(gids, s.shape[other], dtype=torch.float64))
            peak.scatter_reduce_(0, gids, picked.amax(other), reduce="amax")
    if reducer == "sum":
        return total
    if reducer == "mean":
        return total / count.clamp(min=1)
    if reducer == "max":
        return peak
    return squares.sqrt()


def _line_groups(spans: list[tuple[int, int, int]], device):
    """(line indices, group id per line) batches in which no line appears twice (groups of
    different kinds may overlap; index_add handles repeated group ids, not repeated lines)."""
    batches: list[list[tuple[int, int, int]]] = []
    for span in sorted(spans):
        for batch in batches:
            if batch[-1][1] <= span[0]:
                batch.append(span)
                break
        else:
            batches.append([span])
    for batch in batches:
        starts = torch.tensor([a for a, _, _ in batch], device=device)
        lengths = torch.tensor([b - a for a, b, _ in batch], device=device)
        gids = torch.tensor([g for _, _, g in batch], device=device).repeat_interleave(lengths)
        offsets = torch.arange(int(lengths.sum()), device=device) - torch.repeat_interleave(
            lengths.cumsum(0) - lengths, lengths)
        yield starts.repeat_interleave(lengths) + offsets, gids


def group_scores(metric, stats, groups: Sequence, reducer: str = "sum", normalize: str = "none") -> torch.Tensor:
    """Scores of `groups` under `metric` (any metric: built-in, expression, exported file, found
    by a campaign): weight scores of the units the groups touch, reduced per group."""
    check_reducer(reducer, normalize)
    units = {p.unit.name: p.unit for g in groups for p in g.parts}
    return reduce_groups(groups, weight_scores(metric, stats, units.values()), reducer, normalize)
