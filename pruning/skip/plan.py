"""A static removal set of the skip mode as a candidate: the sublayers removed for every token, named
explicitly — plain data a driver without the model writes (the removal-set search,
evolve/skip_problem.py), decoded by `candidates.decode` like every kind (the skip recipe names it).

The set is explicit (block, kind) pairs rather than ranks under an order: an order's ranking
depends on its calibration tokens, so a rank set would mean other sublayers under another protocol,
corpus or calibration draw; an explicit set means the same removal everywhere on one model.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from ..candidates import CandidateError, _field

SUBLAYERS = ("attention", "mlp")
SHORT = {"attention": "a", "mlp": "m"}
LONG = {v: k for k, v in SHORT.items()}
KEY = re.compile(r"skip\[((?:[0-9]{1,6}[am])(?:,[0-9]{1,6}[am])*)?\]")  # a plan's key: skip[0a,3m,…]


@dataclass(frozen=True)
class SkipPlan:
    """Sublayers removed for every token, as sorted (block, "attention" | "mlp") pairs."""

    removed: tuple[tuple[int, str], ...]

    def __post_init__(self) -> None:
        ok = all(isinstance(k, tuple) and len(k) == 2 and type(k[0]) is int and k[0] >= 0 and k[1] in SUBLAYERS
                 for k in self.removed)
        if not ok or len(set(self.removed)) != len(self.removed):
            raise CandidateError(f"skip plan: removed must list distinct [block, \"attention\" | \"mlp\"] pairs, "
                                 f"got {self.removed!r:.120}")
        object.__setattr__(self, "removed", tuple(sorted(self.removed)))

    @property
    def name(self) -> str:
        return "skip plan"

    @property
    def key(self) -> str:
        return "skip[" + ",".join(f"{b}{SHORT[k]}" for b, k in self.removed) + "]"

    @property
    def formula(self) -> str:
        attn = sum(k == "attention" for _, k in self.removed)
        return f"<{len(self.removed)} sublayers removed ({attn} attention): {self.key}>"

    def to_data(self) -> dict:
        return {"kind": "skip_plan", "removed": [[b, k] for b, k in self.removed]}

    @classmethod
    def from_data(cls, data: dict) -> SkipPlan:
        """The plan plain data describes (the candidate kind `skip_plan`: Ray, run directories, exports)."""
        rows = _field(data, "removed", list)
        if not all(isinstance(r, list) and len(r) == 2 for r in rows):
            raise CandidateError(f"skip plan: removed must list [block, kind] pairs, got {rows!r:.120}")
        return cls(tuple((r[0], r[1]) for r in rows))

    @classmethod
    def from_key(cls, key: str) -> SkipPlan:
        """The plan its key names (a hall-of-fame row, read as data: the pattern is strict)."""
        if not isinstance(key, str) or not KEY.fullmatch(key):
            raise CandidateError(f"not a skip plan key: {key!r:.80}")
        body = key[len("skip["):-1]
        return cls(tuple((int(item[:-1]), LONG[item[-1]]) for item in body.split(",") if item))
