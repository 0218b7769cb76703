"""Fitness measures: what "how good is the pruned model" means in a search. Lower is better.

- `perplexity` (default): exp(mean token NLL) on the evaluation windows.
- `kl`: mean over tokens of KL(dense ‖ pruned) between next-token distributions (EvoPress,
  OptiShear): the dense model's log-probabilities are computed once per evaluator, kept in
  float16 on the host, and every candidate is compared with them. It sees every token's whole
  distribution, not only the observed next token.

A measure is `prepare(model, windows)` once on the dense model, then `__call__(model, windows)`
per candidate on a prefix of those windows. To add one (task accuracy: 1 - accuracy, say), write
the class and name it in `MEASURES`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .perplexity import LOSS_CHUNK_BYTES, DEFAULT_LOSS_CHUNK_BYTES, perplexity

KL_MAX_BYTES = 4 << 30  # dense log-probabilities an evaluator may hold for `kl`


@dataclass(frozen=True)
class Measurement:
    value: float
    tokens: int


class Perplexity:
    name = "perplexity"

    def prepare(self, model, windows: torch.Tensor) -> None:
        pass

    def __call__(self, model, windows: torch.Tensor) -> Measurement:
        r = perplexity(model, windows)
        return Measurement(r.perplexity, r.tokens)


class KLDivergence:
    name = "kl"

    def __init__(self, batch_size: int = 4):
        self.batch_size = batch_size
        self.dense: torch.Tensor | None = None  # (windows, seq_len - 1, vocab) float16 log-probs

    @torch.no_grad()
    def prepare(self, model, windows: torch.Tensor) -> None:
        vocab = model.get_output_embeddings().weight.shape[0]
        size = windows.shape[0] * (windows.shape[1] - 1) * vocab * 2
        if size > KL_MAX_BYTES:
            raise ValueError(
                f"fitness 'kl' would hold {size / 2**30:.1f} GiB of dense log-probabilities for "
                f"{windows.shape[0]}x{windows.shape[1]} tokens (limit {KL_MAX_BYTES / 2**30:.0f} GiB): "
                "use fewer evaluation windows or shorter windows")
        device = next(model.parameters()).device
        out = []
        for i in range(0, windows.shape[0], self.batch_size):
            logits = model(windows[i:i + self.batch_size].to(device), use_cache=False).logits[:, :-1]
            out.append(torch.log_softmax(logits.float(), dim=-1).to("cpu", torch.float16))
        self.dense = torch.cat(out)

    @torch.no_grad()
    def __call__(self, model, windows: torch.Tensor) -> Measurement:
        if self.dense is None or windows.shape[0] > self.dense.shape[0]:
            raise RuntimeError("KL divergence needs prepare() on the dense model over these windows first")
        device = next(model.parameters()).device
        total = torch.zeros((), dtype=torch.float64, device=device)
        for i in range(0, windows.shape[0], self.batch_size):
            logits = model(windows[i:i + self.batch_size].to(device), use_cache=False).logits[:, :-1]
            total += kl_sum(self.dense[i:i + logits.shape[0]].to(device), logits)
        tokens = windows.shape[0] * (windows.shape[1] - 1)
        return Measurement(float(total) / max(tokens, 1), tokens)


def kl_sum(dense_logp: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
    """Σ over positions of KL(p ‖ q), p = exp(dense_logp), q = softmax(logits); float32, a chunk of
    positions at a time (as the loss), summed in float64."""
    vocab = logits.shape[-1]
    chunk = max(1, LOSS_CHUNK_BYTES.get(logits.device.type, DEFAULT_LOSS_CHUNK_BYTES) // (4 * vocab))
    total = torch.zeros((), dtype=torch.float64, device=logits.device)
    for p_row, q_row in zip(dense_logp, logits):
        for j in range(0, q_row.shape[0], chunk):
            logq = torch.log_softmax(q_row[j:j + chunk].float(), dim=-1)
            total += F.kl_div(logq, p_row[j:j + chunk].float(), log_target=True, reduction="sum").double()
    return total


MEASURES = {"perplexity": Perplexity, "kl": KLDivergence}


def make_measure(name: str):
    if name not in MEASURES:
        raise ValueError(f"unknown fitness {name!r}: use one of {', '.join(MEASURES)}")
    return MEASURES[name]()
