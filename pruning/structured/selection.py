"""Choosing one configuration per layer under a latency budget — MDP's selection, in numbers only.

Each block offers attention options and MLP options, each an (importance, latency) pair; option 0
of each is "removed" (importance 0). Removing both sublayers may also remove the whole block,
which saves the block's own remaining cost (its norms and residual adds). The problem:

    maximise   Σ_b Σ_c imp[b,c] x[b,c]  (attention and MLP options alike)
    subject to Σ_c x[b,c] = 1 per block and sublayer,   z_b ≤ x[b,attn 0],  z_b ≤ x[b,mlp 0],
               overhead + Σ_b (rest_b (1 − z_b) + Σ_c lat[b,c] x[b,c]) ≤ budget

a linear program in binaries (MDP's Pyomo/MINLP formulation, linearised), solved exactly by HiGHS
(`highspy`) with its optimality gap reported; `greedy` and `uniform` are the baselines.
"""

from __future__ import annotations

import os
import sys
import time
from contextlib import contextmanager
from dataclasses import dataclass, field

import highspy
import numpy as np

SOLVERS = ("milp", "greedy", "uniform")


class SelectionError(ValueError):
    """A budget no configuration meets, or options that do not describe a selection."""


@dataclass(frozen=True)
class Options:
    """Per block: attention and MLP options (importance, latency), option 0 = removed."""

    attn_importance: np.ndarray  # (blocks, attention options)
    attn_latency: np.ndarray
    mlp_importance: np.ndarray  # (blocks, MLP options)
    mlp_latency: np.ndarray
    rest: np.ndarray  # (blocks,) the block's cost beyond its two sublayers
    overhead: float  # embeddings, final norm, head: not prunable

    def latency(self, attn: list[int], mlp: list[int], removed: list[bool]) -> float:
        b = np.arange(len(attn))
        return float(self.overhead + np.sum(self.rest * ~np.asarray(removed, bool))
                     + self.attn_latency[b, attn].sum() + self.mlp_latency[b, mlp].sum())

    def importance(self, attn: list[int], mlp: list[int]) -> float:
        b = np.arange(len(attn))
        return float(self.attn_importance[b, attn].sum() + self.mlp_importance[b, mlp].sum())

    @property
    def full(self) -> tuple[list[int], list[int]]:
        n = len(self.rest)
        return [self.attn_latency.shape[1] - 1] * n, [self.mlp_latency.shape[1] - 1] * n

    @property
    def minimum(self) -> float:
        """The least latency any selection reaches (every block removed)."""
        return float(self.overhead)


@dataclass
class Selection:
    attn: list[int]  # option index per block
    mlp: list[int]
    removed: list[bool]  # whole block removed
    importance: float
    latency: float  # predicted
    solver: str
    seconds: float = 0.0
    gap: float = 0.0  # the solver's proven relative optimality gap (0: optimal)
    status: str = ""
    extra: dict = field(default_factory=dict)


def _finish(opts: Options, attn, mlp, solver: str, t0: float, **kw) -> Selection:
    attn, mlp = [int(a) for a in attn], [int(m) for m in mlp]
    removed = [a == 0 and m == 0 for a, m in zip(attn, mlp)]
    return Selection(attn, mlp, removed, opts.importance(attn, mlp), opts.latency(attn, mlp, removed), solver,
                     time.perf_counter() - t0, **kw)


def _check_budget(opts: Options, budget: float) -> None:
    if budget < opts.minimum:
        raise SelectionError(f"no configuration meets a latency of {budget * 1e3:.2f} ms: even with every block "
                             f"removed the model takes {opts.minimum * 1e3:.2f} ms")


def select(opts: Options, budget: float, solver: str = "milp", time_limit: float = 60.0) -> Selection:
    if solver not in SOLVERS:
        raise SelectionError(f"unknown solver {solver!r}: use one of {', '.join(SOLVERS)}")
    _check_budget(opts, budget)
    if solver == "milp":
        return solve_milp(opts, budget, time_limit)
    return solve_greedy(opts, budget) if solver == "greedy" else solve_uniform(opts, budget)


@contextmanager
def _stdout_silenced():
    """HiGHS prints its banner from C onto file descriptor 1 when an instance is made, before any
    option can turn output off: send that descriptor to /dev/null meanwhile (logs stay one line
    per event)."""
    sys.stdout.flush()
    saved, devnull = os.dup(1), os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(devnull, 1)
        yield
    finally:
        os.dup2(saved, 1)
        os.close(saved)
        os.close(devnull)


def _highs() -> highspy.Highs:
    with _stdout_silenced():
        h = highspy.Highs()
        h.setOptionValue("output_flag", False)
    return h


