"""The unstructured mode: weights zeroed by a metric per output row or layer, or N:M (the Pruner-Zero
setting); SparseGPT its method; per-block allocations (OWL, or evolved) and given masks its other
candidates. Modules: mode.py (apply), target.py, allocation.py (OWL), sparsegpt.py (SparseGPT, and
the OBS / LSQ refit under a metric's masks)."""

from __future__ import annotations

from ..candidates import Allocation
from ..recipe import Recipe, weight_sparsity
from .mode import METHODS, METHOD_STATS, apply_unstructured, check_unstructured, leaderboard_targets
from .target import PruneTarget

RECIPE = Recipe(
    "unstructured",
    "weights zeroed by a metric, per output row or layer, or N:M (the Pruner-Zero setting)",
    PruneTarget, apply_unstructured,
    methods=METHODS, method_stats=METHOD_STATS,
    check=check_unstructured,
    options=("sparsity", "pattern", "group"), sweep="sparsity", targets=leaderboard_targets,
    leaderboard_metrics=("magnitude", "wanda", "ria", "pruner-zero", "sparsegpt"),
    kinds={"allocation": Allocation},
    problems=("metric", "allocation", "joint"),
    measure=weight_sparsity,
)
