"""The skip mode (SkipGPT): attention and MLP sublayers skipped per token by trained routers, with
the compute really skipped (skipping.py), and static baselines at the same module budget.

Candidates:
- method `router`: routers trained on the train split with the base frozen (routers.py; cached, resumable),
  optionally initialised from a static ranking (`router_init`) and followed by LoRA (`lora_steps`);
  the keep threshold is set so the calibration tokens skip exactly `ratio` (`calibrate`);
- method `shortgpt`: the `ratio` of sublayers with the least influence on the residual stream
  (1 − cos of its input and output, ShortGPT's measure per sublayer) removed for every token;
- method `removal`: the sublayers whose removal alone costs the least calibration loss removed;
- any metric: sublayers ranked by the metric's weight scores reduced over each sublayer (`reducer`),
  the lowest removed — so a campaign in this mode evolves the metric that ranks sublayers.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from prunerzero.core.integrity import CorruptCache

from .candidates import Method
from .influence import removal_losses, sublayer_influence
from .lora import apply_deltas
from .reduce import check_reducer, group_scores
from .removal import remove_sublayer
from .routers import RouterError, RouterSet, TrainConfig, default_bias, load_or_train, routed
from .skipping import EXECUTIONS, Router, install, skip_counts
from .target import PruneReport

KINDS = {"both": ("attention", "mlp"), "attention": ("attention",), "mlp": ("mlp",)}
STATIC = ("shortgpt", "removal")
METHODS = {name: Method(name) for name in ("router", *STATIC)}
MARKER = "prunerzero_skip.json"


@dataclass(frozen=True)
class SkipTarget:
    ratio: float = 0.25  # fraction of (sublayer, token) pairs skipped; static methods: of sublayers removed
    modules: str = "both"  # which sublayers may be skipped: both, attention, mlp
    execution: str = "gather"  # gather: skipped tokens are not computed; multiply: computed, then zeroed
    reducer: str = "mean"  # metric weight scores -> sublayer importance (pruning/reduce.py)
    normalize: str = "none"
    router_init: str = "removal"  # a static ranking (shortgpt, removal, a metric) the routers start from, or none
    routers: str = ""  # a directory of routers trained before (routers.safetensors + routers.json)
    calibrate: bool = True  # keep threshold set on calibration tokens so exactly `ratio` is skipped
    steps: int = 300  # router training (routers.TrainConfig)
    batch: int = 4
    seq_len: int = 256
    lr: float = 5e-3
    weight: float = 20.0
    t_start: float = 1.0
    t_end: float = 0.1
    seed: int = 0
    lora_steps: int = 0
    lora_rank: int = 8
    lora_lr: float = 1e-4

    def __post_init__(self) -> None:
        if not (isinstance(self.ratio, (int, float)) and 0.0 <= self.ratio < 1.0):
            raise ValueError(f"skip ratio {self.ratio} must be in [0, 1): the fraction of modules skipped")
        if self.modules not in KINDS:
            raise ValueError(f"unknown modules {self.modules!r}: use one of {', '.join(KINDS)}")
        if self.execution not in EXECUTIONS[:2]:
            raise ValueError(f"unknown execution {self.execution!r}: use gather or multiply")
        if self.steps < 1 or self.batch < 1 or self.seq_len < 2 or self.lora_steps < 0 or self.lora_rank < 1:
            raise ValueError("router training needs steps >= 1, batch >= 1, seq_len >= 2, lora_steps >= 0, lora_rank >= 1")
        if not (self.lr > 0 and self.weight >= 0 and 0 < self.t_end <= self.t_start):
            raise ValueError("router training needs lr > 0, weight >= 0 and 0 < t_end <= t_start")
        check_reducer(self.reducer, self.normalize)

    @property
    def kinds(self) -> tuple[str, ...]:
        return KINDS[self.modules]

    def describe(self) -> str:
        scope = "modules" if self.modules == "both" else f"{self.modules} modules"
        extra = "" if self.execution == "gather" else f", {self.execution}"
        extra += f", LoRA {self.lora_steps} steps" if self.lora_steps else ""
        return f"{self.ratio:g} of {scope} skipped{extra}"

    def train_config(self, init: tuple[float, ...] = ()) -> TrainConfig:
        return TrainConfig(self.ratio, self.kinds, self.steps, self.batch, self.seq_len, self.lr, self.weight,
                           self.t_start, self.t_end, self.seed, init, self.lora_steps, self.lora_rank, self.lora_lr)


# ------------------------------------------------------------------ static rankings
def importance(ctx, candidate, target: SkipTarget) -> np.ndarray:
    """(blocks, 2) importance of each block's attention (0) and MLP (1); higher = keep."""
    if isinstance(candidate, Method) and candidate.name == "shortgpt":
        return sublayer_influence(ctx)
    if isinstance(candidate, Method) and candidate.name == "removal":
        return removal_losses(ctx)
    from .modes import unsupported

    if isinstance(candidate, Method) or not hasattr(candidate, "needs"):
        raise unsupported("skip", candidate)
    groups = ctx.structure.sublayers()
    scores = group_scores(candidate, ctx.stats(candidate.needs), groups, target.reducer, target.normalize)
    out = np.zeros((len(ctx.structure.blocks), 2))
    for g, s in zip(groups, scores.cpu().tolist()):
        out[g.block, g.index] = s
    return out


