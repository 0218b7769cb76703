"""Wall-clock speed of models on the machine at hand: prefill latency and tokens/s at a stated batch
and length, and one-token decode with the KV cache — measured, never inferred from parameter
counts. Models are timed interleaved (A B A B …) after a warm-up, so a machine whose speed drifts
moves all of them together; `ratio` takes the ratio per repeat, then the median.
"""

from __future__ import annotations

import statistics
from dataclasses import dataclass, field

import torch

from prunerzero.models.timing import decode_seconds, prefill_seconds


@dataclass(frozen=True)
class Speed:
    batch: int
    seq_len: int
    prefill_s: list[float] = field(default_factory=list)  # one forward of (batch, seq_len), per repeat
    decode_s: list[float] = field(default_factory=list)  # per generated token (KV cache), per repeat

    @property
    def prefill_ms(self) -> float:
        return 1e3 * statistics.median(self.prefill_s)

    @property
    def prefill_tokens_per_s(self) -> float:
        return self.batch * self.seq_len / statistics.median(self.prefill_s)

    @property
    def decode_ms(self) -> float:
        return 1e3 * statistics.median(self.decode_s) if self.decode_s else float("nan")

    @property
    def decode_tokens_per_s(self) -> float:
        return self.batch / statistics.median(self.decode_s) if self.decode_s else float("nan")


def compare(models: dict, ids: torch.Tensor, repeats: int = 5, warmup: int = 1, decode_tokens: int = 16,
            logits_to_keep: int = 0) -> dict:
    """Speed of each named model on the same token ids (batch, seq_len), interleaved per repeat;
    `logits_to_keep=1`: prefill computes the last position's logits only (generation's prefill)."""
    if repeats < 1 or warmup < 0:
        raise ValueError(f"repeats must be >= 1 and warmup >= 0, got {repeats}, {warmup}")
    out = {name: Speed(ids.shape[0], ids.shape[1]) for name in models}
    for rep in range(warmup + repeats):
        for name, model in models.items():
            prefill = prefill_seconds(model, ids, logits_to_keep=logits_to_keep)
            decode = decode_seconds(model, ids, decode_tokens) if decode_tokens else None
            if rep >= warmup:
                out[name].prefill_s.append(prefill)
                if decode is not None:
                    out[name].decode_s.append(decode)
    return out


def ratio(a: Speed, b: Speed, what: str = "prefill") -> float:
    """Median over repeats of b's time / a's time: how many times faster a is than b."""
    xs, ys = (a.prefill_s, b.prefill_s) if what == "prefill" else (a.decode_s, b.decode_s)
    return statistics.median(y / x for x, y in zip(xs, ys))
