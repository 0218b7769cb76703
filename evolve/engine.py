"""The evolution loop. It calls toolbox aliases and its problem's methods only (DEAP's machinery
does the work) and one fitness function; it knows nothing of models, files or Ray.

The engine takes a *problem* (evolve/problems.py): GP over metric trees is one, a GA over
fixed-length genomes another. A generation: tournament selection, `varAnd` (the problem's
crossover and mutation), `problem.prepare` on every changed offspring (OOS for trees, repair for
genomes; a rejected one is redrawn at random), fitness of the new ones, the clone penalty, and
elites from the hall of fame carried over unchanged.

Reproducibility. Every random draw of the search happens inside `_rng()`, which swaps the
engine's own `random` state in and out: whatever else consumes Python's global `random`
(Ray, a library, a cache hit that skips work) cannot shift the search, so the same seed gives
the same campaign on any backend, and `state_dict` / `load_state_dict` resume it exactly. The
state is plain data (JSON): population and hall of fame as the problem encodes them, the
logbook, and the RNG states as numbers.
"""

from __future__ import annotations

import base64
import random
import statistics
import time
from contextlib import contextmanager
from typing import Callable

import numpy as np
import torch
from deap import algorithms, tools

from prunerzero.core.results import WORST_FITNESS

from .config import SearchConfig
from .evaluation import Measured
from .problem import MetricProblem

FitnessFn = Callable[[list[tuple[str, str | dict]]], list[Measured]]


def _same_key(a, b) -> bool:
    return a.key == b.key


