"""The skip mode's static removal set as a GA problem on the engine: which sublayers are removed for
every token at the target's ratio — searched directly, not ranked by a formula.

Why a set and not a metric: a sublayer's importance is not a sum of its weights' importances (a
metric reduced per sublayer ranks them far worse than ShortGPT or the removal loss, results/SKIP.md),
and even the best single-sublayer ranking ignores how removals interact — removing two sublayers
costs more or less than the two removal losses. A search over removal sets, seeded with the
hand-made rankings' choices, measures the interactions: its fitness is the model with the whole set
removed.

- genome: one gene per in-scope sublayer in block order (attention, MLP), 1 = removed; `repair`
  keeps exactly the target's count (too many: the removed ones the order ranks most important
  come back; too few: the kept ones it ranks least important go) — deterministic;
- seeds: the plans of the hand-made rankings (`problem.seeds`, ShortGPT and removal loss by
  default), computed once by the driver on the calibration the seeds name (evolve/problems.py);
- mutation: swaps a removed and a kept sublayer, the kept one drawn among the `span` the order
  ranks least important (0: any) — most sublayers are never worth removing, so the moves stay
  where the search can win; crossover: uniform, then repair.

Checkpoints, resume, the fitness cache, de-duplication and Ray come from the engine and the
campaign as for every problem; a candidate is a `SkipPlan` (pruning/skip/plan.py) as plain data.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

from prunerzero.core.fields import build
from prunerzero.pruning.skip.plan import SkipPlan

from .genome import Genome, MovesProblem

Name = tuple[int, str]


@dataclass(frozen=True)
class SkipPlanOptions:
    seeds: str = "removal,shortgpt"  # hand-made rankings whose plans are generation 0 (comma-separated)
    order: str = "removal"  # the ranking that repairs genomes and draws the moves
    span: int = 0  # a move removes one of the order's `span` least important kept sublayers (0: any)
    moves: int = 2  # a mutation makes up to this many swaps
    seq_len: int = 0  # the seeds' and order's calibration windows: 0 = the campaign's protocol
    calib_windows: int = 0


class SkipPlanProblem(MovesProblem):
    name = "skip_plan"
    columns = ("removed",)
    first_moves = 1  # a random individual differs from its seed

    def __init__(self, search, options: SkipPlanOptions, names: list[Name], count: int,
                 order: list[Name], seed_plans: list[list[Name]]):
        """`names`: the in-scope sublayers in block order; `count`: how many a plan removes;
        `order`: `names` from least to most important; `seed_plans`: the hand-made choices."""
        if sorted(order) != sorted(names) or not 0 < count < len(names):
            raise ValueError(f"skip_plan: the order must rank the {len(names)} sublayers and 0 < count {count} < them")
        if options.moves < 1 or options.span < 0:
            raise ValueError("problem.moves must be >= 1 and problem.span >= 0")
        self.options, self.names, self.count = options, list(names), count
        self.index = {n: i for i, n in enumerate(self.names)}
        self.rank = [0] * len(names)
        for r, n in enumerate(order):
            self.rank[self.index[n]] = r
        self.seed_plans = [self.genes(p) for p in seed_plans]
        if any(sum(g) != count for g in self.seed_plans):
            raise ValueError(f"skip_plan: every seed plan must remove {count} sublayers")
        super().__init__(search, len(names), 0, 1)

    @staticmethod
    def parse(options: dict) -> SkipPlanOptions:
        return build(SkipPlanOptions, dict(options), "problem", ValueError)

    def genes(self, plan) -> list[int]:
        chosen = {tuple(k) for k in plan}
        return [int(n in chosen) for n in self.names]

    # ------------------------------------------------------------ variation
    def seeds(self) -> list:
        return [Genome(g) for g in self.seed_plans]

    def start(self) -> list[int]:
        return list(self.seed_plans[0]) if self.seed_plans else self.repair([0] * self.length)

    def _move(self, ind) -> None:
        """Swap one removed sublayer for one kept, the kept one among the order's `span` least important."""
        removed = [i for i, g in enumerate(ind) if g]
        kept = sorted((i for i, g in enumerate(ind) if not g), key=self.rank.__getitem__)
        if self.options.span:
            kept = kept[:self.options.span]
        if removed and kept:
            ind[random.choice(removed)], ind[random.choice(kept)] = 0, 1

    def repair(self, genes: list[int]) -> list[int]:
        """Exactly `count` removed, by the order: the most important removed come back first, the
        least important kept go first (no randomness: a repaired genome depends on its genes only)."""
        genes = super().repair(genes)
        while sum(genes) > self.count:
            genes[max((i for i, g in enumerate(genes) if g), key=self.rank.__getitem__)] = 0
        while sum(genes) < self.count:
            genes[min((i for i, g in enumerate(genes) if not g), key=self.rank.__getitem__)] = 1
        return genes

    # ------------------------------------------------------------ meaning
    def plan(self, genes) -> SkipPlan:
        return SkipPlan(tuple(n for n, g in zip(self.names, genes) if g))

    def key(self, genes: list[int]) -> str:
        return self.plan(genes).key

    def candidate(self, ind) -> dict:
        return self.plan(list(ind)).to_data()

    def describe(self, ind) -> str:
        return self.plan(list(ind)).key

    def fields(self, ind) -> dict:
        return {"removed": " ".join(f"{b}:{k}" for b, k in self.plan(list(ind)).removed)}

    def size(self, ind) -> int:
        """Removed sublayers outside the first seed's plan: of equally fit plans the one closer to
        the hand-made choice keeps its fitness."""
        start = self.start()
        return sum(g and not s for g, s in zip(ind, start))
