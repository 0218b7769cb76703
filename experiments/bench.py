"""Benchmark suite: what a candidate costs, against the hardware floor, and how the search scales.

    python experiments/bench.py                  # size by machine: "full" on a GPU, "small" on CPU
    python experiments/bench.py --size tiny      # seconds: the CPU smoke run the tests use

Measures, on whatever machine it runs on (CPU or GPU), with the real smollm2-135m and austen:
  a. per-candidate fitness cost broken down (scores, masks, apply, perplexity forward, restore)
     against a plain forward pass over the same tokens (the floor);
  b. evaluator throughput in tokens/s against the plain forward;
  c. Ray scaling: evaluations/s with 1, 2, … evaluators, efficiency = speedup / N;
  d. search efficiency over a 20-generation campaign: how many evaluations OOS, de-duplication,
     the fitness cache and identical masks spare; and the windows successive halving spares;
  e. peak memory of statistics collection and of one evaluator, against the model's size;
  f. each per-candidate kernel chosen (mask selection, zeroing) against the plain torch way;
  g. search throughput: today's campaign fitness against the chosen cheap one (results/FITNESS.md,
     experiments/smollm2-cpu-cheap.toml) and its bfloat16 form (results/BF16.md,
     experiments/smollm2-cpu-cheap-bf16.toml) side by side, the cheap one's overhead, and the
     driver's own time per candidate (OOS, selection, cache, checkpoints) against one evaluation,
     projected to N evaluators.
and writes the report (tables, machine, command, medians over repeats) to results/BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import torch
import torch.nn.functional as F

from prunerzero.fitness.evaluator import EvalSpec, Evaluator
from prunerzero.fitness.perplexity import nll_sum
from prunerzero.fitness.pool import Job, RayBackend
from prunerzero.core.paths import atomic_write_text
from prunerzero.primitives.metric import resolve_metric
from prunerzero.core.protocol import Protocol
from prunerzero.pruning.reduce import unit_scores
from prunerzero.pruning.masks import select_mask, zero_masked
from prunerzero.primitives.stats import collect_stats

from bench_report import machine, median_ms, merge_reports, report  # noqa: E402  (a sibling script)

SIZES = {  # protocol and repetition per size; "small" is the CPU campaign's protocol
    # (experiments/smollm2-cpu-unstructured50.toml), "full" the default protocol (GPU)
    # tiny: the test suite's smoke run, no warm-up round (its timings are not reported anywhere)
    "tiny": dict(seq_len=64, calib=2, windows=2, repeats=1, warmup=0, jobs=2, population=8, generations=20, rungs=2,
                 toy=True, driver_generations=2, driver_population=8),
    "small": dict(seq_len=256, calib=16, windows=16, repeats=7, jobs=4, population=16, generations=20, rungs=3,
                  toy=True, driver_generations=10),
    "full": dict(seq_len=1024, calib=128, windows=128, repeats=7, jobs=4, population=32, generations=20, rungs=3,
                 toy=False, driver_generations=10),
}
METRIC = "wanda"
RAY_METRICS = ["magnitude", "wanda", "ria", "pruner-zero", "gradient", "mul(sqr(W), sqrt(X))",
               "mul(abs(W), X)", "mul(sqrt(abs(W)), G)"]


def sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def timed(fn):
    sync()
    t0 = time.perf_counter()
    out = fn()
    sync()
    return time.perf_counter() - t0, out


# ------------------------------------------------------------------ a, b: one candidate
def candidate_costs(ev: Evaluator, repeats: int, warmup: int = 1) -> dict[str, list[float]]:
    """Seconds per step of one fitness evaluation, `repeats` times after `warmup` rounds; plus the floor,
    measured in the same repeat as the evaluation it is compared with (a noisy machine moves
    both together, so ratios are taken per repeat)."""
    metric = resolve_metric(METRIC)
    stats = ev.stats(metric.needs)
    ids = ev.windows
    steps: dict[str, list[float]] = {k: [] for k in
                                     ("scores", "masks", "apply", "forward", "restore", "evaluate", "floor")}
    for rep in range(warmup + repeats):
        t_scores, scores = timed(lambda: [unit_scores(metric, u, stats) for u in ev.units])
        t_masks, masks = timed(lambda: [select_mask(s, ev.target.sparsity, ev.target.nm, ev.target.group) for s in scores])
        t_apply = timed(lambda: [zero_masked(u.weight, m) for u, m in zip(ev.units, masks)])[0]
        t_forward = timed(lambda: ev.measure())[0]
        t_restore = timed(ev.restore)[0]
        t_evaluate = timed(lambda: ev.evaluate(metric))[0]
        t_floor = timed(lambda: plain_forward(ev.model, ids))[0]
        if rep >= warmup:
            for k, t in zip(steps, (t_scores, t_masks, t_apply, t_forward, t_restore, t_evaluate, t_floor)):
                steps[k].append(t)
    return steps


@torch.no_grad()
def plain_forward(model, ids: torch.Tensor, batch_size: int = 4) -> None:
    device = next(model.parameters()).device
    for i in range(0, ids.shape[0], batch_size):
        model(ids[i : i + batch_size].to(device), use_cache=False)


# ------------------------------------------------------------------ c: Ray scaling
def ray_scaling(spec: EvalSpec, max_workers: int, jobs_per_worker: int, gpu: bool) -> list[dict]:
    import ray

    from prunerzero.evolve.campaign import evaluator_factory

    # one Ray and every evaluator started once (loading is not what is timed): the first n of
    # them, warm, evaluate n * jobs_per_worker candidates
    backend = RayBackend(evaluator_factory(spec), workers=max_workers, cpus_per_worker=1.0,
                         gpus_per_worker=(1.0 / max_workers if gpu else 0.0), retries=1, timeout_s=0.0, address="",
                         dashboard=False)
    every = backend.actors
    backend.map([Job(f"warm-{i}", resolve_metric(RAY_METRICS[i % len(RAY_METRICS)]).formula)
                 for i in range(max_workers)])  # warm-up: one evaluation on each evaluator
    rows = []
    for n in range(1, max_workers + 1):
        backend.actors = every[:n]
        jobs = [Job(f"bench-{i}", resolve_metric(RAY_METRICS[i % len(RAY_METRICS)]).formula)
                for i in range(n * jobs_per_worker)]
        t, results = timed(lambda: backend.map(jobs))
        rows.append({"workers": n, "evaluations": len(jobs), "seconds": t, "evals_per_s": len(jobs) / t,
                     "failed": sum(r.status != "ok" for r in results)})
    backend.actors = every
    backend.close()
    ray.shutdown()
    base = rows[0]["evals_per_s"]
    for r in rows:
        r["speedup"] = r["evals_per_s"] / base
        r["efficiency"] = r["speedup"] / r["workers"]
    return rows


# ------------------------------------------------------------------ d: search efficiency
def search_efficiency(size: dict, spec: EvalSpec) -> dict:
    """Two campaigns from the same seed: every survivor on the full window budget (what OOS,
    de-duplication, the cache and identical masks spare, tree by tree), and with successive
    halving (what the window budget spent comes to against fully evaluating every tree)."""
    h = _campaign_history(size, spec, rungs=1)
    generated = int(h["offspring"].sum() + h["rejected"].sum())  # every tree made, degenerate ones included
    evaluated = int(h["evaluations"].sum())
    cache_hits = int(h["cache_hits"].sum())
    same_masks = int(h["phenotype_hits"].sum())  # masks computed, forward skipped
    halving = _campaign_history(size, spec, rungs=size["rungs"])
    halving_generated = int(halving["offspring"].sum() + halving["rejected"].sum())
    return {"evaluator": "toy (synthetic)" if size["toy"] else "real perplexity", "generations": size["generations"],
            "population": size["population"], "generated": generated, "rejected_by_oos": int(h["rejected"].sum()),
            "duplicates": int(h["offspring"].sum()) - evaluated - cache_hits - same_masks, "cache_hits": cache_hits,
            "same_masks": same_masks,
            "evaluated": evaluated, "spared": 1 - evaluated / max(generated, 1),
            "best": f"{h['best_formula'].iloc[-1]} ({h['best_fitness'].iloc[-1]:.3f})",
            "rungs": size["rungs"], "full_windows": size["windows"], "halving_generated": halving_generated,
            "halving_forwards": int(halving["evaluations"].sum()), "halving_windows": int(halving["eval_windows"].sum()),
            "halving_spared": 1 - halving["eval_windows"].sum() / max(halving_generated * size["windows"], 1),
            "halving_best": f"{halving['best_formula'].iloc[-1]} ({halving['best_fitness'].iloc[-1]:.3f})"}


def _campaign_history(size: dict, spec: EvalSpec, rungs: int):
    import pandas as pd
    from rich.console import Console

    from prunerzero.evolve.campaign import run_campaign
    from prunerzero.evolve.config import from_dict

    with tempfile.TemporaryDirectory() as root:
        config = from_dict({
            "name": "bench-search", "runs_dir": f"{root}/runs", "cache": f"{root}/fitness.sqlite",
            "eval": {"model": "toy" if size["toy"] else spec.model, "corpus": spec.corpus, "device": spec.device},
            "protocol": {"seq_len": size["seq_len"], "calib_windows": size["calib"], "eval_windows": size["windows"]},
            "search": {"population": size["population"], "generations": size["generations"], "seed": 0},
            "fidelity": {"rungs": rungs, "eta": 2},
        })
        run_dir = run_campaign(config, console=Console(file=open(os.devnull, "w")))
        return pd.read_csv(run_dir / "history.csv")


# ------------------------------------------------------------------ g: search throughput
CHEAP_CONFIG = Path(__file__).with_name("smollm2-cpu-cheap.toml")  # the fitness chosen from results/FITNESS.md
CHEAP_BF16_CONFIG = Path(__file__).with_name("smollm2-cpu-cheap-bf16.toml")  # the same in bfloat16 (results/BF16.md)


def search_throughput(spec: EvalSpec, size: dict, repeats: int, today: Evaluator, warmup: int = 1) -> dict:
    """Candidates per hour at today's campaign fitness and at the chosen cheap one, measured
    alternately in one run; the cheap one's per-candidate cost broken down; and the driver's time
    per evaluated candidate over toy campaigns with the CPU campaign's search settings, OOS in the
    driver against OOS in worker processes."""
    from prunerzero.evolve.config import load_config

    cheap_spec = load_config(CHEAP_CONFIG).eval_spec()
    bf16_spec = load_config(CHEAP_BF16_CONFIG).eval_spec()
    if size["toy"] and spec.protocol.seq_len < 128:  # the tiny smoke run: the chosen fitness on its own protocol
        cheap_spec = replace(spec, fitness=cheap_spec.fitness)
        bf16_spec = replace(cheap_spec, dtype=bf16_spec.dtype)
    cheap = today if cheap_spec == today.spec else Evaluator(cheap_spec, needs=frozenset("WGX"))
    bf16 = Evaluator(bf16_spec, needs=frozenset("WGX"))
    metric = resolve_metric(METRIC)
    evaluators = {"today": today, "cheap": cheap, "cheap_bf16": bf16}
    evals = {name + suffix: [] for suffix in ("", "_1t") for name in evaluators}
    threads = torch.get_num_threads()
    for suffix, n in (("", threads), ("_1t", 1)):  # as one evaluator with every core; as a 1-CPU Ray worker
        torch.set_num_threads(n)
        for rep in range(warmup + repeats):
            seconds: dict[int, float] = {}  # per evaluator: one that stands for two (same spec) runs once
            for name, ev in evaluators.items():  # in turn: a noisy machine moves all three alike
                if id(ev) not in seconds:
                    seconds[id(ev)] = timed(lambda: ev.evaluate(metric))[0]
                if rep >= warmup:
                    evals[name + suffix].append(seconds[id(ev)])
    torch.set_num_threads(threads)
    drivers = {workers: _driver_seconds(size, workers) for workers in (0, os.cpu_count() or 1)}
    return {"today": today.spec, "cheap": cheap_spec, "cheap_bf16": bf16_spec, "evals": evals,
            "cheap_costs": candidate_costs(cheap, repeats, warmup), "cheap_tokens": int(cheap.windows.numel()),
            "drivers": drivers}


def _driver_seconds(size: dict, oos_workers: int) -> dict:
    """A toy campaign (its evaluations take no model) with the committed CPU campaign's search
    settings. Per generation, the driver's time is the generation's wall time less the
    evaluations' own seconds, plus the checkpoint and logs written after it; summed over the
    generations after the first (the first also waits for the OOS processes to start, once per
    campaign, while a real campaign's evaluators load)."""
    import pandas as pd
    from rich.console import Console

    from prunerzero.evolve import campaign
    from prunerzero.evolve.config import from_dict, load_config

    from prunerzero.evolve.engine import Engine

    search = load_config(Path(__file__).with_name("smollm2-cpu-unstructured50.toml")).search
    saves: list[float] = []
    prepares: list[float] = []
    save, prepare_all = campaign._save, Engine._prepare_all

    def timed_save(*a, **kw):  # the checkpoint and logs of each generation are the driver's work too
        saves.append(timed(lambda: save(*a, **kw))[0])

    def timed_prepare(*a, **kw):  # OOS of a generation's offspring (and their redraws): its share of the driver
        seconds, out = timed(lambda: prepare_all(*a, **kw))
        prepares.append(seconds)
        return out

    campaign._save, Engine._prepare_all = timed_save, timed_prepare
    try:
        with tempfile.TemporaryDirectory() as root:
            config = from_dict({
                "name": "bench-driver", "runs_dir": f"{root}/runs", "cache": f"{root}/fitness.sqlite",
                "eval": {"model": "toy"}, "protocol": {"calib_windows": 2, "eval_windows": 16},
                "search": {"population": size.get("driver_population", search.population),
                           "generations": size["driver_generations"], "operators": search.operators,
                           "max_depth": search.max_depth, "max_size": search.max_size,
                           "init_max_depth": search.init_max_depth, "oos_workers": oos_workers, "seed": 0}})
            run_dir = campaign.run_campaign(config, console=Console(file=open(os.devnull, "w")))
            h = pd.read_csv(run_dir / "history.csv")
    finally:
        campaign._save, Engine._prepare_all = save, prepare_all
    later = h.iloc[1:]
    driver = float((later["wall_seconds"] - later["eval_seconds"]).sum()) + sum(saves[1:len(h)])
    evaluated = int(later["evaluations"].sum())
    return {"generations": len(later), "offspring": int(later["offspring"].sum()), "evaluated": evaluated,
            "first_generation_s": float(h["wall_seconds"].iloc[0] - h["eval_seconds"].iloc[0]),
            "driver_seconds": driver, "per_candidate": driver / max(evaluated, 1),
            "oos_seconds": sum(prepares[1:len(h)])}


# ------------------------------------------------------------------ e: memory
def peak_memory(spec: EvalSpec) -> dict:
    """Peak memory of each phase, in one fresh process (GPU: max allocated; CPU: max RSS)."""
    code = (f"import sys; sys.path.insert(0, {str(Path(__file__).parent)!r}); import bench; "
            f"from bench import *; import json; print(json.dumps(bench._phase_peaks({spec!r})))")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)})
    if proc.returncode:
        raise RuntimeError(f"memory phases failed:\n{proc.stderr[-2000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _phase_peaks(spec: EvalSpec) -> dict[str, float]:
    """MiB at the peak of each phase: loading an evaluator (model, corpus, dense snapshot);
    collecting W, G, X statistics on it (no cache); one evaluation. The peak is reset before
    each phase after the first (CPU: VmHWM through /proc/self/clear_refs; GPU: max allocated),
    so each phase's peak is what it adds to the loaded process, as a fresh process per phase
    would measure it."""
    gpu = torch.cuda.is_available()
    ev = Evaluator(spec)
    out = {"load": _peak_mb(gpu)}
    for phase in ("stats", "evaluator"):
        if gpu:
            torch.cuda.reset_peak_memory_stats()
        else:
            Path("/proc/self/clear_refs").write_text("5")  # resets the peak RSS to the current RSS
        if phase == "stats":
            collect_stats(ev.model, ev.adapter, ev.calibration, need_g=True)  # the result is dropped
        else:
            ev.evaluate(resolve_metric("pruner-zero"))
        out[phase] = _peak_mb(gpu)
    return out


def _peak_mb(gpu: bool) -> float:
    if gpu:
        return torch.cuda.max_memory_allocated() / 2**20
    status = Path("/proc/self/status").read_text()
    return int(next(ln.split()[1] for ln in status.splitlines() if ln.startswith("VmHWM:"))) / 1024


# ------------------------------------------------------------------ f: kernel choices
def kernel_choices(ev: Evaluator, repeats: int, warmup: int = 1) -> list[dict]:
    """The per-candidate kernels chosen, each against the plain torch alternative, on the
    model's real wanda scores, interleaved in one run (medians of `repeats`)."""
    from prunerzero.pruning import masks

    metric = resolve_metric(METRIC)
    scores = [unit_scores(metric, u, ev.stats(metric.needs)) for u in ev.units]
    half = [s.shape[1] // 2 for s in scores]
    groups = [s.reshape(-1, 4) for s in scores]
    pruned = [select_mask(s, 0.5) for s in scores]
    ids = ev.windows[:4].to(ev.lm.device)
    with torch.no_grad():
        logits = ev.model(ids, use_cache=False).logits[:, :-1]

    def zero_with(fill):
        def run():
            for u, m in zip(ev.units, pruned):
                fill(u.weight, m)
            ev.restore()
        return run

    pairs = [("k-th lowest score per row (50% of each row)",
              "torch.topk", lambda: [masks.topk_kth(s, k) for s, k in zip(scores, half)],
              "numpy introselect (CPU)" if ev.lm.device.type == "cpu" else "torch.topk (as chosen off CPU)",
              lambda: [masks._kth_lowest(s, k) for s, k in zip(scores, half)]),
             ("2:4 masks",
              "topk selection per group", lambda: [masks.tie_break(g, masks.topk_kth(g, 2), 2) for g in groups],
              "stable ranks by column", lambda: [masks._stable_ranks(g) < 2 for g in groups]),
             ("zeroing the pruned weights, then restoring",
              "masked_fill_", zero_with(lambda w, m: w.masked_fill_(m, 0)),
              "integer-view multiply", zero_with(masks.zero_masked)),
             (f"loss over one batch's logits ({ids.shape[0]}x{ids.shape[1]})",
              "cross_entropy, whole batch", lambda: F.cross_entropy(logits.float().flatten(0, 1), ids[:, 1:].flatten(),
                                                                      reduction="sum"),
              "cross_entropy by chunks", lambda: nll_sum(logits, ids[:, 1:]))]
    rows = []
    for what, base_name, base, chosen_name, chosen in pairs:
        times = {"base": [], "chosen": []}
        for rep in range(warmup + repeats):
            for key, fn in (("base", base), ("chosen", chosen)):
                t = timed(fn)[0]
                if rep >= warmup:
                    times[key].append(t)
        rows.append({"what": what, "base": base_name, "chosen": chosen_name, "base_ms": median_ms(times["base"]),
                     "chosen_ms": median_ms(times["chosen"])})
    return rows


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", choices=SIZES, default="full" if torch.cuda.is_available() else "small")
    parser.add_argument("--out", type=Path, default=Path("results/BENCHMARKS.md"))
    parser.add_argument("--max-workers", type=int, default=0, help="Ray evaluators up to (default: CPU cores, or 4 on a GPU)")
    parser.add_argument("--sections", default="abcdefg",
                        help="which sections to run, e.g. 'abf' (a and b are one measurement): a machine with a "
                             "time limit per command runs them in parts, each with its own --out (or --merge)")
    parser.add_argument("--merge", action="store_true",
                        help="keep the sections not run (and their targets) from the report already at --out")
    args = parser.parse_args(argv)
    if not set(args.sections) <= set("abcdefg") or not args.sections:
        parser.error(f"--sections {args.sections!r}: use letters among a, b, c, d, e, f, g")
    if "b" in args.sections and "a" not in args.sections:
        args.sections += "a"
    size = SIZES[args.size]
    args.repeats, args.jobs, warmup = size["repeats"], size["jobs"], size.get("warmup", 1)
    gpu = torch.cuda.is_available()
    max_workers = args.max_workers or (4 if gpu else max(1, os.cpu_count() or 1))
    spec = EvalSpec(split="valid", protocol=Protocol(seq_len=size["seq_len"], calib_windows=size["calib"],
                                                     eval_windows=size["windows"]))
    print(f"bench {args.size} on {machine()}", flush=True)
    ev = Evaluator(spec, needs=frozenset("WGX"))
    measure = {"a": lambda: candidate_costs(ev, args.repeats, warmup),  # a and b: one measurement
               "f": lambda: kernel_choices(ev, args.repeats, warmup),
               "e": lambda: peak_memory(spec),
               "c": lambda: ray_scaling(spec, max_workers, args.jobs, gpu),
               "d": lambda: search_efficiency(size, spec),
               "g": lambda: search_throughput(spec, size, args.repeats, ev, warmup)}
    results = {}
    for name, fn in measure.items():
        t0 = time.perf_counter()
        results[name] = fn() if name in args.sections else None
        print(f"{name}: {f'done in {time.perf_counter() - t0:.1f}s' if name in args.sections else 'not asked'}",
              flush=True)
    text = report(args, spec, ev, METRIC, results["a"], results["c"], results["d"], results["e"], results["f"],
                  results["g"])
    if args.merge and args.out.is_file():
        text = merge_reports(args.out.read_text(), text)
    atomic_write_text(args.out, text)
    print(text)


if __name__ == "__main__":
    main()
