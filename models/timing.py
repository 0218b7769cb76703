"""How long one forward of a model takes, wall clock: a prefill, and decoded tokens with the KV
cache. The one implementation behind `fitness/speed.py` (pruned against dense, interleaved) and
`pruning/structured/latency.py` (per-sublayer latency tables, whose hooks record only inside `timed`)."""

from __future__ import annotations

import contextlib
import time

import torch


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _device(model) -> torch.device:
    return next(model.parameters()).device


@torch.no_grad()
def prefill_seconds(model, ids: torch.Tensor, timed=contextlib.nullcontext, logits_to_keep: int = 0) -> float:
    """Seconds of one forward of `ids` (batch, seq_len), no cache; `timed()` is entered around it.
    `logits_to_keep=1` computes the last position's logits only, as generation's prefill does
    (0: every position's, as a perplexity pass does)."""
    device = _device(model)
    ids = ids.to(device)
    sync(device)
    with timed():
        t0 = time.perf_counter()
        model(ids, use_cache=False, logits_to_keep=logits_to_keep)
        sync(device)
        return time.perf_counter() - t0


@torch.no_grad()
def decode_seconds(model, ids: torch.Tensor, new_tokens: int, timed=contextlib.nullcontext) -> float:
    """Seconds per generated token after an (untimed) prefill of `ids`, greedy, with the KV cache."""
    device = _device(model)
    out = model(ids.to(device), use_cache=True)
    cache, token = out.past_key_values, out.logits[:, -1:].argmax(-1)
    sync(device)
    with timed():
        t0 = time.perf_counter()
        for _ in range(new_tokens):
            out = model(token, past_key_values=cache, use_cache=True)
            cache, token = out.past_key_values, out.logits[:, -1:].argmax(-1)
        sync(device)
        return (time.perf_counter() - t0) / new_tokens
