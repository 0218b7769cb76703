"""The evaluator: one model replica with its data and calibration statistics, scoring candidates of
any kind by the fitness of the model after its mode applied them.

`evaluate` is idempotent — apply, measure, restore (in `finally`) — so a Ray retry that runs it
twice gives the same answer, and a failure is returned as data (status, reason, worst fitness),
never raised into a campaign.

Phenotypes. What a candidate does to the model is fingerprinted (`PruneReport.fingerprint`: the
masks, or the plan of a structural mode), and many candidates do the same (abs(W), sqr(W) and
log(abs(W)) cut the same weights). Given the fingerprints already measured (`known`), `evaluate`
answers a candidate whose fingerprint matches without the forward — exactly the value that
forward would give, at the cost of applying it alone.
"""

from __future__ import annotations

import math
import time
from collections.abc import Mapping

from prunerzero.core.results import WORST_FITNESS, FitnessResult
from prunerzero.fitness.measures import make_measure
from prunerzero.fitness.session import Session
from prunerzero.fitness.spec import EvalSpec

__all__ = ["EvalSpec", "Evaluator", "FitnessResult", "WORST_FITNESS"]


class Evaluator(Session):
    """A session (fitness/session.py: model, windows, statistics, context, loaded once) that scores
    candidates for the search: `evaluate` applies one, measures the campaign's fitness measure
    and restores, turning any failure into a FitnessResult with the worst fitness."""

    def __init__(self, spec: EvalSpec, log=None, needs: frozenset[str] = frozenset()) -> None:
        super().__init__(spec, log, needs)
        self.fitness_measure = make_measure(spec.fitness)
        self.fitness_measure.prepare(self.model, self.windows)

    def evaluate(self, candidate, max_windows: int | None = None,
                 known: Mapping[str, float] | None = None) -> FitnessResult:
        """The fitness measure after applying `candidate`; the model is restored afterwards.
        `known`: fingerprint -> value on this budget; a match skips the forward.
        Never raises: a failure is a result with status "failed" and the reason."""
        t0 = time.perf_counter()
        key = getattr(candidate, "key", str(candidate))
        try:
            report = self.prune(candidate)
            phenotype = getattr(report, "fingerprint", "")
            windows = self.windows if max_windows is None else self.windows[:max_windows]
            if known and phenotype in known:
                return FitnessResult(key, known[phenotype], "ok", "", time.perf_counter() - t0,
                                     windows[:, 1:].numel(), report.sparsity, phenotype, measured=False)
            m = self.fitness_measure(self.model, windows)
            status = "ok" if math.isfinite(m.value) else "failed"
            reason = "" if status == "ok" else f"non-finite {self.spec.fitness}"
            return FitnessResult(key, m.value, status, reason, time.perf_counter() - t0, m.tokens,
                                 report.sparsity, phenotype)
        except Exception as e:  # a candidate must never crash a campaign
            return FitnessResult(key, math.inf, "failed", f"{type(e).__name__}: {e}", time.perf_counter() - t0)
        finally:
            self.restore()
