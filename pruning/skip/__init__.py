"""The skip mode (SkipGPT): attention and MLP sublayers skipped per token by trained routers, the
compute really skipped; static removal by ShortGPT influence, removal loss or a metric. Modules:
mode.py (target, static rankings, apply, save / load), skipping.py (routers and the wrapped
sublayers), routers.py (router training, the verified cache), lora.py (the optional LoRA stage)."""

from __future__ import annotations

from ..recipe import Recipe
from .mode import MARKER, METHODS, SkipPlan, SkipTarget, apply_skip, check_skip, load_skip, save_skip

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
)