class Engine:
    def __init__(self, search: SearchConfig, fitness: FitnessFn, extra_stats: Callable[[], dict] = dict,
                 problem=None):
        """`extra_stats()` is called once per generation; its fields join the logbook record.
        `problem`: what is evolved (default: metric trees, the GP of Pruner-Zero)."""
        self.search, self.fitness, self.extra_stats = search, fitness, extra_stats
        self.problem = problem or MetricProblem(search)
        self.toolbox = self.problem.toolbox()
        self.population: list = []
        self.hof = tools.HallOfFame(search.hall_of_fame, similar=_same_key)
        self.logbook = tools.Logbook()
        self.generation = -1  # the last completed generation
        self.first_seen: dict[str, int] = {}  # canonical key -> generation it was first evaluated
        self.rng_state = random.Random(search.seed).getstate()
        # per generation: rejections, individuals needing fitness, phenotypic clones penalised, refinements
        self._rejected = self._offspring = self._clones = self._refined = 0

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
            seeds = [self.toolbox.clone(s) for s in self.problem.seeds()][: self.search.population]
            with self._rng():
                offspring = seeds + self.toolbox.population(n=self.search.population - len(seeds))
            elites = []
        else:
            elites = [self.toolbox.clone(h) for h in self.hof[: self.search.elites]]
            with self._rng():
                parents = self.toolbox.select(self.population, len(self.population) - len(elites))
                offspring = algorithms.varAnd(parents, self.toolbox, self.search.cx_prob, self.search.mut_prob)
        self.generation += 1
        offspring = self._prepare_all(offspring)
        self._evaluate(offspring)
        offspring = self._refine(offspring)
        if self.search.clone_penalty:
            self._penalise_clones(offspring)
        self.population = offspring + elites
        self.hof.update(self.population)
        return self._record(time.perf_counter() - start)

    def _prepare_all(self, individuals: list) -> list:
        """Prepare every individual without a valid fitness; redraw the rejected ones."""
        if hasattr(self.problem, "prepare_many"):  # all at once first (in parallel), then in order as always
            todo = [ind for ind in individuals if not ind.fitness.valid]
            self.problem.prepare_many(todo)
            self._prepare_redraws(sum(not self.problem.prepare(ind).ok for ind in todo))  # looked up: done above
        out = []
        for ind in individuals:
            if not ind.fitness.valid:
                self._offspring += 1
                ind = self._prepare(ind)
            out.append(ind)
        return out

    def _prepare(self, ind):
        outcome = self.problem.prepare(ind)
        for _ in range(self.search.max_redraws):
            if outcome.ok:
                break
            self._rejected += 1
            with self._rng():
                ind = self.toolbox.individual()
            outcome = self.problem.prepare(ind)
        ind = outcome.individual
        if not outcome.ok:
            self._rejected += 1
            ind.fitness.values = (0, WORST_FITNESS)  # still rejected after the redraws: never evaluated
        return ind

    _oos = _prepare  # the metric problem's preparation is Opposing Operation Simplification

    def _prepare_redraws(self, count: int) -> None:
        """The `count` redraws that `_prepare` will make if each is accepted (the usual case), drawn
        ahead on a copy of the search's RNG state and prepared side by side with `prepare_many`:
        `_prepare` then draws the same trees from the real state and finds them done. Nothing the
        search decides changes (a rejected redraw is drawn and prepared there as always); only
        the redraws' OOS moves out of the driver."""
        if not count:
            return
        outer = random.getstate()
        random.setstate(self.rng_state)  # a copy: the search's own state is not advanced
        try:
            ahead = [self.toolbox.individual() for _ in range(count)]
        finally:
            random.setstate(outer)
        self.problem.prepare_many(ahead)

    def _evaluate(self, individuals: list) -> None:
        todo = [ind for ind in individuals if not ind.fitness.valid]
        measured = self.fitness([(ind.key, self.problem.candidate(ind)) for ind in todo])
        for ind, m in zip(todo, measured):
            ind.fitness.values = (m.windows, m.result.fitness)
            self.first_seen.setdefault(ind.key, self.generation)

    def _refine(self, offspring: list) -> list:
        """Local refinement (a problem with `refine` > 0, e.g. metric constants): the problem's
        variants of the best offspring are prepared and measured like any candidate, and a
        variant that measures better takes its parent's place. No randomness: resumes alike."""
        count = getattr(self.problem, "refine", 0)
        if not count:
            return offspring
        ranked = sorted((i for i in offspring if i.fitness.values[1] < WORST_FITNESS),
                        key=lambda i: (-i.fitness.values[0], i.fitness.values[1]))
        trials, refined = [], 0
        for parent in ranked:  # the best `count` that have something to refine
            if refined == count:
                break
            variants = self.problem.refinements(parent)
            refined += bool(variants)
            for variant in variants:
                outcome = self.problem.prepare(variant)
                if outcome.ok and outcome.individual.key != parent.key:
                    trials.append((parent, outcome.individual))
        if not trials:
            return offspring
        self._evaluate([v for _, v in trials])
        self._refined += len(trials)
        winners = {}
        for parent, variant in trials:
            incumbent = winners.get(id(parent), parent)
            if variant.fitness.values[1] < WORST_FITNESS and variant.fitness > incumbent.fitness:
                winners[id(parent)] = variant
        return [winners.get(id(ind), ind) for ind in offspring]

    def _penalise_clones(self, offspring: list) -> None:
        """Phenotypic de-duplication. Pruning depends only on what a candidate does to the model,
        and different candidates often do the same (abs(W), sqrt(W), tanh(abs(W)) order weights
        alike) and so measure exactly the same fitness; left alone, such clones fill the
        population and end the search's diversity. An offspring whose fitness equals a
        hall-of-fame member's or a smaller offspring's gets the worst fitness for selection (the
        cache keeps the true one)."""
        seen = {h.fitness.values for h in self.hof}
        for ind in sorted(offspring, key=self.problem.size):  # stable: the smallest of equals keeps its fitness
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
        values = [v for v in (ind.fitness.values[1] for ind in self.population) if v < WORST_FITNESS] \
            or [WORST_FITNESS]
        record = {
            "generation": self.generation,
            "best_fitness": best.fitness.values[1],
            "median_fitness": statistics.median(values),
            "best_formula": self.problem.describe(best),
            "best_key": best.key,
            "unique": len({ind.key for ind in self.population}),
            "offspring": self._offspring,
            "rejected": self._rejected,
            "clones": self._clones,
            "refined": self._refined,
            **self.extra_stats(),
            "wall_seconds": wall_s,
        }
        self._rejected = self._offspring = self._clones = self._refined = 0
        self.logbook.record(**record)
        return record

    # ------------------------------------------------------------ checkpoints
    def state_dict(self) -> dict:
        """Plain data (strings, numbers, lists): JSON, readable without DEAP's creator classes."""
        encode = self.problem.encode
        return {
            "problem": self.problem.name,
            "generation": self.generation,
            "population": [[encode(i), list(i.fitness.values)] for i in self.population],
            "hall_of_fame": [[encode(i), list(i.fitness.values)] for i in self.hof],
            "logbook": [dict(r) for r in self.logbook],
            "first_seen": dict(self.first_seen),
            "rng": rng_to_data(self.rng_state),
        }

    def load_state_dict(self, state: dict) -> None:
        if state.get("problem", self.problem.name) != self.problem.name:
            raise ValueError(f"the checkpoint is of problem {state['problem']!r}, the campaign's is {self.problem.name!r}")
        self.generation = state["generation"]
        self.population = [self._individual(d, v) for d, v in state["population"]]
        self.hof.clear()
        for d, v in reversed(state["hall_of_fame"]):  # best last: insert() then keeps the order
            self.hof.insert(self._individual(d, v))
        self.logbook = tools.Logbook()
        self.logbook.extend(state["logbook"])
        self.first_seen = dict(state["first_seen"])
        self.rng_state = rng_from_data(state["rng"])

    def _individual(self, data, values):
        ind = self.problem.decode(data)
        ind.fitness.values = tuple(values)
        return ind


def rng_to_data(python_state) -> dict:
    """The search's RNG states as JSON data: Python's (the search), numpy's and torch's global ones."""
    version, internal, gauss = python_state
    name, keys, pos, has_gauss, cached = np.random.get_state()
    return {"python": [version, list(internal), gauss],
            "numpy": [name, keys.tolist(), int(pos), int(has_gauss), float(cached)],
            "torch": base64.b64encode(torch.get_rng_state().numpy().tobytes()).decode()}


def rng_from_data(data: dict):
    """Set numpy's and torch's global states from `rng_to_data`'s output; return Python's."""
    name, keys, pos, has_gauss, cached = data["numpy"]
    np.random.set_state((name, np.array(keys, dtype=np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(torch.frombuffer(bytearray(base64.b64decode(data["torch"])), dtype=torch.uint8))
    version, internal, gauss = data["python"]
    return (version, tuple(internal), gauss)
