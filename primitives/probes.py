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

Exact arithmetic is not what the pipeline prunes with: it computes scores at float32
(`pruning/unstructured/mode.py`) on statistics that span many decades (G down to 1e-9, X up to 6e4), where
`exp` saturates (`exp(W/G)` is clamped wherever G ≈ 1e-6), `exp(-X)` underflows to 0 and
`1 + G` rounds to 1 — so `exp(a)·exp(b)` and `exp(a + b)`, or `G·X + X` and `X·(1 + G)`, cut
different weights though they are equal on the reals (and `exact_ties`, which calls a value
within 2^-40 of the largest rounding noise, cannot see it). `ranks_alike` therefore also
compares the masks the pipeline itself would cut: the torch forms at float32, raw, on
`float32_probe_tensors` — statistics drawn over the ranges smollm2-135m's real statistics take
(`REAL_RANGES`), with its Q4_1 weights' ties.
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


# log10 of |W|, G and X of smollm2-135m's real statistics: every prunable unit (210, 106M weights),
# austen, calibration 8 windows x 128 tokens (the campaigns' protocol), the zoo model's Q4_1
# weights dequantised to float32; nonzero values, quantiles of a 2M sample, min and max over all.
# Measured with Evaluator(EvalSpec("smollm2-135m", split="valid", protocol=Protocol(seq_len=128,
# calib_windows=8, eval_windows=4))).stats({"W", "G", "X"}) (experiments/oos_fuzz.py --real-trees loads
# the same statistics). 0.03% of W is exactly 0; G and X have no zeros there.
#              min     q 1%   median  q 99.99%  max
REAL_RANGES = {"W": (-5.12, -2.65, -0.92, 0.10, 0.97),
               "G": (-9.09, -4.15, -3.32, -1.32, -0.03),
               "X": (-7.78, -3.41, -1.68, 2.64, 4.80)}
F32_ROWS, F32_COLS = 16, 64  # 64 columns: two Q4_1 blocks per row, N:M groups of 2-16 fit


def _log_uniform(g: torch.Generator, shape, lo: float, hi: float) -> torch.Tensor:
    return 10.0 ** (lo + (hi - lo) * torch.rand(shape, generator=g, dtype=torch.float64))


def _q4_1(w: torch.Tensor) -> torch.Tensor:
    """Weights as the zoo model stores them (Q4_1): each block of 32 inputs holds 16 levels
    between its min and max, so a row repeats values."""
    blocks = w.reshape(w.shape[0], -1, 32)
    lo, hi = blocks.amin(-1, keepdim=True), blocks.amax(-1, keepdim=True)
    step = (hi - lo) / 15
    return (lo + torch.round((blocks - lo) / step) * step).reshape(w.shape)


