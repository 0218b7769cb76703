"""The unstructured mode's target: a sparsity per comparison group or an N:M pattern, an optional
refit of the kept weights and a per-block allocation."""

from __future__ import annotations

from dataclasses import dataclass

from prunerzero.core.protocol import check_sparsity, parse_pattern

from ..masks import GROUPS
from .allocation import ALLOCATIONS

UPDATES = {"none": "", "obs": " + OBS update", "lsq": " + LSQ refit"}  # name -> in descriptions


@dataclass(frozen=True)
class PruneTarget:
    sparsity: float = 0.5  # fraction pruned per comparison group (ignored for N:M)
    pattern: str = "unstructured"  # or "N:M" (N kept of every M)
    group: str = "row"  # comparison group for unstructured: "row" or "layer"
    update: str = "none"  # the kept weights refit to the dense outputs: "obs" (SparseGPT's update) or "lsq" (exact)
    allocation: str = "uniform"  # or "owl": sparsity per block by outlier ratio (pruning/unstructured/allocation.py)

    def __post_init__(self) -> None:
        check_sparsity(self.sparsity)
        parse_pattern(self.pattern)
        if self.group not in GROUPS:
            raise ValueError(f"unknown comparison group {self.group!r}: use one of {', '.join(GROUPS)}")
        if self.update not in UPDATES:
            raise ValueError(f"unknown weight update {self.update!r}: use one of {', '.join(UPDATES)}")
        if self.allocation not in ALLOCATIONS:
            raise ValueError(f"unknown allocation {self.allocation!r}: use one of {', '.join(ALLOCATIONS)}")
        if self.allocation != "uniform" and self.nm is not None:
            raise ValueError(f"allocation {self.allocation!r} sets a sparsity per block; pattern {self.pattern} fixes it")

    @property
    def nm(self) -> tuple[int, int] | None:
        return parse_pattern(self.pattern)

    @property
    def expected_sparsity(self) -> float:
        return 1 - self.nm[0] / self.nm[1] if self.nm else self.sparsity

    def describe(self) -> str:
        base = f"{self.pattern}" if self.nm else f"{self.sparsity:g} unstructured per {self.group}"
        if self.allocation != "uniform":
            base += f", {self.allocation.upper()} allocation"
        return base + UPDATES[self.update]
