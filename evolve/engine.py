"""The evolution loop. It calls toolbox aliases only (DEAP's machinery does the work) and one
fitness function; it knows nothing of models, files or Ray.

A generation: tournament selection, `varAnd` (subtree crossover; point or subtree mutation),
both under static depth and size limits; Opposing Operation Simplification of every changed
offspring (a rejected one is redrawn at random); fitness of the new ones; elites from the hall
of fame carried over unchanged.

Reproducibility. Every random draw of the search happens inside `_rng()`, which swaps the
engine's own `random` state in and out: whatever else consumes Python's global `random`
(Ray, a library, a cache hit that skips work) cannot shift the search, so the same seed gives
the same campaign on any backend, and `state_dict` / `load_state_dict` resume it exactly.
"""

from __future__ import annotations

import random
import statistics
import time
from contextlib import contextmanager
from typing import Callable

import numpy as np
import torch
from deap import algorithms, base, gp, tools

from prunerzero.fitness.evaluator import WORST_FITNESS
from prunerzero.primitives.metric import Metric

from .config import SearchConfig
from .evaluation import Measured
from .problem import Individual, from_node, from_string, height, operator_set, primitive_set, to_node
from .simplify import simplify

FitnessFn = Callable[[list[tuple[str, str]]], list[Measured]]


def mutate(individual, expr, pset, point_prob: float):
    """Point mutation (one node replaced by another of the same arity) or subtree mutation."""
    if random.random() < point_prob:
        return gp.mutNodeReplacement(individual, pset)
    return gp.mutUniform(individual, expr, pset)


def make_toolbox(search: SearchConfig) -> base.Toolbox:
    pset = primitive_set(search.operators)
    tb = base.Toolbox()
    tb.register("expr", gp.genHalfAndHalf, pset=pset, min_=search.init_min_depth, max_=search.init_max_depth)
    tb.register("individual", tools.initIterate, Individual, tb.expr)
    tb.register("population", tools.initRepeat, list, tb.individual)
    tb.register("select", tools.selTournament, tournsize=search.tournament)
    tb.register("mate", gp.cxOnePoint)
    tb.register("expr_mut", gp.genFull, min_=0, max_=2)
    tb.register("mutate", mutate, expr=tb.expr_mut, pset=pset, point_prob=search.point_mutation)
    for op in ("mate", "mutate"):
        tb.decorate(op, gp.staticLimit(key=height, max_value=search.max_depth))
        tb.decorate(op, gp.staticLimit(key=len, max_value=search.max_size))
    ops = frozenset(operator_set(search.operators))
    tb.register("simplify", lambda ind: simplify(to_node(ind), ops, search.max_depth, search.max_size))
    tb.register("from_node", from_node, pset=pset)
    return tb


def _same_key(a, b) -> bool:
    return a.key == b.key


