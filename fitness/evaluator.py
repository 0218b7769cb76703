"""The evaluator: one model replica with its calibration statistics, scoring metrics by the
perplexity of the model after pruning with them.

`evaluate` is idempotent — prune, measure, restore the dense weights — so a Ray retry that runs
it twice gives the same answer, and a failure is returned as data (status, reason, worst
fitness), never raised into a campaign.

Phenotypes. Pruning depends only on which weights a metric cuts, and many formulas cut the same
ones (abs(W), sqr(W), log(abs(W)) …). Every result carries its masks' fingerprint; given the
fingerprints already measured (`known`), `evaluate` answers a candidate whose masks match one of
them without the perplexity forward — exactly the value that forward would give, at the cost of
scores and masks alone.
"""

from __future__ import annotations

import hashlib
import json
import math
import time
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field

from prunerzero.protocol import Protocol, check_sparsity, parse_pattern

WORST_FITNESS = 1e10  # fitness of a failed or non-finite evaluation (perplexity is minimised)


@dataclass(frozen=True)
class EvalSpec:
    """Everything needed to build an evaluator anywhere (picklable; travels to Ray actors)."""

    model: str = "smollm2-135m"
    corpus: str = "austen"
    sparsity: float = 0.5
    pattern: str = "unstructured"  # or "N:M"
    group: str = "row"  # comparison group for unstructured: "row" (per output row) or "layer"
    split: str = "valid"  # a search never sees "test"
    protocol: Protocol = field(default_factory=Protocol)
    device: str = "auto"  # "auto" picks cuda when there is one
    dtype: str = "auto"  # "auto": bf16 on GPU, fp32 on CPU

    def __post_init__(self) -> None:
        check_sparsity(self.sparsity)
        parse_pattern(self.pattern)
        if self.group not in ("row", "layer"):
            raise ValueError(f"unknown comparison group {self.group!r}: use 'row' or 'layer'")
        if self.split not in ("train", "valid", "test"):
            raise ValueError(f"unknown split {self.split!r}: use 'valid' or 'test'")

    def cache_key(self) -> str:
        """What a fitness value depends on besides the metric (the device does not count)."""
        d = asdict(self)
        d.pop("device")
        return hashlib.sha256(json.dumps(d, sort_keys=True, default=str).encode()).hexdigest()[:16]


@dataclass(frozen=True)
class FitnessResult:
    key: str  # the metric's canonical key
    perplexity: float
    status: str  # "ok" or "failed"
    reason: str = ""
    seconds: float = 0.0
    eval_tokens: int = 0
    sparsity: float = float("nan")  # achieved
    phenotype: str = ""  # fingerprint of the masks ("" when not a metric's pruning)
    measured: bool = True  # False: perplexity taken from an earlier candidate with the same masks

    @property
    def fitness(self) -> float:
        ok = self.status == "ok" and math.isfinite(self.perplexity)
        return self.perplexity if ok else WORST_FITNESS


def _fingerprint_tensor(t) -> str:
    return hashlib.sha256(t.numpy().tobytes()).hexdigest()[:16]


class Evaluator:
    """One model replica, its corpus windows and calibration statistics, loaded once.

    `prune` / `restore` / `measure` are the steps; `evaluate` chains them for the search and
    turns any failure into a FitnessResult with the worst fitness."""

    def __init__(self, spec: EvalSpec, log=None, needs: frozenset[str] = frozenset()) -> None:
        """`needs`: statistics to compute (or load) now rather than at the first metric needing them."""
        from prunerzero.models.adapter import ModelAdapter
        from prunerzero.models.corpora import load_tokenized
        from prunerzero.models.loading import load_model
        from prunerzero.pruning.apply import DenseSnapshot

        self.spec = spec
        self.log = log or (lambda msg: None)
        p = spec.protocol
        self.lm = load_model(spec.model, spec.device, spec.dtype)
        self.adapter = ModelAdapter(self.lm.model)
        self.units = self.adapter.prunable()
        self.corpus = load_tokenized(spec.corpus, self.lm.tokenizer, p.fractions)
        self.calibration = self.corpus.calibration(p.calib_windows, p.seq_len, p.seed)
        self.windows = self.corpus.evaluation(spec.split, p.seq_len, p.eval_windows)
        self.snapshot = DenseSnapshot(self.units)
        self._stats = None
        self.target = _target(spec)
        self._check(self.target)  # a pattern that does not fit fails here, not per candidate
        if needs:
            self.stats(needs)

    @property
    def model(self):
        return self.lm.model

    def stats(self, needs=frozenset({"X"})):
        """Dense-model statistics, computed once (with G only if some metric needs it) and cached
        on disk for every later evaluator of the same model, corpus and protocol."""
        from prunerzero.primitives.stats import load_or_collect, stats_cache_path

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

    def prune(self, metric, target=None):
        """Prune in place with a metric (one-shot or sequential statistics, per the protocol) or
        a named method such as "sparsegpt"."""
        from prunerzero.pruning.apply import prune_with_metric, prune_with_metric_sequential
        from prunerzero.pruning.methods import resolve_method

        if target is None:
            target = self.target  # checked once, in the constructor
        else:
            self._check(target)  # before any calibration
        method = resolve_method(metric)
        if method is not None:
            return method(self.model, self.adapter, self.calibration, target)
        stats = self.stats(metric.needs)
        if self.spec.protocol.stats_mode == "sequential":
            return prune_with_metric_sequential(self.model, self.adapter, self.calibration, metric, target, stats)
        return prune_with_metric(self.units, stats, metric, target)

    def _check(self, target) -> None:
        from prunerzero.pruning.masks import check_pattern_fits

        check_pattern_fits({u.name: u.shape for u in self.units}, target.nm)

    def restore(self) -> None:
        self.snapshot.restore()

    def measure(self, max_windows: int | None = None):
        from prunerzero.fitness.perplexity import perplexity

        windows = self.windows if max_windows is None else self.windows[:max_windows]
        return perplexity(self.model, windows)

    def evaluate(self, metric, max_windows: int | None = None,
                 known: Mapping[str, float] | None = None) -> FitnessResult:
        """Perplexity after pruning with `metric`; the dense weights are restored afterwards.
        `known`: mask fingerprint → perplexity on this budget; a match skips the forward.
        Never raises: a failure is a result with status "failed" and the reason."""
        t0 = time.perf_counter()
        key = getattr(metric, "key", str(metric))
        try:
            report = self.prune(metric)
            phenotype = getattr(report, "fingerprint", "")
            if known and phenotype in known:
                tokens = self.windows[:max_windows, 1:].numel()
                return FitnessResult(key, known[phenotype], "ok", "", time.perf_counter() - t0, tokens,
                                     report.sparsity, phenotype, measured=False)
            ppl = self.measure(max_windows)
            status = "ok" if math.isfinite(ppl.perplexity) else "failed"
            reason = "" if status == "ok" else "non-finite perplexity"
            return FitnessResult(key, ppl.perplexity, status, reason, time.perf_counter() - t0, ppl.tokens,
                                 report.sparsity, phenotype)
        except Exception as e:  # a candidate must never crash a campaign
            return FitnessResult(key, math.inf, "failed", f"{type(e).__name__}: {e}", time.perf_counter() - t0)
        finally:
            self.restore()


def _target(spec: EvalSpec):
    from prunerzero.pruning.target import PruneTarget

    return PruneTarget(sparsity=spec.sparsity, pattern=spec.pattern, group=spec.group)
