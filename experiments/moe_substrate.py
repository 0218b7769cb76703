"""The derived MoE substrate (models/moefy.py, models/moe_fit.py): recipe variants against the dense
model — test perplexity at top-1, top-2, top-4 on the same tokens, and the derivation time —
→ results/MOE.md.

Every variant shares the neuron split (the clustering is the same in every recipe here): it is
computed once and its time added to each variant's fit time.

    python experiments/moe_substrate.py                       # every variant
    python experiments/moe_substrate.py --variants v1,v2      # some
    python experiments/moe_substrate.py --render-only         # the report from the JSON
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from dataclasses import replace
from pathlib import Path

import torch

from prunerzero.fitness.perplexity import perplexity
from prunerzero.fitness.speed import machine
from prunerzero.models.corpora import bos_token, load_tokenized
from prunerzero.models.loading import load_model
from prunerzero.models.moefy import Recipe, moefy

TOP_KS = (1, 2, 4)
V2 = Recipe(version=2)
# name → (recipe, what it is); "v1" is the recipe shipped before version 2 (teacher-forced routers)
VARIANTS = {
    "v1": (Recipe(version=1), "v1: routers fitted per layer on the dense model's hidden states (teacher-forced)"),
    "seq-router": (replace(V2, refit_ridge=-1), "routers fitted sequentially on the MoE's own hidden states"),
    "seq-refit": (V2, "sequential routers + least-squares refit of the down projections (version 2)"),
    "seq-refit-r1e-2": (replace(V2, refit_ridge=1e-2), "as seq-refit, ridge 1e-2"),
    "seq-refit-r1e-4": (replace(V2, refit_ridge=1e-4), "as seq-refit, ridge 1e-4"),
    "seq-refit-2rounds": (replace(V2, rounds=2), "as seq-refit, then router refined for the refitted experts, refit again"),
    "seq-refit-stream": (replace(V2, target="stream"), "as seq-refit, the target the dense model's residual stream after "
                         "the layer (the MLP also corrects the drift before it)"),
    "seq-refit-64w": (replace(V2, fit_windows=64), "as seq-refit, the sequential fit on 64 windows (16,384 tokens)"),
}


def set_top_k(moe, k: int) -> None:
    for layer in moe.model.layers:
        layer.mlp.gate.top_k = k


def measure(moe, windows: torch.Tensor) -> dict:
    out = {}
    for k in TOP_KS:
        set_top_k(moe, k)
        out[f"top{k}"] = round(perplexity(moe, windows).perplexity, 2)
    set_top_k(moe, 2)
    return out


def run_variant(name: str, dense, tokens, windows, test, splits, split_s: float) -> dict:
    recipe, what = VARIANTS[name]
    fit = None if recipe.fit_windows == recipe.calib_windows or recipe.version == 1 else \
        tokens.calibration(recipe.fit_windows, recipe.seq_len, recipe.seed)
    t0 = time.perf_counter()
    moe, _, errors = moefy(dense, windows, recipe, fit_windows=fit, splits=splits)
    seconds = time.perf_counter() - t0 + split_s
    return {"variant": name, "what": what, "recipe": recipe.describe(), "derive_s": round(seconds, 1),
            "mlp_error": round(sum(errors) / len(errors), 4), "load": round(os.getloadavg()[0], 2),
            **measure(moe.eval(), test)}


def render(doc: dict) -> str:
    dense = doc["dense"]
    lines = ["# The derived MoE substrate", "",
             "smollm2-135m-moe is derived from smollm2-135m (models/moefy.py, models/moe_fit.py): each MLP's "
             "512 most active neurons a shared expert, the other 1024 in 8 routed experts of 128 (co-activation "
             "clusters), written as a Qwen2-MoE. Version 1 fitted each layer's router on the dense model's "
             "hidden states (teacher-forced); version 2 fits layer by layer on the MoE's own hidden states — "
             "the router, then the down projections (shared and routed) by ridge least squares given the "
             "routing, toward the dense MLP's output on the same input.", "",
             f"Protocol: austen, seq_len {doc['seq_len']}, clustering on {doc['calib_windows']} train windows, "
             f"test perplexity on {doc['eval_windows']} test windows (the same tokens for every row). "
             f"Machine: {doc['machine']}; load average at start {doc['load_at_start']:.2f} (2 cores shared with "
             "other jobs: times are upper bounds). Derivation seconds: clustering (once, "
             f"{doc['split_s']:.1f}s) + fit; loading the dense model not counted.", "",
             f"Command: `{doc['command']}`", "",
             f"Dense smollm2-135m: **{dense:.2f}**. Target: top-2 within 1.5x dense (<= {1.5 * dense:.2f}).", "",
             "| variant | top-1 | top-2 | top-2 / dense | top-4 | mean rel. MLP error (calib) | derive s | what |",
             "|---|---|---|---|---|---|---|---|"]
    for r in doc["rows"]:
        lines.append(f"| {r['variant']} | {r['top1']:.2f} | {r['top2']:.2f} | {r['top2'] / dense:.2f}x | "
                     f"{r['top4']:.2f} | {r['mlp_error']:.3f} | {r['derive_s']:.0f} | {r['what']} |")
    return "\n".join(lines + [""] + doc.get("notes", [])) + "\n"


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--variants", default=",".join(VARIANTS))
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--eval-windows", type=int, default=32)
    ap.add_argument("--json", default="results/moe_substrate.json")
    ap.add_argument("--report", default="results/MOE.md")
    ap.add_argument("--render-only", action="store_true")
    args = ap.parse_args(argv)
    out = Path(args.json)
    doc = json.loads(out.read_text()) if out.is_file() else {}
    if args.render_only:
        Path(args.report).write_text(render(doc))
        return
    torch.set_grad_enabled(False)
    lm = load_model("smollm2-135m", device="cpu", dtype="float32")
    tokens = load_tokenized("austen", lm.tokenizer)
    test = tokens.evaluation("test", args.seq_len, args.eval_windows, bos=bos_token(lm.tokenizer))
    base = Recipe()
    windows = tokens.calibration(base.calib_windows, base.seq_len, base.seed)
    doc.update({"machine": machine(), "load_at_start": os.getloadavg()[0], "seq_len": args.seq_len,
                "calib_windows": base.calib_windows, "eval_windows": args.eval_windows,
                "command": "python experiments/moe_substrate.py " + " ".join(argv or sys.argv[1:])})
    doc["dense"] = round(perplexity(lm.model, test).perplexity, 2)
    print(f"dense {doc['dense']}", flush=True)
    t0 = time.perf_counter()
    _, splits, _ = moefy(lm.model, windows, Recipe(top_k=base.experts))  # the split alone: no fit at top-k = E
    doc["split_s"] = round(time.perf_counter() - t0, 1)
    rows = {r["variant"]: r for r in doc.get("rows", [])}
    for name in args.variants.split(","):
        rows[name] = run_variant(name, lm.model, tokens, windows, test, splits, doc["split_s"])
        print(json.dumps(rows[name]), flush=True)
        doc["rows"] = [rows[n] for n in VARIANTS if n in rows]
        out.write_text(json.dumps(doc, indent=1))
    Path(args.report).write_text(render(doc))


if __name__ == "__main__":
    main()
