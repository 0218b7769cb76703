"""Perplexity per the protocol: exp(mean token NLL) over non-overlapping windows, with
log-probabilities computed in float32 from the logits whatever the model's dtype."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F


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
        logits = model(ids, use_cache=False).logits[:, :-1]
        nll = F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1), reduction="sum")
        total += float(nll)
        count += ids[:, 1:].numel()
    mean = total / max(count, 1)
    return PerplexityResult(perplexity=math.exp(mean) if math.isfinite(mean) and mean < 700 else math.inf,
                            nll=mean, tokens=count)