def static_plan(imp: np.ndarray, target: SkipTarget) -> list[tuple[int, str]]:
    """The `ratio` of in-scope sublayers of least importance, as (block, kind), in block order."""
    names = [(b, kind) for b in range(imp.shape[0]) for j, kind in enumerate(("attention", "mlp"))
             if kind in target.kinds]
    values = np.array([imp[b, 0 if kind == "attention" else 1] for b, kind in names])
    n = int(round(target.ratio * len(names)))
    chosen = np.argsort(values, kind="stable")[:n]
    return sorted(names[i] for i in chosen)


def init_biases(plan: list[tuple[int, str]], subs, ratio: float) -> tuple[float, ...]:
    """Router biases from a static plan: its sublayers start mostly skipped (keep 0.1), the others
    kept so that the mean keep rate is the target's."""
    if not plan:
        return tuple(default_bias(ratio) for _ in subs)
    low = 0.1
    share = len(plan) / len(subs)
    high = min((1 - ratio - share * low) / max(1 - share, 1e-9), 0.999)
    logit = lambda p: math.log(p / (1 - p))  # noqa: E731
    removed = set(plan)
    return tuple(round(logit(low if (s.block, s.kind) in removed else max(high, 0.5)), 6) for s in subs)


# ------------------------------------------------------------------ applying
def model_id(ctx) -> str:
    """What a router set is trained for: the model's class, shape and a digest of its weights."""
    def compute():
        digest = sum(float(u.weight.double().abs().sum()) for u in ctx.units)
        hidden = ctx.model.get_input_embeddings().weight.shape[1]
        return f"{type(ctx.model).__name__}|{hidden}|{len(ctx.structure.blocks)}|{digest:.9e}"
    return ctx.remember("model_id", compute)


def check_skip(ctx, target: SkipTarget) -> None:
    if ctx.structure.is_moe:
        raise ValueError("the skip mode takes dense models; this one has experts (use the experts mode)")
    if not routed(ctx.structure, target.kinds):
        raise ValueError(f"the model has no {target.modules} sublayers to skip")
    if target.routers:
        _given_routers(ctx, target)


def _given_routers(ctx, target: SkipTarget) -> RouterSet:
    try:
        found = RouterSet.load(Path(target.routers))
    except CorruptCache as e:
        raise RouterError(f"target.routers: {target.routers} holds no usable routers ({e})") from None
    found.check_fits(model_id(ctx), ctx.model.get_input_embeddings().weight.shape[1], len(ctx.structure.blocks),
                     f"target.routers {target.routers}")
    want = [(s.block, s.kind) for s in routed(ctx.structure, target.kinds)]
    if found.names != want:
        raise RouterError(f"target.routers: {target.routers} routes {len(found.names)} sublayers, "
                          f"the target's modules={target.modules!r} {len(want)}")
    return found


def apply_skip(ctx, candidate, target: SkipTarget) -> PruneReport:
    t0 = time.perf_counter()
    check_skip(ctx, target)
    report = PruneReport(target, getattr(candidate, "name", "metric"))
    if isinstance(candidate, Method) and candidate.name == "router":
        extra = _apply_routers(ctx, target)
        report.add_plan("routers", (extra["router_key"], round(extra["threshold"], 9), target.execution))
    else:
        plan = static_plan(importance(ctx, candidate, target), target)
        by_name = {(s.block, s.kind): s for b in ctx.structure.blocks for s in b.sublayers}
        for key in plan:
            remove_sublayer(ctx.edits, by_name[key])
        n = len(routed(ctx.structure, target.kinds))
        extra = {"skip_ratio": len(plan) / n, "attention_skip_ratio": _share(plan, "attention", ctx),
                 "mlp_skip_ratio": _share(plan, "mlp", ctx), "removed": [list(k) for k in plan]}
        report.add_plan("static", plan)
    report.extra.update(extra)
    report.seconds = time.perf_counter() - t0
    ctx.log(f"skip: {report.method} skips {extra['skip_ratio']:.3f} of {target.modules} modules "
            f"(attention {extra['attention_skip_ratio']:.3f}, MLP {extra['mlp_skip_ratio']:.3f})")
    return report


def _share(plan, kind: str, ctx) -> float:
    return sum(k == kind for _, k in plan) / len(ctx.structure.blocks)


