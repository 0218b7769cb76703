"""A cheap, deterministic stand-in for the real Evaluator, for tests and for trying the engine
without a model: one random linear layer whose inputs have outlier channels (as an LLM's do),
pruned with the candidate metric; the "perplexity" grows with the relative output error.

It has the real Evaluator's interface (`ToyEvaluator(spec)`, `.evaluate(candidate, max_windows,
known)`, never raises), so a campaign runs on it unchanged: `EvalSpec.model = "toy"` selects it.
Its candidates are metrics and allocations (a sparsity per "block": its layer's rows fall into
TOY_BLOCKS equal groups), so both the GP and the GA run on it. It lives in the package (not in
tests/) so that Ray workers can import it.
"""

from __future__ import annotations

import math
import os
import time
from pathlib import Path

import torch

from prunerzero.core.protocol import parse_pattern
from prunerzero.core.results import FitnessResult
from prunerzero.fitness.spec import EvalSpec
from prunerzero.pruning.candidates import Allocation
from prunerzero.pruning.masks import MaskDigest

from .config import from_dict
from .problems import TOY_BLOCKS

ROWS_PER_WINDOW = 4


class ToyEvaluator:
    def __init__(self, spec: EvalSpec, crash_file: str | None = None, crash_at: int | None = None,
                 delay_s: float = 0.0):
        """`crash_at`: kill this process (os._exit) on its crash_at-th call — every time, or, with
        `crash_file`, only while that file does not exist (it is created first, so that the
        retry on a new worker succeeds). `delay_s`: sleep in every call (a slow evaluation)."""
        self.spec, self.delay_s = spec, delay_s
        self.crash_file, self.crash_at, self.calls = crash_file, crash_at, 0
        g = torch.Generator().manual_seed(spec.protocol.seed)
        n_in, n_out = 48, 32
        channel_scale = torch.rand(n_in, generator=g).pow(3) * 8 + 0.2  # a few outlier channels
        self.W = torch.randn(n_out, n_in, generator=g) * 0.05
        calib = torch.randn(spec.protocol.calib_windows * ROWS_PER_WINDOW, n_in, generator=g) * channel_scale
        self.inputs = torch.randn(spec.protocol.eval_windows * ROWS_PER_WINDOW, n_in, generator=g) * channel_scale
        self.X = calib.pow(2).mean(0)
        self.G = (calib @ self.W.T).abs().mean(0, keepdim=True).T * calib.abs().mean(0) + 1e-6

    def evaluate(self, candidate, max_windows: int | None = None, known=None) -> FitnessResult:
        self._maybe_crash()
        time.sleep(self.delay_s)
        start = time.perf_counter()
        windows = min(max_windows or self.spec.protocol.eval_windows, self.spec.protocol.eval_windows)
        inputs = self.inputs[: windows * ROWS_PER_WINDOW]
        metric = candidate.resolved if isinstance(candidate, Allocation) else candidate
        try:
            scores = metric(self.W, self.G, self.X)
            if not torch.isfinite(scores).all():
                raise ValueError("non-finite scores")
            mask = self._mask(scores, candidate.sparsities if isinstance(candidate, Allocation) else None)
            digest = MaskDigest()
            digest.add("toy", mask)
            phenotype = digest.hexdigest()
            if known and phenotype in known:
                return FitnessResult(candidate.key, known[phenotype], "ok", "", time.perf_counter() - start,
                                     inputs.shape[0], 1.0 - float(mask.float().mean()), phenotype, False)
            dense, pruned = inputs @ self.W.T, inputs @ (self.W * mask).T
            error = float((dense - pruned).pow(2).sum() / dense.pow(2).sum())
            ppl = 10.0 * math.exp(5.0 * error)
            return FitnessResult(candidate.key, ppl, "ok", "", time.perf_counter() - start,
                                 inputs.shape[0], 1.0 - float(mask.float().mean()), phenotype)
        except Exception as e:  # the evaluator's contract: a failure is data, never raised
            return FitnessResult(getattr(candidate, "key", str(candidate)), math.nan, "failed",
                                 f"{type(e).__name__}: {e}", time.perf_counter() - start, 0)

    def _mask(self, scores: torch.Tensor, sparsities=None) -> torch.Tensor:
        """Kept weights (True = kept); `sparsities`: one per block of rows (an allocation)."""
        target = self.spec.target
        nm = parse_pattern(target["pattern"])
        if nm is not None:
            n, m = nm
            groups = scores.reshape(-1, m)
            keep = torch.zeros_like(groups, dtype=torch.bool).scatter_(1, groups.topk(n, dim=1).indices, True)
            return keep.reshape(scores.shape)
        if sparsities is not None:
            if len(sparsities) != TOY_BLOCKS or target["group"] != "row":
                raise ValueError(f"the toy allocates {TOY_BLOCKS} sparsities over rows")
            blocks = scores.chunk(TOY_BLOCKS)
            return torch.cat([self._keep_rows(b, s) for b, s in zip(blocks, sparsities)])
        if target["group"] == "row":
            return self._keep_rows(scores, target["sparsity"])
        return self._keep_rows(scores.reshape(1, -1), target["sparsity"]).reshape(scores.shape)

    @staticmethod
    def _keep_rows(rows: torch.Tensor, sparsity: float) -> torch.Tensor:
        k = rows.shape[1] - int(rows.shape[1] * sparsity)
        return torch.zeros_like(rows, dtype=torch.bool).scatter_(1, rows.topk(k, dim=1).indices, True)

    def _maybe_crash(self) -> None:
        self.calls += 1
        if self.crash_at != self.calls:
            return
        if self.crash_file:
            if Path(self.crash_file).exists():
                return
            Path(self.crash_file).touch()
        os._exit(1)


def toy_config(root: str | Path, name: str = "toy", **sections):
    """A small campaign on the toy evaluator under `root` (runs and cache), for tests and demos.
    `sections` override whole tables by name, e.g. search={"population": 8}."""
    data = {"name": name, "runs_dir": str(Path(root) / "runs"), "cache": str(Path(root) / "fitness.sqlite"),
            "eval": {"model": "toy"}, "protocol": {"calib_windows": 4, "eval_windows": 8},
            "search": {"population": 12, "generations": 3, "hall_of_fame": 5}}
    for section, values in sections.items():
        data[section] = {**data.get(section, {}), **values}
    return from_dict(data)
