"""EEP (Efficient Expert Pruning) as a GA problem on the engine: which experts each MoE layer keeps,
and how the removed ones are merged into the kept ones — gradient-free, fitness on the valid split.

Genes refer to experts by *rank* under an order (a method of the experts mode or a metric,
`problem.order`): gene r of layer l is about the expert the order ranks r-th in layer l. So the
driver needs no model, and the metric-driven choice — keep ranks 0..n-1, merge nothing — is the
genome every campaign starts from (a seed in generation 0).

- stage "prune" (EEP stage 1: a one-hot router remap): E genes per layer in {0, 1}, kept or not;
  `repair` keeps exactly the layer's budget (too many: the lowest-ranked kept ones go; too few:
  the highest-ranked removed ones come back); mutation swaps kept and removed experts in a layer.
- stage "merge" (EEP stage 2): the kept experts fixed (`problem.keep`, default the order's
  choice); E genes per layer in [0, levels]: the merge coefficient of each removed expert into
  the kept expert its tokens go to next (level / levels × max_merge; 0: not merged); mutation
  perturbs a few levels by ±1.
- crossover is row-wise: each layer's genes come whole from one parent or the other (a layer's
  keep set stays feasible, as EEP crosses rows of its merge matrices).

Checkpoints, resume, the fitness cache, de-duplication and Ray come from the engine and the
campaign as for every problem; a candidate is an `ExpertPlan` (pruning/experts/mode.py) as plain data.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

from prunerzero.core.fields import build
from prunerzero.pruning.experts.plan import ExpertPlan

from .genome import Genome, MovesProblem

STAGES = ("prune", "merge")


@dataclass(frozen=True)
class ExpertsOptions:
    order: str = "reap"  # the method or metric whose ranking genes refer to (its choice is the seed)
    stage: str = "prune"  # "prune": keep sets evolve; "merge": merge coefficients evolve for fixed keep sets
    keep: str = ""  # stage "merge": kept ranks per layer, "0,1,2,3;0,1,2,5;…" (empty: ranks 0..n-1)
    levels: int = 4  # merge coefficient levels: level / levels × max_merge
    max_merge: float = 1.0
    moves: int = 2  # a mutation makes up to this many swaps (prune) or ±1 steps (merge)
    layers: int = 0  # 0: the model's MoE layers (from its config)
    experts: int = 0  # 0: the model's routed experts per layer


class ExpertsProblem(MovesProblem):
    name = "experts"

    def __init__(self, search, options: dict, counts: list[int], experts: int):
        self.options = opts = build(ExpertsOptions, dict(options), "problem", ValueError)
        if opts.stage not in STAGES:
            raise ValueError(f"problem.stage: unknown stage {opts.stage!r}; stages: {', '.join(STAGES)}")
        if opts.levels < 1 or opts.max_merge <= 0 or opts.moves < 1:
            raise ValueError("problem.levels, problem.max_merge and problem.moves must be positive")
        if any(not 1 <= n <= experts for n in counts):
            raise ValueError(f"the experts kept per layer {counts} must be in [1, {experts}]")
        ExpertPlan(opts.order, tuple((0,) for _ in counts)).order_key  # a bad order fails now, not per candidate
        self.counts, self.E = list(counts), experts
        self.fixed = self._fixed_keep(opts.keep) if opts.stage == "merge" else None
        high = 1 if opts.stage == "prune" else opts.levels
        super().__init__(search, len(counts) * experts, 0, high, gene_prob=1.0 / experts)

    def _fixed_keep(self, text: str) -> list[list[int]]:
        if not text.strip():
            return [list(range(n)) for n in self.counts]
        try:
            keep = [[int(r) for r in layer.split(",")] for layer in text.split(";")]
        except ValueError:
            raise ValueError(f"problem.keep {text[:60]!r}: write kept ranks per layer, '0,1,2,3;0,1,2,5;…'") from None
        if [len(k) for k in keep] != self.counts or any(max(k) >= self.E or len(set(k)) != len(k) for k in keep):
            raise ValueError(f"problem.keep: each layer must keep its budget {self.counts} of distinct ranks < {self.E}")
        return keep

    # ------------------------------------------------------------ layers of the genome
    def rows(self, genes) -> list[list[int]]:
        return [list(genes[b * self.E:(b + 1) * self.E]) for b in range(len(self.counts))]

    def toolbox(self):
        tb = super().toolbox()
        tb.register("mate", self.cross_rows)
        return tb

    def cross_rows(self, a, b):
        """Row-wise crossover: each layer's genes swapped whole between the parents (p = 1/2)."""
        for layer in range(len(self.counts)):
            if random.random() < 0.5:
                s = slice(layer * self.E, (layer + 1) * self.E)
                a[s], b[s] = b[s], a[s]
        return a, b

    # ------------------------------------------------------------ variation
    first_moves = 1  # a random individual differs from the seed

    def seeds(self) -> list:
        return [Genome(self.start())]

    def start(self) -> list[int]:
        """The order's choice: ranks 0..n-1 kept (prune), nothing merged (merge)."""
        if self.fixed is None:
            return [int(r < n) for n in self.counts for r in range(self.E)]
        return [0] * self.length

    def _move(self, ind) -> None:
        layer = random.randrange(len(self.counts))
        base = layer * self.E
        if self.fixed is None:  # swap a kept and a removed expert
            kept = [r for r in range(self.E) if ind[base + r]]
            gone = [r for r in range(self.E) if not ind[base + r]]
            if kept and gone:
                ind[base + random.choice(kept)], ind[base + random.choice(gone)] = 0, 1
        else:  # perturb one removed expert's merge level
            gone = [r for r in range(self.E) if r not in self.fixed[layer]]
            if gone:
                g = base + random.choice(gone)
                ind[g] = min(max(ind[g] + random.choice((-1, 1)), 0), self.options.levels)

    def repair(self, genes: list[int]) -> list[int]:
        """Each layer made feasible, deterministically: exactly its budget of kept ranks (prune),
        or no merge level on a kept expert (merge)."""
        genes = super().repair(genes)
        out = []
        for layer, row in enumerate(self.rows(genes)):
            if self.fixed is None:
                n = self.counts[layer]
                while sum(row) > n:
                    row[max(r for r in range(self.E) if row[r])] = 0
                while sum(row) < n:
                    row[min(r for r in range(self.E) if not row[r])] = 1
            else:
                row = [0 if r in self.fixed[layer] else g for r, g in enumerate(row)]
            out += row
        return out

    # ------------------------------------------------------------ meaning
    def plan(self, genes) -> ExpertPlan:
        rows = self.rows(genes)
        if self.fixed is None:
            keep = tuple(tuple(r for r in range(self.E) if row[r]) for row in rows)
            merge = ()
        else:
            keep, merge = tuple(tuple(k) for k in self.fixed), tuple(tuple(row) for row in rows)
        o = self.options
        return ExpertPlan(o.order, keep, merge, o.levels, o.max_merge)

    def key(self, genes: list[int]) -> str:
        return self.plan(genes).key

    def candidate(self, ind) -> dict:
        return self.plan(list(ind)).to_data()

    def describe(self, ind) -> str:
        rows = self.rows(list(ind))
        if self.fixed is None:
            return ";".join(",".join(str(r) for r in range(self.E) if row[r]) for row in rows)
        return ";".join(",".join(map(str, row)) for row in rows)

    def size(self, ind) -> int:
        """Distance from the seed (the order's own choice): kept ranks beyond the budget, or the
        total merge level — of equally fit plans the one closer to the metric's keeps its fitness."""
        if self.fixed is None:
            return sum(r >= n for n, row in zip(self.counts, self.rows(list(ind))) for r in range(self.E) if row[r])
        return sum(ind)
