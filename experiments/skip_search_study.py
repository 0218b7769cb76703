"""Which cheap fitness ranks the skip mode's static removal sets like the full protocol? A reference
set of diverse removal sets measured once on the full test protocol, and each cheap fitness's rank
correlation with it and its cost (issue 26, item 1, for static skipping at one ratio).

    python experiments/skip_search_study.py        # writes results/SKIP-SEARCH-study.json (~20 min on 2 quiet cores)
    python experiments/skip_search_study.py --ref-windows 16     # half the reference's test tokens

Reference: test perplexity with the set removed for every token (skip_bench's protocol: calibration
8x512 train tokens for the hand-made rankings, <= 32x512 test tokens). The set, as explicit
`SkipPlan`s: the hand-made rankings' plans (ShortGPT, removal loss, Wanda, magnitude, the
discovered unstructured metric reduced by mean), their perturbations (1 to 3 swaps of a removed
sublayer for one of the 30 least important kept under removal loss), random sets among those 30,
a random set among all sublayers, and the attention-only / MLP-heavy extremes. Cheap fitnesses, on
the valid split as a search sees it: perplexity and KL to the dense model on fewer and shorter
windows. An explicit plan needs no calibration, so a cheap setting's cost is its forward alone.
Every measurement goes through the shared fitness cache: a re-run measures only what is missing.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import time
from pathlib import Path

from scipy import stats as sps

from prunerzero.core.paths import atomic_write_text
from prunerzero.core.protocol import Protocol
from prunerzero.evolve.evaluation import FitnessMap
from prunerzero.fitness.cache import FitnessCache
from prunerzero.fitness.evaluator import Evaluator
from prunerzero.fitness.pool import SerialBackend
from prunerzero.fitness.spec import EvalSpec
from prunerzero.pruning.candidates import Method
from prunerzero.pruning.skip.mode import ranked
from prunerzero.pruning.skip.plan import SkipPlan

REFERENCE = Protocol(seq_len=512, calib_windows=8, eval_windows=32)  # skip_bench's protocol
DISCOVERED = "results/metrics/smollm2-cpu-unstructured50-20261122-131852-1.py:metric"
HANDMADE = [("ShortGPT", "shortgpt"), ("removal loss", "removal"), ("wanda (mean)", "wanda"),
            ("magnitude (mean)", "magnitude"), ("discovered metric (mean)", DISCOVERED)]
# (name, fitness, windows, seq_len); calibration is irrelevant to an explicit plan (1 window)
SETTINGS = [("ppl 4x256", "perplexity", 4, 256),
            ("ppl 2x256", "perplexity", 2, 256), ("ppl 4x128", "perplexity", 4, 128),
            ("ppl 2x128", "perplexity", 2, 128), ("kl 2x128", "kl", 2, 128), ("kl 1x128", "kl", 1, 128)]
# the order settings are measured in: the one the campaign runs with first (the study and the campaign
# shared 2 busy cores), then the others
SETTINGS.sort(key=lambda s: s[0] != "ppl 4x128")


def hand_made(ev: Evaluator, methods=HANDMADE) -> tuple[dict[str, SkipPlan], list]:
    """name -> the plan each hand-made ranking removes at the evaluator's target; removal loss's order."""
    plans, order = {}, None
    for name, method in methods:
        candidate = Method(method) if method in ("shortgpt", "removal") else ev.candidate(method)
        got, plan = ranked(ev.ctx, candidate, ev.target)
        order = got if method == "removal" else order
        plans[name] = SkipPlan(tuple(plan))
    return plans, order


def swapped(plan: SkipPlan, pool: list, swaps: int, rnd: random.Random) -> SkipPlan:
    removed = list(plan.removed)
    for _ in range(swaps):
        kept = [k for k in pool if k not in removed]
        removed[rnd.randrange(len(removed))] = rnd.choice(kept)
    return SkipPlan(tuple(removed))


def reference_plans(ev: Evaluator, seed: int) -> dict[str, SkipPlan]:
    """Hand-made plans, perturbations, random sets near and far, extremes: distinct by key."""
    plans, order = hand_made(ev)
    n, rnd = len(plans["removal loss"].removed), random.Random(seed)
    pool = order[:30]
    out = dict(plans)
    for base in ("removal loss", "ShortGPT"):
        for swaps in (1, 2, 2, 3):
            out[f"{base} {swaps}-swap #{len(out)}"] = swapped(plans[base], pool, swaps, rnd)
    for i in range(5):
        out[f"random among 30 least important #{i}"] = SkipPlan(tuple(rnd.sample(pool, n)))
    for i in range(1):
        out[f"random among all #{i}"] = SkipPlan(tuple(rnd.sample(order, n)))
    out["least-removal-loss attention only"] = SkipPlan(tuple([k for k in order if k[1] == "attention"][:n]))
    out["least-removal-loss MLP only"] = SkipPlan(tuple([k for k in order if k[1] == "mlp"][:n]))
    unique: dict[str, tuple[str, SkipPlan]] = {}
    for name, plan in out.items():
        unique.setdefault(plan.key, (name, plan))
    return {name: plan for name, plan in unique.values()}


def measure(plans: dict[str, SkipPlan], spec: EvalSpec, windows: int, cache: FitnessCache, log) -> dict:
    """name -> (value, seconds) for every plan under `spec` on `windows` windows."""
    backend = SerialBackend(lambda: Evaluator(spec, log=log))
    fmap = FitnessMap(backend, cache, spec.cache_key(), windows)
    got = fmap([(p.key, p.to_data()) for p in plans.values()])
    backend.close()
    return {name: (m.result.value if m.result.status == "ok" else float("nan"), m.result.seconds)
            for name, m in zip(plans, got)}


def spearman(reference: dict, cheap: dict, names) -> float:
    return float(sps.spearmanr([reference[n][0] for n in names], [cheap[n][0] for n in names]).statistic)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--ratio", type=float, default=0.25)
    ap.add_argument("--seed", type=int, default=3)
    ap.add_argument("--ref-windows", type=int, default=32, help="test windows of 512 tokens for the reference")
    ap.add_argument("--out", type=Path, default=Path("results/SKIP-SEARCH-study.json"))
    args = ap.parse_args(argv)
    log = lambda msg: print(msg, flush=True)  # noqa: E731
    cache, target = FitnessCache(), {"ratio": args.ratio}
    load = [os.getloadavg()[0]]
    ref_protocol = REFERENCE.with_(eval_windows=args.ref_windows)
    ref_spec = EvalSpec(split="test", protocol=ref_protocol, mode="skip", target=target)
    plans = reference_plans(Evaluator(ref_spec, log=log), args.seed)
    log(f"reference: {len(plans)} plans")
    t0 = time.time()
    reference = measure(plans, ref_spec, args.ref_windows, cache, log)
    log(f"reference measured in {time.time() - t0:.0f}s")
    names = [n for n in plans if reference[n][0] == reference[n][0]]
    best_half = sorted(names, key=lambda n: reference[n][0])[: len(names) // 2]
    rows, cheap_all = [], {}
    for name, fitness, windows, seq_len in SETTINGS:
        protocol = REFERENCE.with_(seq_len=seq_len, calib_windows=1, eval_windows=windows)
        spec = EvalSpec(split="valid", protocol=protocol, mode="skip", target=target, fitness=fitness)
        cheap = cheap_all[name] = measure(plans, spec, windows, cache, log)
        secs = statistics.median(cheap[n][1] for n in names)
        rows.append({"setting": name, "spearman": spearman(reference, cheap, names),
                     "spearman_best_half": spearman(reference, cheap, best_half), "seconds": secs})
        log(f"{name}: spearman {rows[-1]['spearman']:.3f} (best half {rows[-1]['spearman_best_half']:.3f}), {secs:.2f}s")
    load.append(os.getloadavg()[0])
    data = {"command": "python experiments/skip_search_study.py" + (f" --ratio {args.ratio:g}" if args.ratio != 0.25 else "")
            + (f" --ref-windows {args.ref_windows}" if args.ref_windows != 32 else ""),
            "protocol": ref_protocol.describe(), "ratio": args.ratio, "load_1min": load,
            "plans": {n: p.key for n, p in plans.items()},
            "reference": {n: reference[n] for n in names}, "cheap": cheap_all, "rows": rows}
    atomic_write_text(args.out, json.dumps(data, indent=1) + "\n")


if __name__ == "__main__":
    main()
