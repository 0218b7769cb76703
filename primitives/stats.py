"""Calibration statistics: the terminals G and X for every prunable unit, from one pass.

- X: forward hooks (the adapter's input taps) accumulate Σ x_j² and the token count per tap, in
  float32, whatever the model's dtype: X = Σ x² / tokens.
- G: one backward per calibration window (per-sample gradients, as Pruner-Zero / GBLM-Pruner):
  a post-accumulate-grad hook adds g² (float32) into one accumulator per parameter and frees the
  gradient at once, so no second gradient-sized buffer is ever held: peak memory is the model,
  one float32 accumulator the size of the pruned weights, and one sample's activations.
  G = √Σ g².

Statistics are cached on disk (safetensors) keyed by model, corpus tokens and protocol, with a
checksum; a cached file that does not verify (checksum, parse, finite values, every unit present)
is named, set aside and recomputed (core/integrity.py).
"""

from __future__ import annotations

import hashlib
import json
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors.torch import load, save

from prunerzero.core.integrity import CorruptCache, set_aside, sha256
from prunerzero.core.paths import atomic_write_bytes, atomic_write_text, cache_dir


@dataclass
class LayerStats:
    """X (in,) and G (out, in) per unit name, float32, with what they were computed from."""

    X: dict[str, torch.Tensor] = field(default_factory=dict)
    G: dict[str, torch.Tensor] = field(default_factory=dict)
    meta: dict = field(default_factory=dict)

    def has(self, terminal: str) -> bool:
        return terminal == "W" or bool(getattr(self, terminal))

    def for_unit(self, name: str, needs) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """(G, X) for a unit; only what `needs` asks for (None otherwise)."""
        g = self.G[name] if "G" in needs else None
        x = self.X[name] if "X" in needs else None
        return g, x

    def to(self, device, dtype=None) -> "LayerStats":
        move = lambda d: {k: v.to(device=device, dtype=dtype or v.dtype) for k, v in d.items()}  # noqa: E731
        return LayerStats(move(self.X), move(self.G), dict(self.meta))

    def save(self, path: Path) -> None:
        path.mkdir(parents=True, exist_ok=True)
        tensors = {f"X::{k}": v.contiguous() for k, v in self.X.items()}
        tensors |= {f"G::{k}": v.contiguous() for k, v in self.G.items()}
        data = save(tensors)
        # unique temporary file + os.replace: evaluators calibrating at once never mix their bytes;
        # the checksum goes last, so a file without its checksum is never trusted
        atomic_write_bytes(path / "stats.safetensors", data)
        meta = {**self.meta, "sha256": sha256(data)}
        atomic_write_text(path / "meta.json", json.dumps(meta, indent=1, sort_keys=True))

    @classmethod
    def load(cls, path: Path, units=()) -> "LayerStats":
        """Read and verify a cached file: its checksum, its parse, finite values, and X (and G if
        it says it has G) for every unit in `units`. Raises CorruptCache naming what failed."""
        try:
            data = (path / "stats.safetensors").read_bytes()
            meta = json.loads((path / "meta.json").read_text())
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
            raise CorruptCache(f"unreadable: {type(e).__name__}: {e}") from None
        if not isinstance(meta, dict):
            raise CorruptCache("meta.json is not a table")
        if "sha256" in meta and meta["sha256"] != sha256(data):
            raise CorruptCache("checksum mismatch: stats.safetensors is not the file meta.json describes")
        try:
            tensors = load(data)
        except Exception as e:  # safetensors raises its own error types for a bad header
            raise CorruptCache(f"does not parse: {e}") from None
        out = cls(meta=meta)
        for k, v in tensors.items():
            kind, _, name = k.partition("::")
            if kind not in ("X", "G") or not torch.isfinite(v).all():
                raise CorruptCache(f"{k!r}: {'non-finite values' if kind in ('X', 'G') else 'unknown entry'}")
            getattr(out, kind)[name] = v
        missing = [u.name for u in units if u.name not in out.X or (meta.get("G") and u.name not in out.G)]
        if missing:
            raise CorruptCache(f"no statistics for {len(missing)} unit(s), e.g. {missing[0]}")
        if "sha256" not in meta:  # written before checksums: verified above, checksummed from now on
            out.meta["sha256"] = sha256(data)
            atomic_write_text(path / "meta.json", json.dumps(out.meta, indent=1, sort_keys=True))
        return out


class ActivationAccumulator:
    """Σ x² per input channel and token counts, per tap (float32)."""

    def __init__(self) -> None:
        self.sumsq: dict[str, torch.Tensor] = {}
        self.count: dict[str, int] = {}

    def __call__(self, tap: str, rows: torch.Tensor) -> None:
        sq = rows.detach().float().square().sum(dim=0)
        if tap in self.sumsq:
            self.sumsq[tap] += sq
        else:
            self.sumsq[tap] = sq
        self.count[tap] = self.count.get(tap, 0) + rows.shape[0]

    def mean(self, tap: str) -> torch.Tensor:
        return self.sumsq[tap] / max(self.count[tap], 1)


