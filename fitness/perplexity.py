"""Perplexity per the protocol: exp(mean token NLL) over non-overlapping windows, with
log-probabilities computed in float32 from the logits whatever the model's dtype."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

# float32 log-probabilities the loss holds at once: on CPU small enough for the allocator to
# reuse one block (a whole batch's would be fresh memory, page-faulted in on every forward);
# on a GPU a few large chunks (kernel launches count there)
LOSS_CHUNK_BYTES = {"cpu": 16 << 20}
DEFAULT_LOSS_CHUNK_BYTES = 512 << 20


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
        logits = model(ids, use_cache=False).logits[:, :-1]  # the last position predicts nothing
        total += nll_sum(logits, ids[:, 1:])
        count += ids[:, 1:].numel()
    mean = total / max(count, 1)
    return PerplexityResult(perplexity=math.exp(mean) if math.isfinite(mean) and mean < 700 else math.inf,
                            nll=mean, tokens=count)


def nll_sum(logits: torch.Tensor, targets: torch.Tensor) -> float:
    """Sum over positions of -log softmax(logits)[target], in float32, a chunk of positions at a
    time (the float32 log-softmax of a whole batch is as large as its logits)."""
    vocab = logits.shape[-1]
    chunk = max(1, LOSS_CHUNK_BYTES.get(logits.device.type, DEFAULT_LOSS_CHUNK_BYTES) // (4 * vocab))
    total = torch.zeros((), dtype=torch.float64, device=logits.device)
    for row, tgt in zip(logits, targets):  # a window at a time: its positions are contiguous
        for j in range(0, tgt.numel(), chunk):
            total += F.cross_entropy(row[j : j + chunk].float(), tgt[j : j + chunk], reduction="sum")
    return float(total)
