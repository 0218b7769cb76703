"""The skip mode (SkipGPT): attention and MLP sublayers skipped per token by trained routers, the
compute really skipped; static removal by ShortGPT influence, removal loss or a metric. Modules:
mode.py (target, static rankings, apply, save / load), skipping.py (routers and the wrapped
sublayers), routers.py (router training, the verified cache), lora.py (the optional LoRA stage)."""

from __future__ import annotations

from ..recipe import Recipe, weight_sparsity
from .mode import MARKER, METHODS, SkipPlan, SkipTarget, apply_skip, check_skip, load_skip, save_skip


def measure(report) -> str:
    """The share of (sublayer, token) pairs skipped — the budget's unit — and of their FLOPs."""
    x = report.extra
    if "skip_ratio" not in x:
        return weight_sparsity(report)
    scope = {"both": "attention and MLP", "mlp": "MLP"}.get(report.target.modules, report.target.modules)
    return (f"skip ratio {x['skip_ratio']:.4f} of {scope} sublayers "
            f"({x.get('flops_skip_ratio', float('nan')):.4f} of their FLOPs; attention "
            f"{x.get('attention_skip_ratio', float('nan')):.3f}, MLP {x.get('mlp_skip_ratio', float('nan')):.3f})")


RECIPE = Recipe(
    "skip",
    "attention and MLP sublayers skipped per token by trained routers, compute really skipped (SkipGPT); "
    "static sublayer removal by ShortGPT influence, removal loss or a metric",
    SkipTarget, apply_skip, methods=METHODS, writes_weights=True,
    check=check_skip, save=save_skip, reshaped=(MARKER, load_skip), default="router",
    options=("ratio",), sweep="ratio", kinds={"skip_plan": SkipPlan}, problems=("metric", "skip_plan"),
    leaderboard_metrics=("router", "shortgpt", "removal", "wanda"),
    columns=("skip_ratio", "flops_skip_ratio", "attention_skip_ratio", "mlp_skip_ratio", "threshold",
             "router_train_seconds"),
    measure=measure,
)
