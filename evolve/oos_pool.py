"""Opposing Operation Simplification of a whole generation in worker processes.

SymPy costs the driver 50-300 ms per new tree (results/BENCHMARKS.md, section g) — several per
cent of a cheap evaluation, and on a Ray cluster of many evaluators the driver's time per
candidate is what bounds the cluster's efficiency. OOS is pure and deterministic per tree (up to
its wall-clock safety timer), so a generation's distinct new trees are simplified side by side in
`workers` spawned processes and the outcomes memoised on the driver; the engine's redraws and
selection then proceed exactly as with in-process OOS (same seed, same campaign).

Timeouts: the driver's set of expressions whose `sympy.simplify` ran out of time (saved in the
checkpoint) travels with every batch, and each worker reports the ones it adds, so a resumed
campaign decides as the interrupted one did, whichever process met the expression first.
"""

from __future__ import annotations

import multiprocessing
from concurrent.futures import ProcessPoolExecutor

from prunerzero.primitives.expression import Node

from . import simplify as oos


def _simplify_in_worker(tree: Node, ops, max_depth, max_size, known_timeouts: frozenset[str]):
    oos.timed_out.update(known_timeouts)
    before = set(oos.timed_out)
    outcome = oos.simplify(tree, ops, max_depth, max_size)
    return outcome, sorted(oos.timed_out - before)


def _ready() -> None:
    """Nothing: importing this module (SymPy, the primitives) is the work of starting a worker."""


class OOSPool:
    """`map(trees, ...)`: `simplify` of each tree, in `workers` processes (0 or 1: here).
    `start()` spawns them (spawned: torch and threads do not survive a fork) without waiting, so
    that they import while the evaluators load; they live until `close()`."""

    def __init__(self, workers: int = 0):
        self.workers = workers
        self._executor: ProcessPoolExecutor | None = None

    def start(self) -> None:
        if self.workers > 1 and self._executor is None:
            self._executor = ProcessPoolExecutor(self.workers, mp_context=multiprocessing.get_context("spawn"))
            for _ in range(self.workers):
                self._executor.submit(_ready)

    def map(self, trees: list[Node], ops, max_depth, max_size) -> list[oos.Simplified]:
        if self.workers <= 1 or len(trees) < 2:
            return [oos.simplify(t, ops, max_depth, max_size) for t in trees]
        self.start()
        known = frozenset(oos.timed_out)
        # the largest trees first (SymPy's time grows with size): the batch does not wait on one big
        # tree started last; the outcomes come back in the given order
        order = sorted(range(len(trees)), key=lambda i: -trees[i].size())
        futures = {i: self._executor.submit(_simplify_in_worker, trees[i], ops, max_depth, max_size, known)
                   for i in order}
        out = []
        for i in range(len(trees)):
            outcome, timeouts = futures[i].result()
            oos.timed_out.update(timeouts)
            out.append(outcome)
        return out

    def close(self) -> None:
        if self._executor is not None:
            self._executor.shutdown(cancel_futures=True)
            self._executor = None
