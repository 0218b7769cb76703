"""Which cheap fitness ranks metrics like the real one? A reference set of diverse metrics measured
once on the full test protocol, and each cheap fitness's rank correlation with it and its cost.

    python experiments/fitness_study.py --reference 54       # writes results/FITNESS.md (~1.5 h on 2 cores)

Reference: test perplexity at 50% unstructured (per row) under the committed leaderboard protocol
(calibration 32x512 train tokens, 32x512 test tokens). The set: the built-in metrics, the hall
of fame of every committed campaign, random trees (OOS-simplified, non-constant), then metrics the
committed campaigns evaluated, with at most one metric per pruned model (identical masks give
identical numbers: they would only add ties) and none whose test perplexity passes 1e6.
Cheap fitnesses, on the valid split as a search sees it: perplexity and KL divergence to the dense
model at several token budgets (statistics from 16 train windows of the same length: 16x256
tokens as the CPU campaign, 16x128 for the 128-token budgets), and successive halving (a low
budget for all, today's full one for the best third). Every measurement
goes through the shared fitness cache, so a re-run measures only what is missing.
"""

from __future__ import annotations

import argparse
import csv
import json
import platform
import random
import statistics
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from deap import gp
from scipy import stats as sps

from prunerzero.core.paths import atomic_write_text
from prunerzero.core.protocol import Protocol
from prunerzero.evolve.evaluation import FitnessMap
from prunerzero.evolve.problem import primitive_set, to_node
from prunerzero.evolve.simplify import simplify
from prunerzero.fitness.cache import FitnessCache
from prunerzero.fitness.evaluator import Evaluator
from prunerzero.fitness.pool import SerialBackend
from prunerzero.fitness.spec import EvalSpec
from prunerzero.primitives.expression import ExpressionError
from prunerzero.primitives.metric import BUILTINS, Metric

REFERENCE = Protocol(seq_len=512, calib_windows=32, eval_windows=32)
SEARCH = Protocol(seq_len=256, calib_windows=16, eval_windows=16)  # the CPU campaign's protocol


@dataclass(frozen=True)
class Fidelity:
    name: str
    fitness: str  # "perplexity" or "kl"
    windows: int  # evaluation windows of SEARCH.seq_len tokens
    seq_len: int = 256


FIDELITIES = [
    Fidelity("ppl 16x256 (today's campaign)", "perplexity", 16),
    Fidelity("ppl 4x256", "perplexity", 4),
    Fidelity("ppl 4x128", "perplexity", 4, 128),
    Fidelity("kl 4x256", "kl", 4),
    Fidelity("kl 8x128", "kl", 8, 128),
    Fidelity("kl 4x128", "kl", 4, 128),
    Fidelity("kl 2x256", "kl", 2),
]
# successive halving: (low fidelity for everyone, high fidelity for the best third)
HALVINGS = [("ppl 4x256", "ppl 16x256 (today's campaign)"), ("kl 4x128", "ppl 16x256 (today's campaign)")]


def reference_metrics(n: int, seed: int) -> list[Metric]:
    """Built-ins, the committed campaigns' halls of fame, then random trees, distinct by key."""
    out: dict[str, Metric] = {}
    for name, text in BUILTINS.items():
        out.setdefault(Metric.from_expression(text, name).key, Metric.from_expression(text, name))
    for hof in sorted(Path("results/runs").glob("*/hall_of_fame.csv")):
        with hof.open(newline="") as f:
            for row in csv.DictReader(f):
                try:
                    m = Metric.from_expression(row["formula"], f"{hof.parent.name[-6:]}#{row['rank']}")
                except ExpressionError:  # a campaign of another candidate kind (allocations, skip plans)
                    break
                out.setdefault(m.key, m)
    pset, rnd = primitive_set("extended"), random.Random(seed)
    state = random.getstate()
    random.setstate(rnd.getstate())
    try:
        while len(out) < n:
            tree = to_node(gp.PrimitiveTree(gp.genHalfAndHalf(pset, 1, 4)))
            s = simplify(tree)
            if s.ok and s.tree.terminals() >= {"W"}:
                out.setdefault(s.key, Metric(f"random-{len(out)}", s.tree))
    finally:
        random.setstate(state)
    for m in campaign_evaluations():
        out.setdefault(m.key, m)
    return list(out.values())


