"""A plan of the experts mode as a candidate: kept experts and merge coefficients per layer, by rank
under an order (a method of the mode or a metric) — plain data a driver without the model writes
(the EEP search, evolve/experts_problem.py), decoded by `candidates.decode` like every kind (the experts recipe names it)."""

from __future__ import annotations

from dataclasses import dataclass

from prunerzero.primitives.metric import resolve_metric

from ..candidates import CandidateError, _field

METHODS = ("frequency", "gate", "reap", "naee", "random")  # the experts mode's methods (pruning/experts/mode.py)


@dataclass(frozen=True)
class ExpertPlan:
    """Kept experts per layer as ranks under `order` (a method of this mode or a metric): rank 0
    is the expert `order` scores highest. `merge[l][r]` in [0, levels]: the rank-r expert, if
    removed, is merged into the kept expert its tokens go to next with coefficient
    merge / levels × max_merge (0: not merged)."""

    order: str
    keep: tuple[tuple[int, ...], ...]
    merge: tuple[tuple[int, ...], ...] = ()
    levels: int = 4
    max_merge: float = 1.0

    def __post_init__(self) -> None:
        if not self.keep or any(not k or len(set(k)) != len(k) or min(k) < 0 for k in self.keep):
            raise CandidateError(f"expert plan: every layer must keep distinct ranks >= 0, got {self.keep!r:.120}")
        if self.merge and (len(self.merge) != len(self.keep)
                           or any(g < 0 or g > self.levels for row in self.merge for g in row)):
            raise CandidateError(f"expert plan: merge levels must be in [0, {self.levels}], one row per layer")

    @property
    def needs(self) -> frozenset[str]:
        return frozenset() if self.order in METHODS else resolve_metric(self.order, allow_code=False).needs

    @property
    def order_key(self) -> str:
        return f"method:{self.order}" if self.order in METHODS else resolve_metric(self.order, allow_code=False).key

    @property
    def name(self) -> str:
        return f"expert plan ({self.order})"

    @property
    def key(self) -> str:
        keep = ";".join(",".join(map(str, k)) for k in self.keep)
        merge = ";".join(",".join(map(str, m)) for m in self.merge)
        return f"experts[{keep}|{merge}|{self.levels},{self.max_merge:g}]:{self.order_key}"

    @property
    def formula(self) -> str:
        merged = sum(g > 0 for row in self.merge for g in row)
        return f"<experts kept by {self.order} rank: {[len(k) for k in self.keep]}, {merged} merges>"

    def to_data(self) -> dict:
        return {"kind": "expert_plan", "order": self.order, "keep": [list(k) for k in self.keep],
                "merge": [list(m) for m in self.merge], "levels": self.levels, "max_merge": self.max_merge}

    @classmethod
    def from_data(cls, data: dict) -> ExpertPlan:
        """The plan plain data describes (the candidate kind `expert_plan`: Ray, run directories)."""
        rows = lambda name: tuple(tuple(int(g) for g in row) for row in _field(data, name, list))  # noqa: E731
        return cls(_field(data, "order", str), rows("keep"), rows("merge") if data.get("merge") else (),
                   int(data.get("levels", 4)), float(data.get("max_merge", 1.0)))
