"""How an unstructured budget is spread over the decoder blocks.

- `uniform`: every block at the target sparsity (Wanda, SparseGPT, Pruner-Zero).
- `owl`: Outlier-Weighed Layerwise sparsity (Yin et al., 2024): a block whose Wanda scores
  |W|·‖x‖ hold more outliers (scores above M times the block's mean) keeps more weights; the
  outlier ratios are min-max scaled to [0, 2λ] and centred on the target density, so the total
  stays the target (blocks of equal size). M = 5, λ = 0.08 as the paper's LLaMA settings.

An evolved allocation (evolve/genome.py's AllocationProblem) is an `Allocation` candidate instead.
"""

from __future__ import annotations

import torch

ALLOCATIONS = ("uniform", "owl")
OWL_M = 5.0
OWL_LAMBDA = 0.08


def owl_ratios(units, stats, m: float = OWL_M) -> dict[int, float]:
    """Per block, the fraction of Wanda scores above m times the block's mean score."""
    per_block: dict[int, list[torch.Tensor]] = {}
    for u in units:
        scores = u.weight.float().abs() * stats.X[u.name].float().to(u.weight.device).sqrt()
        per_block.setdefault(u.block, []).append(scores.reshape(-1))
    out = {}
    for block, parts in per_block.items():
        scores = torch.cat(parts)
        out[block] = float((scores > m * scores.mean()).float().mean())
    return out


def owl_sparsities(units, stats, sparsity: float, lam: float = OWL_LAMBDA, m: float = OWL_M) -> dict[int, float]:
    """Block -> sparsity under OWL's rule, with the mean at the target."""
    ratios = owl_ratios(units, stats, m)
    blocks = sorted(ratios)
    r = torch.tensor([ratios[b] for b in blocks], dtype=torch.float64)
    span = float(r.max() - r.min())
    scaled = (r - r.min()) / span * 2 * lam if span > 0 else torch.zeros_like(r)
    density = scaled - scaled.mean() + (1 - sparsity)
    return {b: float(min(max(1 - d, 0.0), 0.99)) for b, d in zip(blocks, density)}
