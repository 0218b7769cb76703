"""A session: what is loaded once — the model, its corpus windows, the calibration statistics and the
pruning context — and the one loop every job runs on it: prune, measure, restore, time (`trial`).

The search's `Evaluator` (fitness/evaluator.py) is a session that adds a fitness measure and turns
a candidate into a FitnessResult; the user jobs (`prunerzero.jobs`) and the benchmark scripts
(experiments/) call `trial` and read a `Trial`, so a pruned model is measured the same way
wherever it is measured.
"""

from __future__ import annotations

import contextlib
import copy
import hashlib
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from prunerzero.fitness.perplexity import PerplexityResult, perplexity
from prunerzero.fitness.spec import EvalSpec
from prunerzero.fitness.speed import SpeedProtocol
from prunerzero.models.adapter import ModelAdapter
from prunerzero.models.corpora import bos_token, load_tokenized
from prunerzero.models.loading import load_model
from prunerzero.primitives.stats import load_or_collect, stats_cache_path
from prunerzero.pruning.context import PruneContext
from prunerzero.pruning.interventions import DenseSnapshot
from prunerzero.pruning.modes import get_mode
from prunerzero.pruning.report import PruneReport


def _fingerprint_tensor(t) -> str:
    return hashlib.sha256(t.numpy().tobytes()).hexdigest()[:16]


def count_params(model) -> int:
    return sum(p.numel() for p in model.parameters())


@dataclass
class Trial:
    """What one candidate did at one target: the mode's report, the perplexity on the session's
    windows, the parameters left, seconds to prune and for the whole trial, and on request the speed columns (pruned
    beside dense), a copy of the pruned model and what an `observe` hook saw while measuring."""

    report: PruneReport
    perplexity: PerplexityResult
    params: int
    prune_seconds: float
    seconds: float
    speed: dict = field(default_factory=dict)
    pruned: torch.nn.Module | None = None
    observed: dict = field(default_factory=dict)


class Session:
    """One model replica, its corpus windows and calibration statistics, loaded once.

    `prune` / `restore` / `measure` are the steps; `trial` chains them for a job."""

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
        if needs:
            self.stats(needs)

    @property
    def model(self):
        return self.lm.model

    def describe_windows(self) -> str:
        """The tokens `measure` reads, in words (a perplexity line names them)."""
        return f"{len(self.windows)} {self.spec.split} windows x {self.windows.shape[1]} tokens of {self.spec.corpus}"

    def device_name(self) -> str:
        dev, dtype = self.lm.device, str(self.lm.dtype).replace("torch.", "")
        if dev.type == "cuda":
            return f"{torch.cuda.get_device_name(dev)} ({dtype})"
        return f"cpu x{torch.get_num_threads()} ({dtype})"

    def train_windows(self, n: int, seq_len: int, seed: int):
        """Windows of the train split for a mode that trains (the skip mode's routers)."""
        return self.corpus.calibration(n, seq_len, seed, self.bos)

    def stats(self, needs=frozenset({"X"})):
        """Dense-model statistics, computed once (with G only if some metric needs it) and cached
        on disk for every later session of the same model, corpus and protocol."""
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
        """A candidate of this session's mode from a string: a method name or a metric."""
        return self.mode.candidate(spec)

    def prune(self, candidate, target=None):
        """Apply a candidate (metric, method, allocation, …) with this session's mode, in place.
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

    def measure(self, max_windows: int | None = None) -> PerplexityResult:
        """Perplexity of the model as it is now (the leaderboard's number)."""
        windows = self.windows if max_windows is None else self.windows[:max_windows]
        return perplexity(self.model, windows)

    def trial(self, candidate, target=None, *, speed: SpeedProtocol | None = None, keep: bool = False,
              observe: Callable | None = None) -> Trial:
        """Prune with `candidate` at `target`, measure, restore — the dense model is back whatever
        happens. `speed`: time the pruned model beside the dense one (interleaved, after the
        restore); `keep`: return a copy of the pruned model; `observe(session, report)`: a
        context manager entered around the measurement, the model pruned, whose dict the Trial
        keeps (skip counters; a mode's own save of what it pruned)."""
        t0 = time.perf_counter()
        try:
            report = self.prune(candidate, target)
            seconds = time.perf_counter() - t0
            with observe(self, report) if observe else contextlib.nullcontext({}) as observed:
                ppl = self.measure()
            params = count_params(self.model)
            pruned = copy.deepcopy(self.model) if keep or speed else None
        finally:
            self.restore()
        timing = speed.columns(self.model, pruned, self.windows) if speed else {}
        return Trial(report, ppl, params, seconds, time.perf_counter() - t0, timing, pruned if keep else None,
                     observed)
