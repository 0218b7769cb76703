"""GA problems: fixed-length integer genomes through the same engine as the GP (same RNG stream,
checkpoints, exact resume, clone penalty, hall of fame, run directory).

`GenomeProblem` is the GA over genomes: uniform random genes, tournament selection, uniform
crossover, a mutation of the subclass's choosing, and a `repair` that maps any genome onto the
feasible ones (the GP's OOS has the same place: every offspring is prepared before evaluation).
A subclass says what a genome means: its `candidate` (plain data for an evaluator) and its key.

`AllocationProblem` (EvoPress-style) evolves one sparsity level per decoder block for a fixed
metric at a fixed total: a gene is a block's offset from the target in steps of `step`; the
genes sum to zero, so every genome has the target's total sparsity (blocks of equal size, as
in every decoder-only family here); mutation moves one level from one block to another.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass

from deap import base, creator, tools

from prunerzero.core.fields import build
from prunerzero.pruning.candidates import Allocation, allocation_key, data_metric

from .problem import Prepared

if not hasattr(creator, "PZGenome"):
    creator.create("PZGenome", list, fitness=creator.PZFitness)

Genome = creator.PZGenome


class GenomeProblem:
    """A GA over integer genomes of `length` genes in [low, high] (per gene or for all)."""

    name = "genome"
    columns = ("genes",)

    def __init__(self, search, length: int, low: int | Sequence[int], high: int | Sequence[int],
                 gene_prob: float = 0.1):
        if length < 1:
            raise ValueError(f"a genome needs at least one gene, got length {length}")
        self.search, self.length, self.gene_prob = search, length, gene_prob
        self.low = [low] * length if isinstance(low, int) else list(low)
        self.high = [high] * length if isinstance(high, int) else list(high)
        if len(self.low) != length or len(self.high) != length or any(a > b for a, b in zip(self.low, self.high)):
            raise ValueError(f"gene bounds {self.low} .. {self.high} do not fit {length} genes")

    def toolbox(self) -> base.Toolbox:
        tb = base.Toolbox()
        tb.register("individual", self.random_individual)
        tb.register("population", tools.initRepeat, list, tb.individual)
        tb.register("select", tools.selTournament, tournsize=self.search.tournament)
        tb.register("mate", tools.cxUniform, indpb=0.5)
        tb.register("mutate", self.mutate)
        return tb

    # ------------------------------------------------------------ variation (inside the engine's RNG)
    def random_individual(self) -> Genome:
        return Genome(random.randint(a, b) for a, b in zip(self.low, self.high))

    def mutate(self, ind):
        return tools.mutUniformInt(ind, self.low, self.high, self.gene_prob)

    def seeds(self) -> list:
        return []

    # ------------------------------------------------------------ meaning (subclasses)
    def repair(self, genes: list[int]) -> list[int]:
        return [min(max(g, a), b) for g, a, b in zip(genes, self.low, self.high)]

    def key(self, genes: list[int]) -> str:
        return "genome:" + ",".join(map(str, genes))

    def candidate(self, ind) -> str | dict:
        raise NotImplementedError

    # ------------------------------------------------------------ the engine's interface
    def prepare(self, ind) -> Prepared:
        ind[:] = self.repair(list(ind))
        ind.key = self.key(list(ind))
        return Prepared(ind)

    def describe(self, ind) -> str:
        return " ".join(map(str, ind))

    def size(self, ind) -> int:
        """Distance from the all-zero genome: the smallest of equally fit genomes keeps its fitness."""
        return sum(abs(g) for g in ind)

    def fields(self, ind) -> dict:
        return {"genes": " ".join(map(str, ind))}

    def encode(self, ind) -> list[int]:
        return [int(g) for g in ind]

    def decode(self, data: list) -> Genome:
        if not isinstance(data, list) or len(data) != self.length or not all(isinstance(g, int) for g in data):
            raise ValueError(f"a genome of {self.length} integers was expected, got {data!r:.80}")
        ind = Genome(data)
        ind.key = self.key(list(ind))
        return ind


class MovesProblem(GenomeProblem):
    """A GA whose variation is moves that keep a genome feasible (`_move`, the subclass's): a random
    individual is the start genome moved a few times, a mutation 1..`options.moves` moves."""

    first_moves = 0  # a random individual makes at least this many moves

    def start(self) -> list[int]:
        raise NotImplementedError

    def _move(self, ind) -> None:
        raise NotImplementedError

    def random_individual(self) -> Genome:
        ind = Genome(self.start())
        for _ in range(random.randint(self.first_moves, 2 * self.options.moves)):
            self._move(ind)
        return ind

    def mutate(self, ind):
        for _ in range(random.randint(1, self.options.moves)):
            self._move(ind)
        return (ind,)


@dataclass(frozen=True)
class AllocationOptions:
    metric: str = ""  # the metric the allocation applies (name, expression or exported file)
    levels: int = 4  # each block's sparsity moves at most this many steps from the target
    step: float = 0.02  # sparsity per level
    moves: int = 2  # a mutation moves up to this many levels between blocks
    blocks: int = 0  # 0: the model's number of decoder blocks


class AllocationProblem(MovesProblem):
    name = "allocation"

    def __init__(self, search, options: dict, sparsity: float, blocks: int):
        self.options = opts = build(AllocationOptions, dict(options), "problem", ValueError)
        if not opts.metric:
            raise ValueError("problem.metric: the allocation problem needs the metric it allocates (e.g. 'wanda')")
        if opts.levels < 1 or opts.step <= 0 or opts.moves < 1:
            raise ValueError("problem.levels, problem.step and problem.moves must be positive")
        if not 0 <= sparsity - opts.levels * opts.step or sparsity + opts.levels * opts.step >= 1:
            raise ValueError(f"problem.levels: sparsity {sparsity:g} ± {opts.levels} x {opts.step:g} leaves [0, 1)")
        self.sparsity = sparsity
        # fails now on a bad metric, not per candidate; a config is data: its metric never imports a file
        self.metric_key = data_metric(opts.metric, "problem.metric").key
        super().__init__(search, opts.blocks or blocks, -opts.levels, opts.levels)

    def start(self) -> list[int]:
        """Uniform allocation (random individuals are it with random level moves)."""
        return [0] * self.length

    def _move(self, ind) -> None:
        """One level from block j to block i (EvoPress's level switch): the total is unchanged."""
        i, j = random.sample(range(self.length), 2) if self.length > 1 else (0, 0)
        if i != j and ind[i] < self.high[i] and ind[j] > self.low[j]:
            ind[i] += 1
            ind[j] -= 1

    def seeds(self) -> list:
        return [Genome([0] * self.length)]  # the uniform allocation is always in generation 0

    def repair(self, genes: list[int]) -> list[int]:
        """Clip, then bring the sum back to zero by moving the most extreme genes one level at a
        time towards uniform (deterministic: a repaired offspring does not depend on the RNG)."""
        genes = super().repair(genes)
        while sum(genes) > 0:
            genes[genes.index(max(genes))] -= 1
        while sum(genes) < 0:
            genes[genes.index(min(genes))] += 1
        return genes

    def sparsities(self, genes) -> tuple[float, ...]:
        return tuple(round(self.sparsity + g * self.options.step, 10) for g in genes)

    def key(self, genes: list[int]) -> str:
        return allocation_key(self.sparsities(genes), self.metric_key)

    def candidate(self, ind) -> dict:
        return Allocation(self.options.metric, self.sparsities(ind)).to_data()

    def describe(self, ind) -> str:
        return "[" + " ".join(f"{s:.3g}" for s in self.sparsities(ind)) + "]"