class Engine:
    def __init__(self, search: SearchConfig, fitness: FitnessFn, extra_stats: Callable[[], dict] = dict):
        """`extra_stats()` is called once per generation; its fields join the logbook record."""
        self.search, self.fitness, self.extra_stats = search, fitness, extra_stats
        self.toolbox = make_toolbox(search)
        self.population: list = []
        self.hof = tools.HallOfFame(search.hall_of_fame, similar=_same_key)
        self.logbook = tools.Logbook()
        self.generation = -1  # the last completed generation
        self.first_seen: dict[str, int] = {}  # canonical key -> generation it was first evaluated
        self.rng_state = random.Random(search.seed).getstate()
        # per generation: OOS rejections, individuals needing fitness, phenotypic clones penalised
        self._rejected = self._offspring = self._clones = 0

    @property
    def done(self) -> bool:
        return self.generation >= self.search.generations

    @contextmanager
    def _rng(self):
        outer = random.getstate()
        random.setstate(self.rng_state)
        try:
            yield
        finally:
            self.rng_state = random.getstate()
            random.setstate(outer)

    # ------------------------------------------------------------ the loop
    def step(self) -> dict:
        """Run the next generation (generation 0 is the initial population); return its record."""
        start = time.perf_counter()
        if self.generation < 0:
            np.random.seed(self.search.seed)
            torch.manual_seed(self.search.seed)
            with self._rng():
                offspring = self.toolbox.population(n=self.search.population)
            elites = []
        else:
            elites = [self.toolbox.clone(h) for h in self.hof[: self.search.elites]]
            with self._rng():
                parents = self.toolbox.select(self.population, len(self.population) - len(elites))
                offspring = algorithms.varAnd(parents, self.toolbox, self.search.cx_prob, self.search.mut_prob)
        self.generation += 1
        offspring = self._simplify(offspring)
        self._evaluate(offspring)
        if self.search.clone_penalty:
            self._penalise_clones(offspring)
        self.population = offspring + elites
        self.hof.update(self.population)
        return self._record(time.perf_counter() - start)

    def _simplify(self, individuals: list) -> list:
        """OOS on every individual without a valid fitness; redraw the rejected ones."""
        out = []
        for ind in individuals:
            if not ind.fitness.valid:
                self._offspring += 1
                ind = self._oos(ind)
            out.append(ind)
        return out

    def _oos(self, ind):
        outcome = self.toolbox.simplify(ind)
        for _ in range(self.search.max_redraws):
            if outcome.ok:
                break
            self._rejected += 1
            with self._rng():
                ind = self.toolbox.individual()
            outcome = self.toolbox.simplify(ind)
        if outcome.ok:
            new = self.toolbox.from_node(outcome.tree)
            new.key = outcome.key
            return new
        self._rejected += 1
        ind.key = outcome.key
        ind.fitness.values = (0, WORST_FITNESS)  # still rejected after the redraws: never evaluated
        return ind

    def _evaluate(self, individuals: list) -> None:
        todo = [ind for ind in individuals if not ind.fitness.valid]
        measured = self.fitness([(ind.key, str(ind)) for ind in todo])
        for ind, m in zip(todo, measured):
            ind.fitness.values = (m.windows, m.result.fitness)
            self.first_seen.setdefault(ind.key, self.generation)

    def _penalise_clones(self, offspring: list) -> None:
        """Phenotypic de-duplication. Pruning depends only on the order a metric puts weights in,
        so different formulas with the same order (abs(W), sqrt(W), tanh(abs(W)) …) measure
        exactly the same perplexity; left alone, such clones fill the population and end the
        search's diversity. An offspring whose fitness equals a hall-of-fame member's or a
        smaller offspring's gets the worst fitness for selection (the cache keeps the true one)."""
        seen = {h.fitness.values for h in self.hof}
        for ind in sorted(offspring, key=len):  # stable: the smallest of equals keeps its fitness
            values = ind.fitness.values
            if values[1] >= WORST_FITNESS:
                continue
            if values in seen:
                ind.fitness.values = (values[0], WORST_FITNESS)
                self._clones += 1
            else:
                seen.add(values)

    def _record(self, wall_s: float) -> dict:
        best = self.hof[0]
        # the median of what was measured: penalised clones and rejects would make it meaningless
        perplexities = [v for v in (ind.fitness.values[1] for ind in self.population) if v < WORST_FITNESS] \
            or [WORST_FITNESS]
        record = {
            "generation": self.generation,
            "best_fitness": best.fitness.values[1],
            "median_fitness": statistics.median(perplexities),
            "best_formula": str(best),
            "best_key": best.key,
            "unique": len({ind.key for ind in self.population}),
            "offspring": self._offspring,
            "rejected": self._rejected,
            "clones": self._clones,
            **self.extra_stats(),
            "wall_seconds": wall_s,
        }
        self._rejected = self._offspring = self._clones = 0
        self.logbook.record(**record)
        return record

    # ------------------------------------------------------------ checkpoints
    def state_dict(self) -> dict:
        """Plain data (strings, numbers, RNG states): readable without DEAP's creator classes."""
        return {
            "generation": self.generation,
            "population": [(str(i), tuple(i.fitness.values)) for i in self.population],
            "hall_of_fame": [(str(i), tuple(i.fitness.values)) for i in self.hof],
            "logbook": list(self.logbook),
            "first_seen": dict(self.first_seen),
            "rng": {"python": self.rng_state, "numpy": np.random.get_state(), "torch": torch.get_rng_state()},
        }

    def load_state_dict(self, state: dict) -> None:
        self.generation = state["generation"]
        self.population = [self._individual(f, v) for f, v in state["population"]]
        self.hof.clear()
        for f, v in reversed(state["hall_of_fame"]):  # best last: insert() then keeps the order
            self.hof.insert(self._individual(f, v))
        self.logbook = tools.Logbook()
        self.logbook.extend(state["logbook"])
        self.first_seen = dict(state["first_seen"])
        self.rng_state = state["rng"]["python"]
        np.random.set_state(state["rng"]["numpy"])
        torch.set_rng_state(state["rng"]["torch"])

    def _individual(self, formula: str, values: tuple):
        ind = from_string(formula, primitive_set(self.search.operators))
        ind.key = Metric(formula, to_node(ind)).key
        ind.fitness.values = values
        return ind
