"""Does a bfloat16 fitness rank metrics like the float32 one? The reference set of results/FITNESS.md
(metrics that prune differently, each with its test perplexity on the full protocol), measured with
the CPU campaign's cheap fitness (perplexity on 4x128 valid tokens, statistics from 16x128 train
tokens) in float32 and in bfloat16 (forward and statistics), and what each costs per candidate.

    python experiments/bf16_study.py                 # ranking, then cost: results/BF16.md
    python experiments/bf16_study.py --phase cost --lock /tmp/cpu.lock   # re-time only, alone on the CPU

Ranking: Spearman between the bf16 and fp32 cheap fitness (target >= 0.98) and between the bf16
cheap fitness and the test protocol (target >= 0.9). Cost: seconds per candidate (prune + measure
+ restore through Evaluator.evaluate), fp32 and bf16 evaluators alternating on the same metrics,
medians, with 2 threads (one evaluator on the machine) and 1 thread (a 1-CPU Ray worker).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from dataclasses import replace
from pathlib import Path

import torch
from scipy import stats as sps

from prunerzero.core.paths import atomic_write_text
from prunerzero.core.tables import markdown_table
from prunerzero.fitness.cache import FitnessCache
from prunerzero.fitness.evaluator import Evaluator
from prunerzero.fitness.speed import exclusive, machine
from prunerzero.evolve.config import load_config
from prunerzero.primitives.metric import Metric

from fitness_study import measure  # a sibling script: the study this one extends

CHEAP = Path(__file__).with_name("smollm2-cpu-cheap.toml")  # the CPU campaign's cheap fitness
DTYPES = {"float32": "auto", "bfloat16": "bfloat16"}  # "auto" is fp32 on CPU: the study's cached values answer


def specs() -> dict:
    base = load_config(CHEAP).eval_spec()
    return {name: replace(base, dtype=dtype) for name, dtype in DTYPES.items()}


def ranking(data: dict, log) -> dict:
    """The cheap fitness of every reference metric in each dtype (through the fitness cache)."""
    metrics = [Metric.from_expression(f, k[:12]) for k, f in data["formulas"].items() if k in data["reference"]]
    cache, out = FitnessCache(), {}
    for dtype, spec in specs().items():
        got = measure(metrics, spec, spec.protocol.eval_windows, cache, log)
        out[dtype] = {k: v[0] for k, v in got.items()}
        log(f"{dtype}: {len(got)} measured")
    return out


def spearman(a: dict, b: dict) -> float:
    keys = [k for k in a if k in b and a[k] == a[k] and b[k] == b[k]]
    return float(sps.spearmanr([a[k] for k in keys], [b[k] for k in keys]).statistic)


def cost(data: dict, n: int, repeats: int, lock: str | None, log) -> dict:
    """Seconds per candidate, fp32 and bf16 evaluators alternating on the same `n` metrics."""
    evaluators = {d: Evaluator(s, needs=frozenset("GX")) for d, s in specs().items()}
    keys = sorted(data["reference"], key=data["reference"].get)[:: max(1, len(data["reference"]) // n)][:n]
    metrics = [Metric.from_expression(data["formulas"][k], k[:12]) for k in keys]
    out = {}
    for threads in (torch.get_num_threads(), 1):
        seconds = {d: [] for d in DTYPES}
        with exclusive(lock, threads):
            torch.set_num_threads(threads)
            load = os.getloadavg()[0]
            for rep in range(repeats + 1):
                for m in metrics:
                    for d, ev in evaluators.items():
                        t0 = time.perf_counter()
                        ev.evaluate(m)
                        if rep:
                            seconds[d].append(time.perf_counter() - t0)
        out[threads] = {"seconds": {d: statistics.median(s) for d, s in seconds.items()},
                        "ratio": statistics.median(a / b for a, b in zip(seconds["float32"], seconds["bfloat16"])),
                        "load_before": load, "load_after": os.getloadavg()[0]}
        log(f"{threads} thread(s): {out[threads]}")
    return out


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--phase", choices=("all", "ranking", "cost"), default="all")
    ap.add_argument("--metrics", type=int, default=8, help="metrics timed in the cost phase")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--lock", default=None, help="a lock file held while timing (fitness.speed.exclusive)")
    ap.add_argument("--study", type=Path, default=Path("results/fitness_study.json"))
    ap.add_argument("--out", type=Path, default=Path("results/BF16.md"))
    args = ap.parse_args(argv)
    log = lambda msg: print(msg, flush=True)  # noqa: E731
    data = json.loads(args.study.read_text())
    doc_path = args.out.with_suffix(".json")
    doc = json.loads(doc_path.read_text()) if doc_path.is_file() else {}
    doc["machine"] = machine()
    doc.setdefault("commands", []).append("python experiments/bf16_study.py " + " ".join(argv or sys.argv[1:]))
    if args.phase in ("all", "ranking"):
        doc["cheap"] = ranking(data, log)
    if args.phase in ("all", "cost"):
        doc["cost"] = cost(data, args.metrics, args.repeats, args.lock, log)
    atomic_write_text(doc_path, json.dumps(doc, indent=1) + "\n")
    atomic_write_text(args.out, render(doc, data))
    print(render(doc, data))


def render(doc: dict, data: dict) -> str:
    ref, cheap = data["reference"], doc.get("cheap", {})
    lines = ["# A bfloat16 fitness on CPU", "", f"Commands: {'; '.join(f'`{c}`' for c in doc['commands'])}  ",
             f"Machine: {doc['machine']}", "",
             f"The {len(ref)} reference metrics of results/FITNESS.md (test perplexity at 50% unstructured on "
             "32x512 test tokens), measured with the CPU campaign's cheap fitness (experiments/smollm2-cpu-cheap.toml: "
             "perplexity on 4x128 valid tokens, statistics from 16x128 train tokens) in each dtype: the forward and "
             "the statistics in that dtype, scores and perplexity accumulated in float32.", ""]
    if cheap:
        fp, bf = cheap["float32"], cheap["bfloat16"]
        checks = [("bf16 cheap vs fp32 cheap", spearman(fp, bf), 0.98), ("bf16 cheap vs test protocol", spearman(bf, ref), 0.9),
                  ("fp32 cheap vs test protocol (for comparison)", spearman(fp, ref), None)]
        lines += markdown_table([{"what": w, "rho": r, "target": t, "met": "" if t is None else "yes" if r >= t else "no"}
                                 for w, r, t in checks],
                                [("ranking", "what", ""), ("Spearman", "rho", ".3f"), ("target", "target", ""),
                                 ("met", "met", "")])
        top_fp, top_bf = sorted(fp, key=fp.get)[:5], sorted(bf, key=bf.get)[:5]
        lines += ["", f"Top 5 of the fp32 cheap fitness kept by bf16: {len(set(top_fp) & set(top_bf))} of 5; "
                  f"largest relative difference bf16 / fp32 - 1 over the set: "
                  f"{max(abs(bf[k] / fp[k] - 1) for k in fp if k in bf):.2%}.", ""]
    if doc.get("cost"):
        lines += markdown_table([{"threads": t, "fp32": c["seconds"]["float32"], "bf16": c["seconds"]["bfloat16"],
                                  "ratio": c["ratio"], "load": f"{c['load_before']:.2f} / {c['load_after']:.2f}"}
                                 for t, c in doc["cost"].items()],
                                [("threads", "threads", ""), ("fp32 s / candidate", "fp32", ".3f"),
                                 ("bf16 s / candidate", "bf16", ".3f"), ("bf16 speed-up", "ratio", ".2f"),
                                 ("load before / after", "load", "")])
        lines += ["", "Seconds: one candidate through Evaluator.evaluate (prune, measure, restore), the two dtypes "
                  "alternating on the same metrics; speed-up: median of per-candidate ratios."]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