def _apply_routers(ctx, target: SkipTarget) -> dict:
    subs = routed(ctx.structure, target.kinds)
    if target.routers:
        routers = _given_routers(ctx, target)
    else:
        init = ()
        if target.router_init != "none":
            from .modes import get_mode

            start = get_mode("skip").candidate(target.router_init)
            init = init_biases(static_plan(importance(ctx, start, target), target), subs, target.ratio)
        cfg = target.train_config(init)
        routers = ctx.remember(("routers", cfg), lambda: load_or_train(ctx, cfg, model_id(ctx), ctx.log))
    if routers.lora:
        apply_deltas(ctx.edits, ctx.units, routers.lora)
    attentions = {a.block: a for a in ctx.structure.attentions}
    wrapped = [install(ctx.edits, s, r.to(ctx.device), target.execution, 0.0, attentions.get(s.block))
               for s, r in zip(subs, routers.routers)]
    threshold = calibrate_threshold(ctx, wrapped, target.ratio) if target.calibrate else 0.0
    counts = skip_counts(ctx.model, reset=True)
    return {**counts, "threshold": threshold, "router_key": routers.meta.get("sha256", ""),
            "routers_dir": str(routers.path or ""),
            "router_train_seconds": routers.meta.get("train_seconds", 0.0), "routed": [list(n) for n in routers.names]}


@torch.no_grad()
def calibrate_threshold(ctx, wrapped, ratio: float, windows: int = 4, tokens: int = 256, rounds: int = 3) -> float:
    """One keep threshold on the router logits for all sublayers, set so that `ratio` of the
    (sublayer, token) pairs of calibration tokens are skipped. Downstream logits depend on
    upstream decisions, so it is refit a few times (a fixed point); the counts then hold the
    calibration skip rate reached."""
    ids = ctx.calibration[:windows, :tokens].to(ctx.device)
    threshold = 0.0
    for _ in range(rounds):
        for w in wrapped:
            w.threshold, w.state.collect, w.state.logits = threshold, True, []
        skip_counts(ctx.model, reset=True)
        ctx.model(ids, use_cache=False, logits_to_keep=1)
        logits = torch.cat([t for w in wrapped for t in w.state.logits])
        threshold = float(torch.quantile(logits.double(), ratio)) if ratio > 0 else float(logits.min()) - 1.0
    for w in wrapped:
        w.threshold, w.state.collect, w.state.logits = threshold, False, []
    skip_counts(ctx.model, reset=True)
    ctx.model(ids, use_cache=False, logits_to_keep=1)
    return threshold


# ------------------------------------------------------------------ saving and loading
def save_skip(ctx, report: PruneReport, out) -> None:
    """The base weights (with any LoRA merged), the routers inside the wrapped model and the plan;
    every prunerzero command loads the directory and runs it skipping."""
    from safetensors.torch import save_model

    from prunerzero.core.paths import atomic_write_text

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    ctx.model.config.save_pretrained(out)
    save_model(ctx.model, str(out / "model.safetensors"))
    x = report.extra
    plan = {"removed": x.get("removed", []), "routed": x.get("routed", []), "threshold": x.get("threshold", 0.0),
            "execution": report.target.execution, "model_id": model_id(ctx) if x.get("routed") else ""}
    atomic_write_text(out / MARKER, json.dumps({"format": 1, "plan": plan, "budget": report.target.describe()}))


def load_skip(path, dtype: torch.dtype):
    """A model saved by the skip mode: dense shapes from its config, the plan applied (routers
    with placeholder weights, removed sublayers), then every tensor loaded strictly."""
    from safetensors.torch import load_model
    from transformers import AutoConfig, AutoModelForCausalLM

    from prunerzero.models.adapter import ModelAdapter

    from .interventions import Edits

    path = Path(path)
    try:
        plan = json.loads((path / MARKER).read_text())["plan"]
        removed, routed_names = [tuple(k) for k in plan["removed"]], [tuple(k) for k in plan["routed"]]
    except (ValueError, KeyError, TypeError) as e:
        raise ValueError(f"{path / MARKER} is damaged ({e}): not a plan the skip mode wrote") from None
    model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(path), dtype=dtype)
    structure = ModelAdapter(model).structure
    by_name = {(s.block, s.kind): s for b in structure.blocks for s in b.sublayers}
    attentions = {a.block: a for a in structure.attentions}
    edits, hidden = Edits(), model.get_input_embeddings().weight.shape[1]
    for b, kind in routed_names:
        install(edits, by_name[(b, kind)], Router(hidden), plan["execution"], plan["threshold"], attentions.get(b))
    for key in removed:
        remove_sublayer(edits, by_name[key])
    load_model(model, str(path / "model.safetensors"), strict=True)
    return model
