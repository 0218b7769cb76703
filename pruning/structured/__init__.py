"""The structured mode (MDP): heads, MLP channel groups, sublayers and blocks sliced out under a
latency budget measured on this machine, chosen by a MILP. Modules: mode.py (target, importance,
options, plan, apply, save / load), latency.py (the latency table), selection.py (MILP, greedy,
uniform), recovery.py (least-squares refit), shortgpt.py (the block-influence baseline)."""

from __future__ import annotations

from ..recipe import Recipe, weight_sparsity
from .mode import (MARKER, METHODS, StructuredTarget, apply_structured, check_structured, load_structured,
                   save_structured)


def measure(report) -> str:
    """The latency the plan is predicted to take (the budget's unit), and the prunable weights left."""
    if "predicted_ratio" not in report.extra:
        return weight_sparsity(report)
    total = sum(r["numel"] for r in report.rows)
    kept = total - sum(r["zeros"] for r in report.rows)
    return (f"predicted {report.target.phase} latency {report.extra['predicted_ratio']:.3f}x dense, "
            f"{kept / 1e6:.1f}M of {total / 1e6:.1f}M prunable weights kept")


RECIPE = Recipe(
    "structured",
    "heads, MLP channel groups, sublayers and blocks sliced out under a measured latency budget, chosen by a MILP (MDP)",
    StructuredTarget, apply_structured,
    methods=METHODS, writes_weights=False,
    check=check_structured,
    save=save_structured, reshaped=(MARKER, load_structured),
    options=("latency",), sweep="latency",
    leaderboard_metrics=("wanda", "taylor", "shortgpt"),
    columns=("predicted_ratio", "predicted_ms", "predicted_dense_ms", "solver", "solver_gap", "solver_seconds",
             "importance", "blocks_removed", "attention_removed", "mlp_removed", "heads_kept", "channels_kept"),
    measure=measure,
)
