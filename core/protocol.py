"""The measurement protocol: how statistics are calibrated and perplexity is measured.

Every leaderboard row and every campaign records the protocol it used (`Protocol.fingerprint`),
and every cache (statistics, fitness) is keyed by it.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, fields, replace

PATTERNS_HELP = "'unstructured' or N:M such as '2:4'"


@dataclass(frozen=True)
class Protocol:
    seq_len: int = 1024  # tokens per window, calibration and evaluation
    calib_windows: int = 128  # random windows from the train split
    eval_windows: int = 128  # at most this many non-overlapping windows of the evaluated split
    seed: int = 0  # calibration window sampling
    train_frac: float = 0.8  # splits by position: train | valid | test
    valid_frac: float = 0.1
    stats_mode: str = "one-shot"  # or "sequential": each block's X from already-pruned blocks
    bos: str = "auto"  # a BOS token first in every window: "auto" (where the tokenizer adds one), "always", "never"

    def __post_init__(self) -> None:
        for name in ("seq_len", "calib_windows", "eval_windows"):
            if int(getattr(self, name)) < 1:
                raise ValueError(f"protocol {name} must be >= 1, got {getattr(self, name)}")
        if not (0 < self.train_frac < 1 and 0 < self.valid_frac < 1 and self.train_frac + self.valid_frac < 1):
            raise ValueError(
                f"protocol fractions train={self.train_frac}, valid={self.valid_frac} must be in (0, 1) "
                "and leave a test split"
            )
        if self.stats_mode not in ("one-shot", "sequential"):
            raise ValueError(f"unknown stats_mode {self.stats_mode!r}: use 'one-shot' or 'sequential'")
        if self.bos not in ("auto", "always", "never"):
            raise ValueError(f"unknown bos {self.bos!r}: use 'auto', 'always' or 'never'")

    @property
    def fractions(self) -> tuple[float, float, float]:
        return (self.train_frac, self.valid_frac, 1 - self.train_frac - self.valid_frac)

    def _hashed(self) -> dict:
        # the default bos ("auto") is left out, so protocols of earlier versions keep their keys
        return {k: v for k, v in asdict(self).items() if not (k == "bos" and v == "auto")}

    def calibration_key(self) -> str:
        """What the calibration statistics depend on (not the evaluation budget)."""
        d = {k: v for k, v in self._hashed().items() if k != "eval_windows"}
        return hashlib.sha256(json.dumps(d, sort_keys=True).encode()).hexdigest()[:12]

    def fingerprint(self) -> str:
        return hashlib.sha256(json.dumps(self._hashed(), sort_keys=True).encode()).hexdigest()[:12]

    def describe(self) -> str:
        return (f"calib {self.calib_windows}x{self.seq_len} seed {self.seed}, eval <= {self.eval_windows}x{self.seq_len}, "
                f"split {self.train_frac:g}/{self.valid_frac:g}, stats {self.stats_mode}"
                + ("" if self.bos == "auto" else f", bos {self.bos}"))

    def with_(self, **changes) -> "Protocol":
        known = {f.name for f in fields(self)}
        unknown = set(changes) - known
        if unknown:
            raise ValueError(f"unknown protocol field(s) {sorted(unknown)}; known: {sorted(known)}")
        return replace(self, **changes)


def parse_pattern(pattern: str) -> tuple[int, int] | None:
    """'unstructured' → None; 'N:M' → (N, M) with 0 < N < M."""
    p = pattern.strip().lower()
    if p == "unstructured":
        return None
    n, sep, m = p.partition(":")
    if sep and n.isdigit() and m.isdigit() and 0 < int(n) < int(m):
        return int(n), int(m)
    raise ValueError(f"unknown pattern {pattern!r}: use {PATTERNS_HELP} with 0 < N < M")


def check_sparsity(sparsity: float) -> float:
    s = float(sparsity)
    if not 0.0 <= s < 1.0:
        raise ValueError(f"sparsity {sparsity} is out of range: it must be in [0, 1)")
    return s
