"""Perplexity per the protocol: exp(mean token NLL) over non-overlapping windows, with
log-probabilities computed in float32 from the logits whatever the model's dtype."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F


IGNORE = -100  # target id that cross_entropy skips


@dataclass(frozen=True)
class PerplexityResult:
    perplexity: float
    nll: float  # mean token negative log-likelihood (nats)
    tokens: int  # predicted tokens


@torch.no_grad()
def perplexity(model, windows: torch.Tensor, batch_size: int = 4) -> PerplexityResult:
    """Each window predicts its own tokens 2..L from the preceding ones (as Wanda/SparseGPT)."""
    device = next(model.parameters()).device
    total, count = 0.0, 0
    for i in range(0, windows.shape[0], batch_size):
        ids = windows[i : i + batch_size].to(device)
        logits = model(ids, use_cache=False).logits
        # the last position predicts nothing: ignore it rather than slice, which would copy the
        # (batch, length, vocabulary) logits to make them contiguous
        targets = F.pad(ids[:, 1:], (0, 1), value=IGNORE)
        nll = F.cross_entropy(logits.float().view(-1, logits.shape[-1]), targets.reshape(-1), reduction="sum",
                              ignore_index=IGNORE)
        total += float(nll)
        count += ids[:, 1:].numel()
    mean = total / max(count, 1)
    return PerplexityResult(perplexity=math.exp(mean) if math.isfinite(mean) and mean < 700 else math.inf,
                            nll=mean, tokens=count)
