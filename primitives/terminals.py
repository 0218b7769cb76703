"""The terminals a metric is written over.

- ``W``: the weight matrix of one prunable unit, shape (out, in).
- ``G``: the per-weight gradient magnitude over the calibration samples, √Σₛ gₛ², shape (out, in).
- ``X``: the per-input-channel activation statistic, the mean over calibration tokens of x_j²,
  shape (in,), broadcast along W's rows (a view: no copy).

The SymPy symbols carry what is known of each: W is real, G and X are non-negative — which
lets Opposing Operation Simplification drop ``abs(G)`` or cancel ``sqr(sqrt(X))``.
"""

from __future__ import annotations

import sympy
import torch

TERMINALS = ("W", "G", "X")

SYMBOLS = {
    "W": sympy.Symbol("W", real=True),
    "G": sympy.Symbol("G", nonnegative=True),
    "X": sympy.Symbol("X", nonnegative=True),
}


def terminal_env(W: torch.Tensor, G: torch.Tensor | None = None, X: torch.Tensor | None = None) -> dict:
    """The mapping a compiled tree reads: X broadcast to W's shape, G checked against it.
    A statistic a metric does not need may be None."""
    env = {"W": W}
    if G is not None:
        if G.shape != W.shape:
            raise ValueError(f"G has shape {tuple(G.shape)}, W has {tuple(W.shape)}: they must match")
        env["G"] = G
    if X is not None:
        if X.shape[-1] != W.shape[-1] or X.numel() != W.shape[-1]:
            raise ValueError(f"X has shape {tuple(X.shape)}; W has {W.shape[-1]} input channels")
        env["X"] = X.reshape(1, -1).expand_as(W)
    return env