def solve_milp(opts: Options, budget: float, time_limit: float = 60.0) -> Selection:
    t0 = time.perf_counter()
    n, na, nm = len(opts.rest), opts.attn_latency.shape[1], opts.mlp_latency.shape[1]
    h = _highs()
    h.setOptionValue("time_limit", float(time_limit))
    h.setOptionValue("mip_rel_gap", 0.0)
    x = [[h.addBinary() for _ in range(na)] for _ in range(n)]
    y = [[h.addBinary() for _ in range(nm)] for _ in range(n)]
    z = [h.addBinary() for _ in range(n)]
    latency = 0.0
    objective = 0.0
    # a removed block is free to choose (both sublayers already removed): a tiny reward makes it so
    eps = 1e-9 * max(1.0, float(np.abs(opts.attn_importance).max() + np.abs(opts.mlp_importance).max()))
    for b in range(n):
        h.addConstr(sum(x[b]) == 1)
        h.addConstr(sum(y[b]) == 1)
        h.addConstr(z[b] <= x[b][0])
        h.addConstr(z[b] <= y[b][0])
        latency = latency + sum(float(opts.attn_latency[b, c]) * x[b][c] for c in range(na)) \
            + sum(float(opts.mlp_latency[b, c]) * y[b][c] for c in range(nm)) - float(opts.rest[b]) * z[b]
        objective = objective + sum(float(opts.attn_importance[b, c]) * x[b][c] for c in range(na)) \
            + sum(float(opts.mlp_importance[b, c]) * y[b][c] for c in range(nm)) + eps * z[b]
    h.addConstr(latency <= float(budget - opts.overhead - opts.rest.sum()))
    h.maximize(objective)
    status = h.modelStatusToString(h.getModelStatus())
    if status not in ("Optimal", "Time limit reached") or h.getInfo().primal_solution_status == 0:
        raise SelectionError(f"the MILP found no selection within {budget * 1e3:.2f} ms (HiGHS: {status})")
    values = np.asarray(h.getSolution().col_value)
    xs = values[: n * na].reshape(n, na)
    ys = values[n * na: n * (na + nm)].reshape(n, nm)
    return _finish(opts, xs.argmax(1), ys.argmax(1), "milp", t0, gap=float(h.getInfo().mip_gap), status=status)


def _moves(opts: Options, attn: list[int], mlp: list[int]):
    """Every single-option change per block that saves latency: (kind, block, option, Δimp, Δlat)."""
    for b in range(len(attn)):
        for kind, cur, imp, lat in (("attn", attn[b], opts.attn_importance, opts.attn_latency),
                                    ("mlp", mlp[b], opts.mlp_importance, opts.mlp_latency)):
            for c in range(lat.shape[1]):
                saved = lat[b, cur] - lat[b, c]
                if saved > 0:
                    yield kind, b, c, imp[b, cur] - imp[b, c], saved


def solve_greedy(opts: Options, budget: float) -> Selection:
    """Repeatedly take the change with the least importance lost per second saved (the usual
    knapsack heuristic for structured pruning) until the predicted latency meets the budget."""
    t0 = time.perf_counter()
    attn, mlp = opts.full
    while True:
        removed = [a == 0 and m == 0 for a, m in zip(attn, mlp)]
        if opts.latency(attn, mlp, removed) <= budget:
            return _finish(opts, attn, mlp, "greedy", t0)
        best = min(_moves(opts, attn, mlp), key=lambda m: (m[3] / m[4], -m[4]), default=None)
        if best is None:
            raise SelectionError(f"greedy selection cannot reach {budget * 1e3:.2f} ms")
        kind, b, c = best[:3]
        (attn if kind == "attn" else mlp)[b] = c


def solve_uniform(opts: Options, budget: float) -> Selection:
    """The same attention and MLP option in every block (uniform head and channel pruning, no
    sublayer removed): the pair with the most importance that meets the budget."""
    t0 = time.perf_counter()
    n = len(opts.rest)
    best = None
    for a in range(1, opts.attn_latency.shape[1]):
        for m in range(1, opts.mlp_latency.shape[1]):
            attn, mlp = [a] * n, [m] * n
            removed = [a == 0 and m == 0] * n
            if opts.latency(attn, mlp, removed) <= budget:
                imp = opts.importance(attn, mlp)
                if best is None or imp > best[0]:
                    best = (imp, attn, mlp)
    if best is None:
        raise SelectionError(f"no uniform configuration meets {budget * 1e3:.2f} ms")
    return _finish(opts, best[1], best[2], "uniform", t0)