def realistic_statistics(seed: int, rows: int = F32_ROWS, cols: int = F32_COLS) -> tuple[dict[str, torch.Tensor], ...]:
    """(W, G, X) in float32 over REAL_RANGES, in six regimes of rows x cols weights each: the bulk
    (1% to 99.99% of every statistic, Q4_1 weights with their ties); the small tail (G from 1e-9
    to 1e-4 — exp(W/G) saturates — with small X and W); the loud tail (X up to 6e4 — exp(X)
    saturates, exp(-X) underflows — with large G and W); every statistic log-uniform over its
    whole range, independently, with weights exactly 0; the whole ranges again in a tall shape
    (8x the rows) and the bulk in a wide one (8x the columns, Q4_1) — real units have hundreds of
    rows and columns, so colnorm and rownorm give values near 1e-3 (and exp of them lies within
    1e-3 of 1, where float32 keeps few bits). Signs of W at random. `seed` fixes them all."""
    g = torch.Generator().manual_seed(seed)
    W_, G_, X_ = (REAL_RANGES[t] for t in "WGX")
    whole = ((W_[0], W_[4]), (G_[0], G_[4]), (X_[0], X_[4]))
    regimes = [("bulk", (rows, cols), ((W_[1], W_[3]), (G_[1], G_[3]), (X_[1], X_[3]))),
               ("small", (rows, cols), ((W_[0], W_[1]), (G_[0], -4.0), (X_[0], X_[1]))),
               ("loud", (rows, cols), ((-0.3, W_[4]), (-2.5, G_[4]), (0.14, X_[4]))),
               ("full", (rows, cols), whole),
               ("tall", (rows * 8, max(cols // 8, 1)), whole),
               ("wide", (max(rows // 4, 1), cols * 8), ((W_[1], W_[3]), (G_[1], G_[3]), (X_[1], X_[3])))]
    out = []
    for name, (r, c), (w, gr, x) in regimes:
        sign = torch.where(torch.rand(r, c, generator=g) < 0.5, -1.0, 1.0).double()
        W = sign * _log_uniform(g, (r, c), *w)
        if name in ("bulk", "wide") and c % 32 == 0:
            W = _q4_1(W)
        if name == "bulk":  # the layer's lowest weight repeated (so in 4 of 210 real units): mms(W) is 0 twice
            W[[0, r // 2, r - 1], [c - 1, 0, c // 2]] = float(W.min())
        if name == "full":  # weights exactly 0, repeated (a few hundred per real unit)
            W[[r // 2, r // 4, r - 1], [c // 3, c // 2, 1]] = 0.0
        out.append({"W": W.float(), "G": _log_uniform(g, (r, c), *gr).float(),
                    "X": _log_uniform(g, (c,), *x).float()})
    return tuple(out)


@lru_cache(maxsize=1)
def float32_probe_tensors() -> tuple[dict[str, torch.Tensor], ...]:
    """The probes at the pipeline's precision, over the ranges of real statistics (fixed seed)."""
    return realistic_statistics(4321)


def float32_scores(metric) -> list[torch.Tensor] | None:
    """A metric's float32 scores on the float32 probes, as the pipeline computes them."""
    try:
        return [metric(**p) for p in float32_probe_tensors()]
    except (RuntimeError, IndexError, ValueError):
        return None


def same_float32_masks(a: list[torch.Tensor] | None, b: list[torch.Tensor] | None) -> bool:
    """The same raw order of every weight per row and per layer — ties by position, as
    `pruning.masks` breaks them — on every float32 probe: the masks the pipeline cuts, at every
    sparsity, per row, per layer and N:M. No rounding is forgiven: where two spellings round
    differently enough to reorder weights, they prune differently."""
    if a is None or b is None or len(a) != len(b):
        return False
    for x, y in zip(a, b):
        if x.shape != y.shape:
            return False
        if torch.equal(x, y):
            continue
        for dim_x, dim_y in ((x, y), (x.reshape(-1), y.reshape(-1))):
            if not torch.equal(torch.sort(dim_x, dim=-1, stable=True).indices,
                               torch.sort(dim_y, dim=-1, stable=True).indices):
                return False
    return True


def orders_agree_up_to_rounding(a: torch.Tensor, b: torch.Tensor, rel: float = 2.0**-16) -> bool:
    """Per row and per layer, no two weights in opposite orders under `a` and `b` unless their
    scores lie within `rel` (about 128 float32 ulps) of each other: mask changes that float32
    rounding alone can make — they differ between spellings, CPUs and GPUs alike — are forgiven,
    anything larger (saturation, underflow, a protective epsilon, cancellation) is not. Not what
    OOS decides with (it refuses any change on its probes, `same_float32_masks`); what a check on
    statistics it never saw can demand of a float32 rewrite."""
    for x, y in ((a, b), (b, a)):
        for xs, ys in ((x, y), (x.reshape(1, -1), y.reshape(1, -1))):
            order = torch.sort(xs.double(), dim=-1, stable=True).indices
            seq = torch.gather(ys.double(), -1, order)
            peak = torch.cummax(seq, dim=-1).values
            if bool(((peak - seq) > rel * peak.abs()).any()):
                return False
    return True


def ranks_alike(a, b) -> bool:
    """Two metrics prune alike: the same orders on the exact probes (`same_ranking`, float64,
    rounding forgiven, values close) and the same float32 masks on the probes over real ranges
    (`same_float32_masks`). What decides whether one formula may stand in for another."""
    return same_ranking(probe_scores(a), probe_scores(b)) and same_float32_masks(float32_scores(a), float32_scores(b))


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
