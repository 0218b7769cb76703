"""Wall-clock speed of models on the machine at hand: prefill latency and tokens/s at a stated batch
and length, and one-token decode with the KV cache — measured, never inferred from parameter
counts. Models are timed interleaved (A B A B …) after a warm-up, so a machine whose speed drifts
moves all of them together; `ratio` takes the ratio per repeat, then the median.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import platform
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


@dataclass(frozen=True)
class SpeedProtocol:
    """How speed is measured beside perplexity: prefill of (batch, seq_len) test tokens and
    `decode_tokens` greedy tokens with the KV cache after it, `repeats` interleaved repeats."""

    batch: int = 1
    seq_len: int = 256
    repeats: int = 5
    decode_tokens: int = 16

    def columns(self, dense, pruned, windows) -> dict:
        """The leaderboard's speed columns of `pruned` against `dense` on the first windows."""
        ids = windows[: self.batch, : self.seq_len]
        if ids.shape != (self.batch, self.seq_len):
            raise ValueError(f"speed needs {self.batch} windows of {self.seq_len} tokens; the split gives {tuple(windows.shape)}")
        got = compare({"dense": dense, "pruned": pruned}, ids, self.repeats, 1, self.decode_tokens)
        d, p = got["dense"], got["pruned"]
        return {"latency_ms": p.prefill_ms, "dense_latency_ms": d.prefill_ms,
                "tokens_per_s": p.prefill_tokens_per_s, "dense_tokens_per_s": d.prefill_tokens_per_s,
                "decode_tokens_per_s": p.decode_tokens_per_s, "dense_decode_tokens_per_s": d.decode_tokens_per_s}


def machine() -> str:
    """The machine a timing was taken on, in words (every benchmark report names it)."""
    if torch.cuda.is_available():
        return f"GPU {torch.cuda.get_device_name(0)}, {os.cpu_count()} CPU cores, torch {torch.__version__}"
    cpu = platform.processor() or "cpu"
    try:
        cpu = next(ln.split(":", 1)[1].strip() for ln in open("/proc/cpuinfo") if ln.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return f"CPU {cpu}, {os.cpu_count()} cores, torch {torch.__version__} ({torch.get_num_threads()} threads)"


_THREADS = torch.get_num_threads()  # the process's threads before any `exclusive` turned them down


@contextlib.contextmanager
def exclusive(lock: str | None, threads: int | None = None):
    """Time alone: with a lock file, hold it exclusively with `threads` (default: all) torch
    threads, and run on one thread outside it (a busy second core stalls two-thread kernels).
    Without a lock file, nothing changes."""
    if not lock:
        yield
        return
    threads = threads or _THREADS
    with open(lock, "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        torch.set_num_threads(threads)
        try:
            yield
        finally:
            torch.set_num_threads(1)
            fcntl.flock(f, fcntl.LOCK_UN)
