"""Probe statistics: small fixed (W, G, X) on which two formulas are compared before one stands in
for the other (a simplified tree for an offspring, a canonical form for a tree's cache key).

Real statistics have exact zeros (a channel no calibration token reached has X = 0 and G = 0)
and ties (quantised weights repeat values), and rewrites that are algebra on the reals — x/x = 1,
log∘exp = id — are not identities of the protected operators there (`div(0, 0)` is 0). So the
probes hold zeros and ties beside random values at unit scale, at a trained LLM's scale and with
outlier channels; and "the same" means what pruning means: the same order of every weight in
every row and in the whole layer (hence the same masks at every sparsity, per row, per layer and
N:M — ties broken by position as the masks break them), with values close as well (the group
reducers of the structural modes add scores up). Orders are compared in exact arithmetic: values
that differ only by float rounding count as tied (`exact_ties`).
"""

from __future__ import annotations

from functools import lru_cache

import torch

ROWS, COLS = 12, 16  # 16 columns: N:M groups of 2, 4, 8 and 16 fit


@lru_cache(maxsize=1)
def probe_tensors() -> tuple[dict[str, torch.Tensor], ...]:
    """Fixed probes in float64 (so a comparison sees a rewrite, not float32 rounding)."""
    g = torch.Generator().manual_seed(1234)
    out = []
    for w, gr, x in ((1.0, 1.0, 1.0), (0.02, 1e-3, 0.1)):  # unit scale; a trained LLM's scale
        out.append({"W": torch.randn(ROWS, COLS, generator=g, dtype=torch.float64) * w,
                    "G": torch.rand(ROWS, COLS, generator=g, dtype=torch.float64) * gr + gr * 0.05,
                    "X": torch.rand(COLS, generator=g, dtype=torch.float64) * x + x * 0.05})
    out.append(_zeros_and_ties(g))
    out.append(_outliers(g))
    out.append(_mixed(g))
    return tuple(out)


def _zeros_and_ties(g: torch.Generator) -> dict[str, torch.Tensor]:
    """A quarter of W and G exactly zero, values repeated (rounded), and two channels no token
    reached (X = 0, hence G = 0 in their columns), one of them with zero weights as well: there
    every statistic is 0 at once, where protected operators part from algebra (div(a, 0) keeps
    the sign of a 0 denominator, so a/b and (-a)/(-b) differ)."""
    w = (torch.randn(ROWS, COLS, generator=g, dtype=torch.float64) * 4).round() / 8
    grad = (torch.rand(ROWS, COLS, generator=g, dtype=torch.float64) * 8).round() / 64
    grad[torch.rand(ROWS, COLS, generator=g) < 0.25] = 0.0
    x = (torch.rand(COLS, generator=g, dtype=torch.float64) * 6).round() / 4
    x[[3, 11]] = 0.0
    grad[:, [3, 11]] = 0.0
    w[:, 11] = 0.0
    return {"W": w, "G": grad, "X": x}


def _outliers(g: torch.Generator) -> dict[str, torch.Tensor]:
    """A few input channels orders of magnitude louder than the rest (as in LLM activations)."""
    x = torch.rand(COLS, generator=g, dtype=torch.float64) * 0.5 + 0.01
    x[[1, 7]] = torch.tensor([3e3, 8e4], dtype=torch.float64)
    return {"W": torch.randn(ROWS, COLS, generator=g, dtype=torch.float64) * 0.05,
            "G": torch.rand(ROWS, COLS, generator=g, dtype=torch.float64) * 1e-2,
            "X": x}


def _mixed(g: torch.Generator) -> dict[str, torch.Tensor]:
    """All of it at once, as real statistics have it: quantised weights, a fifth of the gradients
    exactly zero, channels never reached and channels far louder than the rest — so zeros meet
    outliers (log(G) at G = 0 beside X = 1e3)."""
    rows, cols = 2 * ROWS, 2 * COLS
    w = (torch.randn(rows, cols, generator=g, dtype=torch.float64) * 6).round() / 16
    grad = torch.rand(rows, cols, generator=g, dtype=torch.float64) * 0.3
    grad[torch.rand(rows, cols, generator=g) < 0.2] = 0.0
    x = torch.rand(cols, generator=g, dtype=torch.float64) * 2 + 0.01
    x[[4, 17]], x[[9, 26]] = 0.0, torch.tensor([1e3, 3e4], dtype=torch.float64)
    return {"W": w, "G": grad, "X": x}


def probe_scores(metric) -> list[torch.Tensor] | None:
    """A metric's scores on every probe, or None where an operator cannot take its argument."""
    try:
        return [metric(**p) for p in probe_tensors()]
    except (RuntimeError, IndexError, ValueError):
        return None


def is_constant(scores: list[torch.Tensor]) -> bool:
    """Constant scores on every probe: the metric cannot rank weights."""
    return all(bool((s == s.flatten()[0]).all()) for s in scores)


def exact_ties(s: torch.Tensor, bits: int = 30, floor_bits: int = 40) -> torch.Tensor:
    """Scores snapped to `bits` bits of mantissa (about 1e-9 relative), after values within
    2^-floor_bits (about 1e-12) of the tensor's largest magnitude are snapped to that grid: values
    equal in exact arithmetic but apart by float rounding (x·y·z against x·(y·z), or W + |W| = 0
    against the 1e-17 that sqrt-then-square leaves) become equal again, so their order is by
    position — as for any formula — and not by rounding noise, which no rewrite can preserve.
    Differences that matter (x/x is 0 where x = 0, not 1) are far larger."""
    s = s.double()
    scale = float(s.abs().max()) if s.numel() else 0.0
    if scale > 0:
        grid = scale * 2.0**-floor_bits
        s = torch.round(s / grid) * grid
    mantissa, exponent = torch.frexp(s)
    return torch.ldexp(torch.round(mantissa * 2.0**bits) / 2.0**bits, exponent)


def ranking(s: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The order of weights per row and over the whole layer (ties by position), up to rounding."""
    snapped = exact_ties(s)
    return torch.sort(snapped, dim=-1, stable=True).indices, torch.sort(snapped.reshape(-1), stable=True).indices


def same_ranking(a: list[torch.Tensor] | None, b: list[torch.Tensor] | None) -> bool:
    """The same order of weights per row and per layer on every probe (identical masks at every
    sparsity and pattern), and values equal up to the operators' protective epsilons."""
    if a is None or b is None or len(a) != len(b):
        return False
    for x, y in zip(a, b):
        if x.shape != y.shape:
            return False
        if not torch.allclose(x, y, rtol=1e-3, atol=1e-6 * (1.0 + float(x.abs().max()))):
            return False
        if any(not torch.equal(p, q) for p, q in zip(ranking(x), ranking(y))):
            return False
    return True
