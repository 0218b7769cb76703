"""From candidates to fitness: de-duplication, the persistent cache, the backend, and optional
successive halving on the evaluation-window budget.

The engine hands over (canonical key, candidate) pairs — the candidate as plain data, an
expression string or a dict (pruning/candidates.py) — and gets one `Measured` per pair. A key is
measured once per call however often it occurs; a key already in the cache is not measured at
all. With `rungs > 1`, candidates not yet known on the full budget are first measured on
`full / eta^(rungs-1)` windows; the best `1/eta` (ties broken by key: deterministic) go on to
`eta` times more windows, and so on up to the full budget. A candidate eliminated early keeps
its measurement with its (smaller) window count: the engine ranks full-budget candidates first.

Below the cache, the backend skips the forward of a candidate whose masks were measured before
(in this campaign or any other sharing the cache: `FitnessCache.phenotypes`); those count as
`phenotype_hits`, not `evaluations`.
"""

from __future__ import annotations

import math
from collections import Counter
from dataclasses import dataclass

from prunerzero.fitness.cache import FitnessCache
from prunerzero.core.results import FitnessResult
from prunerzero.fitness.pool import Backend, Job


@dataclass(frozen=True)
class Measured:
    windows: int  # evaluation windows the result was measured on
    result: FitnessResult
    cached: bool = False


class FitnessMap:
    def __init__(self, backend: Backend, cache: FitnessCache | None, spec_key: str,
                 full_windows: int, rungs: int = 1, eta: int = 2):
        self.backend, self.cache, self.spec_key = backend, cache, spec_key
        self.full_windows = full_windows
        self.budgets = [max(1, full_windows // eta ** (rungs - 1 - r)) for r in range(rungs)]
        self.eta = eta
        self.stats: Counter = Counter()  # evaluations, cache_hits, phenotype_hits, windows, eval_seconds, failed
        self._phenotypes: dict[int, dict[str, float]] = {}  # windows -> fingerprint -> value
        self.log: list[tuple[str, str | dict, Measured]] = []  # (key, candidate, measurement) per measurement

    def take_stats(self) -> Counter:
        """The counters since the last call (one generation's worth)."""
        out, self.stats = self.stats, Counter()
        return out

    def take_log(self) -> list[tuple[str, str | dict, Measured]]:
        out, self.log = self.log, []
        return out

    def __call__(self, candidates: list[tuple[str, str | dict]]) -> list[Measured]:
        if self.cache is None:
            return self._call(candidates)
        with self.cache.held():  # one connection for the generation: each result is committed, one fsync at the end
            return self._call(candidates)

    def _call(self, candidates: list[tuple[str, str | dict]]) -> list[Measured]:
        formulas = dict(candidates)  # key -> candidate (the last given), in order of first occurrence
        done = self._lookup(list(formulas), self.full_windows)
        self._record(done, formulas)
        survivors = [k for k in formulas if k not in done]
        for rung, windows in enumerate(self.budgets):
            if not survivors:
                break
            got = self._measure(survivors, formulas, windows)
            done.update(got)
            if rung < len(self.budgets) - 1:
                ranked = sorted((k for k in survivors if got[k].result.status == "ok"),
                                key=lambda k: (got[k].result.fitness, k))
                survivors = ranked[: math.ceil(len(survivors) / self.eta)]
        return [done[k] for k, _ in candidates]

    def _lookup(self, keys: list[str], windows: int) -> dict[str, Measured]:
        if self.cache is None or not keys:
            return {}
        hits = self.cache.get_many(keys, self.spec_key, windows)
        self.stats["cache_hits"] += len(hits)
        return {k: Measured(windows, r, cached=True) for k, r in hits.items()}

    def _measure(self, keys: list[str], formulas: dict[str, str | dict], windows: int) -> dict[str, Measured]:
        out = self._lookup(keys, windows) if windows != self.full_windows else {}
        todo = [k for k in keys if k not in out]
        max_windows = None if windows == self.full_windows else windows
        # each result reaches the cache as it arrives: a kill loses only the evaluations in flight
        store = (lambda i, r: self.cache.put_many([r], self.spec_key, windows)) if self.cache is not None else None
        results = self.backend.map([Job(k, formulas[k], max_windows) for k in todo], self._known(windows), store)
        for k, r in zip(todo, results):
            out[k] = Measured(windows, r)
            self.stats["eval_seconds"] += r.seconds
            if not r.measured:  # answered from identical masks: no forward, no windows
                self.stats["phenotype_hits"] += 1
                continue
            self.stats["evaluations"] += 1
            self.stats["windows"] += windows
            self.stats["failed"] += r.status != "ok"
        self._record(out, formulas)
        return out

    def _known(self, windows: int) -> dict[str, float]:
        """The phenotypes measured on this budget (the backend adds new ones as they come)."""
        if windows not in self._phenotypes:
            cached = self.cache.phenotypes(self.spec_key, windows) if self.cache is not None else {}
            self._phenotypes[windows] = cached
        return self._phenotypes[windows]

    def _record(self, measured: dict[str, Measured], formulas: dict[str, str | dict]) -> None:
        self.log.extend((k, formulas[k], m) for k, m in measured.items())