def x_for_units(units, acc: ActivationAccumulator) -> dict[str, torch.Tensor]:
    """X per unit; a unit whose tap saw no token (an expert no calibration token reached) gets
    zeros, which every operator handles."""
    return {u.name: acc.mean(u.tap) if u.tap in acc.sumsq else torch.zeros(u.shape[1], device=u.weight.device)
            for u in units}


def collect_stats(model, adapter, windows: torch.Tensor, need_g: bool, batch_size: int = 8,
                  progress=None, accumulate_on: str | torch.device | None = None) -> LayerStats:
    """One calibration pass over `windows` (n, seq_len): X always; G when `need_g`.
    With G, windows go one at a time (per-sample gradients); without, in batches under no_grad.
    `accumulate_on="cpu"` keeps the float32 g² accumulators in host memory, so that the GPU holds
    only the model, one parameter's gradient and one sample's activations (for models whose
    float32 accumulator would not fit beside them)."""
    units = adapter.prunable()
    acc = ActivationAccumulator()
    device = next(model.parameters()).device
    t0 = time.perf_counter()
    with adapter.capture(acc):
        g = _gradient_pass(model, units, windows, device, progress, accumulate_on) if need_g else None
        if g is None:
            _forward_pass(model, windows, device, batch_size, progress)
    stats = LayerStats(X=x_for_units(units, acc), G=g or {})
    stats.meta = {"windows": int(windows.shape[0]), "seq_len": int(windows.shape[1]), "G": need_g,
                  "seconds": round(time.perf_counter() - t0, 2)}
    return stats


@torch.no_grad()
def _forward_pass(model, windows, device, batch_size, progress) -> None:
    for i in range(0, windows.shape[0], batch_size):
        model(windows[i : i + batch_size].to(device), use_cache=False)
        if progress:
            progress(min(i + batch_size, windows.shape[0]), windows.shape[0])


def _gradient_pass(model, units, windows, device, progress, accumulate_on=None) -> dict[str, torch.Tensor]:
    params = {id(u.param): u.param for u in units}
    accum = {pid: torch.zeros(p.shape, dtype=torch.float32, device=accumulate_on or p.device)
             for pid, p in params.items()}

    def add_square(p: torch.Tensor) -> None:
        accum[id(p)].add_(p.grad.float().square().to(accum[id(p)].device))
        p.grad = None  # free at once: never a full gradient buffer for the model

    was_training = model.training
    flags = [(p, p.requires_grad) for p in model.parameters()]
    model.eval()  # no dropout: gradients of the model as it will be evaluated
    model.requires_grad_(False)  # only the pruned weights get gradients: none for embeddings, norms, head
    for p in params.values():
        p.grad = None  # a stale gradient would be summed into the first window's
        p.requires_grad_(True)  # before hooking: torch hooks only tensors that require grad
    handles = [p.register_post_accumulate_grad_hook(add_square) for p in params.values()]
    try:
        for i in range(windows.shape[0]):
            ids = windows[i : i + 1].to(device)
            model(ids, labels=ids, use_cache=False).loss.backward()
            if progress:
                progress(i + 1, windows.shape[0])
    finally:
        for h in handles:
            h.remove()
        for p, flag in flags:  # leave the model as it came
            p.requires_grad_(flag)
        for p in params.values():
            p.grad = None
        model.train(was_training)
    return {u.name: accum[id(u.param)][u.index].sqrt() if u.index else accum[id(u.param)].sqrt() for u in units}


def stats_cache_path(model_id: str, tokens_fingerprint: str, calibration_key: str) -> Path:
    key = hashlib.sha256(f"{model_id}|{tokens_fingerprint}|{calibration_key}".encode()).hexdigest()[:16]
    return cache_dir("stats") / key


def load_or_collect(path: Path, model, adapter, windows, need_g: bool, meta: dict, log=print) -> LayerStats:
    """Statistics from the disk cache when present, verified (and holding G if needed), else
    computed and saved. A cache entry that does not verify is set aside and recomputed."""
    if path.exists():
        try:
            stats = LayerStats.load(path, adapter.prunable())
            if stats.meta.get("G") or not need_g:
                log(f"statistics: cached at {path}")
                return stats
        except CorruptCache as e:
            set_aside(path, str(e), log)
    log(f"statistics: calibrating on {windows.shape[0]} windows x {windows.shape[1]} tokens"
        f"{' with gradients' if need_g else ''}")
    stats = collect_stats(model, adapter, windows, need_g)
    stats.meta |= meta
    stats.save(path)
    log(f"statistics: {stats.meta['seconds']}s, saved at {path}")
    return stats
