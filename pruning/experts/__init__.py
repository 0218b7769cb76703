"""The experts mode: routed experts of a Mixture-of-Experts model removed or merged (router rows with
them) and fewer active per token. Modules: mode.py (target, importance, choice, apply, save /
load), signals.py (routing statistics, NAEE, merge targets, the refit), plan.py (ExpertPlan: an EEP
genome as plain data, this mode's candidate kind)."""

from __future__ import annotations

from ..recipe import Recipe
from .mode import MARKER, METHODS, ExpertsTarget, apply_experts, check_experts, load_experts, save_experts
from .plan import ExpertPlan

RECIPE = Recipe(
    "experts",
    "routed experts of a Mixture-of-Experts model removed or merged (router rows with them) and fewer active per "
    "token, by a metric with routing statistics, frequency, REAP, NAEE or an evolved plan (EEP)",
    ExpertsTarget, apply_experts, methods=METHODS, writes_weights=False,
    check=check_experts, save=save_experts, reshaped=(MARKER, load_experts), default="reap",
    leaderboard_metrics=("reap", "frequency", "naee", "wanda"),
    columns=("experts_kept", "active_experts", "merged"),
    kinds={"expert_plan": ExpertPlan},
    problems=("metric", "experts"),
)
