"""The attention mode: q/k masks from a metric, moved by gradient descent to keep each head's
attention probabilities; v/o/MLP by the metric or dense. Modules: mode.py (target, optimiser,
apply), loss.py (one block's attention as the model computes it; the objectives)."""

from __future__ import annotations

from ..recipe import Recipe, weight_sparsity
from .mode import AttentionTarget, apply_attention, check_attention


def measure(report) -> str:
    """Weight sparsity (the budget's unit) and the median attention error the optimiser left."""
    x = report.extra
    error = (f", median attention error {x['attention_error']:.4g} (masks alone {x['attention_error_init']:.4g})"
             if "attention_error" in x and "attention_error_init" in x else "")
    return weight_sparsity(report) + error


RECIPE = Recipe(
    "attention",
    "q/k masks optimised by gradient descent to keep each head's attention probabilities (from a metric's masks); "
    "v/o/MLP by the metric or dense",
    AttentionTarget, apply_attention, check=check_attention,
    options=("sparsity", "group"), sweep="sparsity",
    leaderboard_metrics=("magnitude", "wanda"),
    columns=("attention_error_init", "attention_error", "seconds_per_layer"),
    measure=measure,
)