def campaign_evaluations(worst: float = 1000.0) -> list[Metric]:
    """Metrics the committed unstructured campaigns evaluated (valid perplexity below `worst`),
    spread over their quality: every third from the best, then the ones between."""
    seen: dict[str, tuple[float, Metric]] = {}
    for path in sorted(Path("results/runs").glob("*unstructured*/evaluations.csv")):
        with path.open(newline="") as f:
            for row in csv.DictReader(f):
                if row["status"] == "ok" and float(row["perplexity"]) < worst and row["key"] not in seen:
                    m = Metric.from_expression(row["formula"], f"{path.parent.name[-6:]}:{len(seen)}")
                    seen[row["key"]] = (float(row["perplexity"]), m)
    ranked = [m for _, m in sorted(seen.values(), key=lambda vm: vm[0])]
    return ranked[::3] + ranked[1::3] + ranked[2::3]


def measure(metrics: list[Metric], spec: EvalSpec, windows: int, cache: FitnessCache, log) -> dict[str, tuple]:
    """key -> (value, seconds, phenotype) for every metric under `spec` on `windows` windows."""
    return measure_items([(m.key, m.formula) for m in metrics], spec, windows, cache, log)


def measure_items(items: list[tuple[str, str | dict]], spec: EvalSpec, windows: int, cache: FitnessCache,
                  log) -> dict[str, tuple]:
    """key -> (value, seconds, phenotype) for every (key, candidate data) under `spec` (through the
    shared fitness cache: only what it lacks is measured)."""
    backend = SerialBackend(lambda: Evaluator(spec, needs=frozenset("GX"), log=log))
    fmap = FitnessMap(backend, cache, spec.cache_key(), windows)
    measured = fmap(items)
    backend.close()
    return {key: (r.result.value if r.result.status == "ok" else float("nan"), r.result.seconds, r.result.phenotype)
            for (key, _), r in zip(items, measured)}


def correlations(reference: dict, cheap: dict, keys: list[str]) -> tuple[float, float]:
    xs = [reference[k][0] for k in keys]
    ys = [cheap[k][0] for k in keys]
    return float(sps.spearmanr(xs, ys).statistic), float(sps.kendalltau(xs, ys).statistic)


