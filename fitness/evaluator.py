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

import hashlib
import math
import time
from collections.abc import Mapping

from prunerzero.core.results import WORST_FITNESS, FitnessResult
from prunerzero.fitness.measures import make_measure
from prunerzero.fitness.perplexity import perplexity
from prunerzero.fitness.spec import EvalSpec
from prunerzero.models.adapter import ModelAdapter
from prunerzero.models.corpora import bos_token, load_tokenized
from prunerzero.models.loading import load_model
from prunerzero.primitives.stats import load_or_collect, stats_cache_path
from prunerzero.pruning.context import PruneContext
from prunerzero.pruning.interventions import DenseSnapshot
from prunerzero.pruning.modes import get_mode

__all__ = ["EvalSpec", "Evaluator", "FitnessResult", "WORST_FITNESS"]


def _fingerprint_tensor(t) -> str:
    return hashlib.sha256(t.numpy().tobytes()).hexdigest()[:16]


class Evaluator:
    """One model replica, its corpus windows and calibration statistics, loaded once.

    `prune` / `restore` / `measure` are the steps; `evaluate` chains them for the search and
    turns any failure into a FitnessResult with the worst fitness."""

    def __init__(self, spec: EvalSpec, log=None, needs: frozenset[str] = frozenset()) -> None:
        """`needs`: statistics to compute (or load) now rather than at the first metric needing them."""
        self.spec = spec
        self.log = log or (lambda msg: None)
        self.mode = get_mode(spec.mode)
        self.target = spec.prune_target()
        p = spec.protocol
        self.lm = load_model(spec.model, spec.device, spec.dtype)
        self.adapter = ModelAdapter(self.lm.model)
        self.units = self.adapter.prunable()
        self.corpus = load_tokenized(spec.corpus, self.lm.tokenizer, p.fractions)
        self.bos = bos_token(self.lm.tokenizer, p.bos)  # Gemma-3 and its kin: BOS first in every window
        self.calibration = self.corpus.calibration(p.calib_windows, p.seq_len, p.seed, self.bos)
        self.windows = self.corpus.evaluation(spec.split, p.seq_len, p.eval_windows, self.bos)
        self.snapshot = DenseSnapshot(self.units)
        self._stats = None
        self.ctx = PruneContext(self.lm.model, self.adapter, self.calibration, self.stats, p.stats_mode,
                                tokenizer=self.lm.tokenizer, log=self.log, train_windows=self.train_windows)
        self.mode.check(self.ctx, self.target)  # a target that does not fit fails here, not per candidate
        self.fitness_measure = make_measure(spec.fitness)
        self.fitness_measure.prepare(self.model, self.windows)
        if needs:
            self.stats(needs)

    @property
    def model(self):
        return self.lm.model

    def train_windows(self, n: int, seq_len: int, seed: int):
        """Windows of the train split for a mode that trains (the skip mode's routers)."""
        return self.corpus.calibration(n, seq_len, seed, self.bos)

    def stats(self, needs=frozenset({"X"})):
        """Dense-model statistics, computed once (with G only if some metric needs it) and cached
        on disk for every later evaluator of the same model, corpus and protocol."""
        need_g = "G" in needs
        if self._stats is None or (need_g and not self._stats.G):
            self.restore()
            p = self.spec.protocol
            weights = sum(float(u.weight.double().abs().sum()) for u in self.units)
            model_id = f"{self.lm.path}|{self.lm.dtype}|{weights:.6e}"
            path = stats_cache_path(model_id, _fingerprint_tensor(self.calibration), p.calibration_key())
            meta = {"model": self.spec.model, "corpus": self.spec.corpus, "protocol": p.describe()}
            stats = load_or_collect(path, self.model, self.adapter, self.calibration, need_g, meta, self.log)
            # held in the model's dtype on its device: no per-candidate transfers, and on a GPU
            # (bf16) G costs what the model does, not twice as much; scores upcast per unit
            self._stats = stats.to(self.lm.device, self.lm.dtype)
        return self._stats

    def candidate(self, spec):
        """A candidate of this evaluator's mode from a string: a method name or a metric."""
        return self.mode.candidate(spec)

    def prune(self, candidate, target=None):
        """Apply a candidate (metric, method, allocation, …) with this evaluator's mode, in place.
        A string is resolved first (a method name of the mode, else a metric)."""
        if target is None:
            target = self.target  # checked once, in the constructor
        else:
            self.mode.check(self.ctx, target)  # before any calibration
        if isinstance(candidate, str):
            candidate = self.candidate(candidate)
        return self.mode.apply(self.ctx, candidate, target)

    def restore(self) -> None:
        """Undo every change: the journal of structural edits, then the dense weights."""
        self.ctx.edits.restore()
        self.snapshot.restore()

    def measure(self, max_windows: int | None = None):
        """Perplexity of the model as it is now (the leaderboard's number)."""
        windows = self.windows if max_windows is None else self.windows[:max_windows]
        return perplexity(self.model, windows)

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
