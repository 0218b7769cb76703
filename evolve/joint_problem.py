"""`problem = "joint"`: the metric and the per-block sparsity allocation evolved together, one
individual carrying both (OptiShear's joint search; the GP of `MetricProblem` and the genes of
`AllocationProblem` in one genome).

An individual is a metric tree (GP variation, OOS, constants and their refinement as
`MetricProblem`) with a `genes` attribute: one offset per decoder block from the target
sparsity in steps of `step`, summing to zero, so every individual has the target's total
(`AllocationProblem`'s encoding and repair). Crossover crosses the trees (one point) and the
genes (uniform); a mutation changes the allocation with probability `mutate_allocation`,
otherwise the tree. Its key is the allocation's key over the metric's canonical key, so two
individuals that differ only in how a tree is written share one fitness-cache entry.
"""

from __future__ import annotations

import dataclasses
import random
from dataclasses import dataclass

from deap import tools

from prunerzero.core.fields import build
from prunerzero.pruning.candidates import Allocation, allocation_key

from .genome import AllocationOptions, AllocationProblem
from .problem import MetricOptions, MetricProblem, Prepared


@dataclass(frozen=True)
class JointOptions:
    levels: int = 4  # each block's sparsity moves at most this many steps from the target
    step: float = 0.02  # sparsity per level
    moves: int = 2  # an allocation mutation moves up to this many levels between blocks
    blocks: int = 0  # 0: the model's number of decoder blocks
    mutate_allocation: float = 0.5  # a mutation changes the allocation (else the tree) with this probability
    start_uniform: float = 0.5  # share of generation 0 that starts at the uniform allocation


class JointProblem(MetricProblem):
    name = "joint"
    columns = ("size", "depth", "genes")

    def __init__(self, search, options: dict, sparsity: float, blocks: int):
        options = dict(options)
        metric_keys = {f.name for f in dataclasses.fields(MetricOptions)}
        super().__init__(search, {k: v for k, v in options.items() if k in metric_keys})
        self.joint = build(JointOptions, {k: v for k, v in options.items() if k not in metric_keys}, "problem",
                           ValueError)
        if not 0 <= self.joint.mutate_allocation <= 1 or not 0 <= self.joint.start_uniform <= 1:
            raise ValueError("problem.mutate_allocation and problem.start_uniform are probabilities in [0, 1]")
        j = self.joint
        # the allocation half: its checks, moves, repair and sparsities ("wanda" only passes its
        # metric check: the metric applied is each individual's tree)
        self.allocation = AllocationProblem(search, dataclasses.asdict(AllocationOptions(
            metric="wanda", levels=j.levels, step=j.step, moves=j.moves, blocks=j.blocks)), sparsity, blocks)

    # ------------------------------------------------------------ variation
    def toolbox(self):
        tb = super().toolbox()
        tree_individual, tree_mate, tree_mutate = tb.individual, tb.mate, tb.mutate

        def individual():
            ind = tree_individual()
            uniform = random.random() < self.joint.start_uniform
            ind.genes = self.allocation.start() if uniform else list(self.allocation.random_individual())
            return ind

        def mate(a, b):
            a, b = tree_mate(a, b)  # the size limits may hand back copies of the parents
            tools.cxUniform(a.genes, b.genes, indpb=0.5)
            return a, b

        def mutate(ind):
            if random.random() < self.joint.mutate_allocation:
                self.allocation.mutate(ind.genes)
                return (ind,)
            return tree_mutate(ind)

        tb.register("individual", individual)
        tb.register("population", tools.initRepeat, list, tb.individual)
        tb.register("mate", mate)
        tb.register("mutate", mutate)
        return tb

    # ------------------------------------------------------------ meaning
    def prepare(self, ind) -> Prepared:
        genes = self.allocation.repair(list(ind.genes))
        outcome = super().prepare(ind)
        out = outcome.individual
        out.genes = genes
        out.key = allocation_key(self.allocation.sparsities(genes), out.key)
        return Prepared(out, outcome.rejected)

    def candidate(self, ind) -> dict:
        return Allocation(str(ind), self.allocation.sparsities(ind.genes)).to_data()

    def describe(self, ind) -> str:
        return f"{ind} @ {self.allocation.describe(ind.genes)}"

    def fields(self, ind) -> dict:
        return {**super().fields(ind), "genes": " ".join(map(str, ind.genes))}

    def encode(self, ind) -> dict:
        return {"tree": str(ind), "genes": [int(g) for g in ind.genes]}

    def decode(self, data: dict):
        if not isinstance(data, dict) or not isinstance(data.get("tree"), str):
            raise ValueError(f"a joint individual {{'tree': ..., 'genes': [...]}} was expected, got {data!r:.80}")
        genes = list(self.allocation.decode(data.get("genes")))  # checks the length and the types
        ind = super().decode(data["tree"])
        ind.genes = genes
        ind.key = allocation_key(self.allocation.sparsities(genes), ind.key)
        return ind

    def refinements(self, ind) -> list:
        variants = super().refinements(ind)
        for v in variants:
            v.genes = list(ind.genes)
        return variants

