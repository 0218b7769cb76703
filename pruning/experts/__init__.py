"""The experts mode: routed experts of a Mixture-of-Experts model removed or merged (router rows with
them) and fewer active per token. Modules: mode.py (target, importance, choice, apply, save /
load), signals.py (routing statistics, NAEE, merge targets, the refit), plan.py (ExpertPlan: an EEP
genome as plain data, this mode's candidate kind)."""

from __future__ import annotations

from ..recipe import Recipe, weight_sparsity
from .mode import MARKER, METHODS, ExpertsTarget, apply_experts, check_experts, load_experts, save_experts
from .plan import ExpertPlan


def measure(report) -> str:
    """Experts kept per MoE layer (the budget's unit) and active per token, merges counted."""
    x = report.extra
    if "experts_kept" not in x:
        return weight_sparsity(report)
    merged = f", {x['merged']} merged into kept ones" if x.get("merged") else ""
    return f"{x['experts_kept']:g} experts kept per MoE layer, {x.get('active_experts', 0):g} active per token{merged}"


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
    measure=measure,
)