def halving(low: dict, high: dict, keys: list[str], keep: float = 1 / 3) -> dict:
    """Successive halving's ranking: everyone on the low budget, the best `keep` re-measured on
    the high one and ranked first (as evolve/evaluation.py ranks full-budget candidates first)."""
    order = sorted(keys, key=lambda k: low[k][0])
    top = set(order[: max(1, round(len(order) * keep))])
    return {k: ((0, high[k][0]) if k in top else (1, low[k][0]), low[k][1] + (high[k][1] if k in top else 0))
            for k in keys}


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reference", type=int, default=60, help="size of the reference set")
    parser.add_argument("--seed", type=int, default=7)
    parser.add_argument("--out", type=Path, default=Path("results/FITNESS.md"))
    parser.add_argument("--data", type=Path, default=Path("results/fitness_study.json"))
    args = parser.parse_args(argv)
    log = lambda msg: print(msg, flush=True)  # noqa: E731
    cache = FitnessCache()
    candidates = reference_metrics(args.reference * 2, args.seed)  # more than needed: some prune alike
    t0 = time.time()
    ref_spec = EvalSpec(split="test", protocol=REFERENCE)
    reference: dict[str, tuple] = {}
    distinct: dict[str, str] = {}  # phenotype -> key: one metric per pruned model
    for start in range(0, len(candidates), 10):
        if len(distinct) >= args.reference:
            break
        batch = candidates[start:start + 10]
        reference |= measure(batch, ref_spec, REFERENCE.eval_windows, cache, log)
        for m in batch:
            value, _, phenotype = reference[m.key]
            if value == value and value < 1e6 and phenotype not in distinct and len(distinct) < args.reference:
                distinct[phenotype] = m.key
    keys = list(distinct.values())
    metrics = [m for m in candidates if m.key in keys]
    log(f"reference: {len(keys)} distinct metrics measured ({time.time() - t0:.0f}s)")
    rows, cheap_all = [], {}
    best_half = sorted(keys, key=lambda k: reference[k][0])[: len(keys) // 2]  # where a search's choices are made
    for fid in FIDELITIES:
        protocol = SEARCH.with_(seq_len=fid.seq_len, eval_windows=fid.windows)
        spec = EvalSpec(split="valid", protocol=protocol, fitness=fid.fitness)
        cheap = measure(metrics, spec, fid.windows, cache, log)
        cheap_all[fid.name] = cheap
        rho, tau = correlations(reference, cheap, keys)
        rows.append((fid.name, rho, tau, correlations(reference, cheap, best_half)[0],
                     statistics.median(cheap[k][1] for k in keys)))
        log(f"{fid.name}: spearman {rho:.3f} kendall {tau:.3f}")
    for low_name, high_name in HALVINGS:
        race = halving(cheap_all[low_name], cheap_all[high_name], keys)
        ranks = sorted(keys, key=lambda k: race[k][0])
        xs, ys = [reference[k][0] for k in keys], [ranks.index(k) for k in keys]
        rho, tau = float(sps.spearmanr(xs, ys).statistic), float(sps.kendalltau(xs, ys).statistic)
        half = float(sps.spearmanr([reference[k][0] for k in best_half], [ranks.index(k) for k in best_half]).statistic)
        rows.append((f"halving: {low_name}, best third at {high_name}", rho, tau, half,
                     statistics.median(race[k][1] for k in keys)))
    data = {"reference": {k: reference[k][0] for k in keys},
            "formulas": {m.key: m.formula for m in metrics},
            "cheap": {n: {k: c[k][0] for k in keys} for n, c in cheap_all.items()}, "rows": rows}
    atomic_write_text(args.data, json.dumps(data, indent=1) + "\n")
    atomic_write_text(args.out, report(rows, len(keys), args))
    print(report(rows, len(keys), args))


def report(rows, n: int, args) -> str:
    today = next(r for r in rows if r[0].startswith("ppl 16x256"))
    fit = [r for r in rows if r[1] >= 0.9]
    chosen = min(fit, key=lambda r: r[4]) if fit else None
    lines = ["# Cheap fitness against the full test protocol", "",
             f"Command: `python experiments/fitness_study.py --reference {args.reference} --seed {args.seed}`  ",
             f"Machine: {platform.processor() or platform.machine()}, {torch.get_num_threads()} threads, "
             f"torch {torch.__version__}", "",
             f"Reference: {n} metrics that prune differently (built-ins, committed halls of fame, random trees), "
             f"test perplexity at 50% unstructured per row, calibration {REFERENCE.calib_windows}x{REFERENCE.seq_len}, "
             f"{REFERENCE.eval_windows}x{REFERENCE.seq_len} test tokens. Cheap fitnesses on the valid split, "
             f"statistics from {SEARCH.calib_windows}x{SEARCH.seq_len} train tokens.", "",
             "Seconds are medians per candidate as measured in this run (the machine was shared with other "
             "work: compare them as ratios, which the same run measured alike).", "",
             "Spearman (best half): among the better half of the reference metrics only, where a search's "
             "choices are made.", "",
             "| fitness | Spearman | Kendall | Spearman (best half) | s / candidate | candidates / CPU-hour | vs today |",
             "|---|---:|---:|---:|---:|---:|---:|"]
    for name, rho, tau, half, secs in rows:
        lines.append(f"| {name} | {rho:.3f} | {tau:.3f} | {half:.3f} | {secs:.2f} | {3600 / secs:.0f} | "
                     f"{today[4] / secs:.1f}x |")
    lines += ["", "Rule: the cheapest fitness with Spearman >= 0.9. " + (
        f"**Chosen: {chosen[0]}** (Spearman {chosen[1]:.3f}, {today[4] / chosen[4]:.1f}x the candidates per CPU-hour)."
        if chosen else "No cheap fitness reaches Spearman 0.9: today's stays.")]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
