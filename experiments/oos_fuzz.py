"""Fuzz Opposing Operation Simplification on many random trees and report how sound it is.

    python experiments/oos_fuzz.py --trees 20000      # writes results/OOS_FUZZ.md
    python experiments/oos_fuzz.py --trees 3000 --seed 7 --real-trees 200   # + real statistics

For every random tree (DEAP ramped half-and-half over the extended operator set, depths 1-5):
simplify it, then compare the tree and what the search would evaluate in its place on fresh
inputs the simplifier never saw, with zeros and ties:
- realistic: quantised W (ties), G with exact zeros, X with dead and loud channels (what real
  statistics look like; the test suite runs 1500 trees of this);
- adversarial: every statistic dyadic-rounded, so sums of different statistics cancel to exact
  zeros (which real statistics do not do);
- real ranges: fresh draws (another seed, 32 x 64 per regime) over the ranges smollm2-135m's real
  statistics take (`probes.realistic_statistics`: G down to 1e-9, X up to 6e4, Q4_1 weights).
A rewrite is sound when the masks agree at every sparsity, per row and per layer: compared in
exact arithmetic (rounding noise snapped) in float64, and raw in float32 (the pipeline's
precision). Trees that share a key are checked alike. Crashes, non-finite scores and
simplifications that ran out of time are counted.

With --real-trees N, the first N of the same trees are also checked on the real statistics of
smollm2-135m (a sample of units, REAL_UNITS, loaded through the Evaluator as a campaign does):
the masks `pruning.masks.select_mask` cuts at 50/60/70% per row and per layer, in float64 and at
the pipeline's float32, for every rewrite (tree against what the search evaluates in its place)
and for every key that is a SymPy form (the tree against its form's tree: what any other tree of
that key would be served).
"""

from __future__ import annotations

import argparse
import platform
import random
import statistics
import time
from collections import defaultdict
from pathlib import Path

import torch
from deap import gp

from prunerzero.core.paths import atomic_write_text
from prunerzero.evolve import simplify as oos
from prunerzero.evolve.problem import primitive_set, to_node
from prunerzero.primitives.metric import Metric
from prunerzero.primitives.expression import from_sympy
from prunerzero.primitives.probes import orders_agree_up_to_rounding, ranking, realistic_statistics

# one unit of each kind, chosen for the tails: layers.18 q_proj has 11% of its G below 1e-6 (G down
# to 6.6e-10), layers.0 k_proj and layers.21 gate_proj the smallest X (1.7e-8), layers.11
# down_proj the loudest channel (X = 6.3e4)
REAL_UNITS = ("model.layers.18.self_attn.q_proj", "model.layers.0.self_attn.k_proj",
              "model.layers.10.self_attn.v_proj", "model.layers.15.self_attn.o_proj",
              "model.layers.21.mlp.gate_proj", "model.layers.11.mlp.down_proj")
SPARSITIES = (0.5, 0.6, 0.7)


def random_trees(n: int, seed: int) -> list:
    pset = primitive_set("extended")
    state = random.getstate()
    random.seed(seed)
    try:
        return [to_node(gp.PrimitiveTree(gp.genHalfAndHalf(pset, 1, 5))) for _ in range(n)]
    finally:
        random.setstate(state)


def inputs(kind: str, seed: int = 21) -> tuple[torch.Tensor, ...]:
    g = torch.Generator().manual_seed(seed)
    W = (torch.randn(20, 24, generator=g, dtype=torch.float64) * 6).round() / 16
    if kind == "realistic":
        G = torch.rand(20, 24, generator=g, dtype=torch.float64) * 0.3
        X = torch.rand(24, generator=g, dtype=torch.float64) * 2 + 0.01
    else:
        G = (torch.rand(20, 24, generator=g, dtype=torch.float64) * 10).round() / 32
        X = (torch.rand(24, generator=g, dtype=torch.float64) * 8).round() / 4 + 0.25
    G[torch.rand(20, 24, generator=g) < 0.2] = 0.0
    X[[2, 9]], X[5] = 0.0, 2e3
    return W, G, X


def same(a: torch.Tensor, b: torch.Tensor, exact: bool) -> bool:
    if exact:
        return all(torch.equal(x, y) for x, y in zip(ranking(a), ranking(b)))
    rows = lambda s: torch.sort(s, dim=-1, stable=True).indices  # noqa: E731
    flat = lambda s: torch.sort(s.reshape(-1), stable=True).indices  # noqa: E731
    return torch.equal(rows(a), rows(b)) and torch.equal(flat(a), flat(b))


def settings_all() -> dict[str, list[tuple[torch.Tensor, ...]]]:
    out = {k: [inputs(k)] for k in ("realistic", "adversarial")}
    out["real ranges"] = [(p["W"].double(), p["G"].double(), p["X"].double())
                          for p in realistic_statistics(99, rows=32, cols=64)]
    return out


# how each setting is compared: float64 in exact arithmetic (rounding noise snapped, as the
# simplifier's own exact check does) — except on real ranges, whose values span 15 decades, so
# the snapping (to 2^-40 of the largest score) would merge genuinely different small scores:
# there float64 is compared raw —, and float32 raw (the pipeline's masks), then again forgiving
# the near ties float32 rounding alone can reorder (`orders_agree_up_to_rounding`)
COMPARISONS = {"realistic": ("float64 exact", "float32 raw", "float32 beyond rounding"),
               "adversarial": ("float64 exact", "float32 raw", "float32 beyond rounding"),
               "real ranges": ("float64 raw", "float32 raw", "float32 beyond rounding")}


def agree(a: torch.Tensor, b: torch.Tensor, how: str) -> bool:
    if how == "float64 exact":
        return same(a, b, True)
    if how == "float32 beyond rounding":
        return orders_agree_up_to_rounding(a, b)
    return same(a, b, False)


def _scores(tree, case, how):
    dtype = torch.float64 if how.startswith("float64") else torch.float32
    return Metric("m", tree)(*(t.to(dtype) for t in case))


def run(n: int, seed: int) -> dict:
    trees = random_trees(n, seed)
    settings = settings_all()
    count = defaultdict(int)
    seconds, examples = [], defaultdict(list)
    by_key: dict[str, list] = defaultdict(list)
    outcomes = []
    flagged: dict[str, tuple] = {}  # rewrites that changed some mask on the fresh inputs
    for name in settings:  # every comparison in the table, 0 included
        for how in COMPARISONS[name]:
            count[f"rewrite changed masks: {name}, {how}"] = 0
    for tree in trees:
        t0 = time.perf_counter()
        try:
            out = oos.simplify(tree)
        except Exception as e:  # OOS must never raise: count it
            count["crashed"] += 1
            examples["crashed"].append(f"{tree}: {type(e).__name__}: {e}")
            continue
        seconds.append(time.perf_counter() - t0)
        outcomes.append((tree, out))
        if not out.ok:
            count["rejected"] += 1
            continue
        rewritten = str(out.tree) != str(tree)
        count["rewritten" if rewritten else "kept"] += 1
        for name, cases in settings.items():
            for dtype in (torch.float64, torch.float32):
                if not all(bool(torch.isfinite(Metric("a", tree)(*(t.to(dtype) for t in case))).all()) for case in cases):
                    count[f"non-finite {name} {dtype}"] += 1
            if not rewritten:
                continue
            for how in COMPARISONS[name]:
                if not all(agree(_scores(tree, case, how), _scores(out.tree, case, how), how) for case in cases):
                    tag = f"rewrite changed masks: {name}, {how}"
                    count[tag] += 1
                    examples[tag].append(f"{tree} -> {out.tree}")
                    flagged[str(tree)] = (tree, out.tree)
        by_key[out.key].append(out.tree)
    count["keys shared by >1 tree"] = sum(len(v) > 1 for v in by_key.values())
    for name, cases in settings.items():
        for how in COMPARISONS[name]:
            bad = 0
            for members in by_key.values():
                if len(members) > 1:
                    bad += not all(agree(_scores(members[0], case, how), _scores(t, case, how), how)
                                   for case in cases for t in members[1:])
            count[f"shared keys with differing masks: {name}, {how}"] = bad
    count["timed out (5 s)"] = len(oos.timed_out)
    return {"count": dict(count), "seconds": seconds, "examples": examples, "trees": n, "outcomes": outcomes,
            "flagged": list(flagged.values())}


# ---------------------------------------------------------------- real statistics
def real_units(names=REAL_UNITS) -> list[tuple[str, torch.Tensor, torch.Tensor, torch.Tensor]]:
    """(name, W, G, X) in float32 for a sample of smollm2-135m's units: the campaigns' model and
    calibration protocol, statistics from the project's cache (computed on a first run)."""
    from prunerzero.core.protocol import Protocol
    from prunerzero.fitness.evaluator import EvalSpec, Evaluator

    ev = Evaluator(EvalSpec(model="smollm2-135m", split="valid",
                            protocol=Protocol(seq_len=128, calib_windows=8, eval_windows=4)))
    stats = ev.stats(frozenset({"W", "G", "X"}))
    units = {u.name: u for u in ev.units}
    return [(n, units[n].weight.detach().float().clone(), stats.G[n].float().clone(), stats.X[n].float().clone())
            for n in names]


def _masks(scores: torch.Tensor) -> list[torch.Tensor]:
    from prunerzero.pruning.masks import select_mask

    return [select_mask(scores, s, group=grp) for s in SPARSITIES for grp in ("row", "layer")]


def mask_difference(a: Metric, b: Metric, units, dtype) -> tuple[float, bool]:
    """The largest fraction of mask bits that differ between two metrics' masks, over the units,
    sparsities and groups (0.0: the same masks), and whether some order differs by more than
    float32 rounding can make it (`orders_agree_up_to_rounding`)."""
    worst, beyond = 0.0, False
    for _, W, G, X in units:
        sa, sb = a(W.to(dtype), G.to(dtype), X.to(dtype)), b(W.to(dtype), G.to(dtype), X.to(dtype))
        if torch.equal(sa, sb):
            continue
        d = max(float((ma != mb).double().mean()) for ma, mb in zip(_masks(sa), _masks(sb)))
        if d > 0:
            worst = max(worst, d)
            beyond = beyond or not orders_agree_up_to_rounding(sa, sb)
    return worst, beyond


def run_real(outcomes: list, units) -> dict:
    count, examples = defaultdict(int), defaultdict(list)
    for what in ("rewrite", "key form"):
        for precision in ("float64", "float32"):
            count[f"{what} changed masks: real, {precision}"] = 0
            count[f"{what} changed masks: real, {precision}, beyond rounding"] = 0
    for tree, out in outcomes:
        if not out.ok:
            continue
        pairs = []
        if str(out.tree) != str(tree):
            count["rewritten"] += 1
            pairs.append(("rewrite", out.tree))
        if not out.key.startswith("tree:"):
            count["keyed by a SymPy form"] += 1
            try:
                form = from_sympy(Metric("k", out.tree).sympy)
            except Exception:
                form = None
            if form is not None and str(form) != str(tree):
                pairs.append(("key form", form))
        for what, other in pairs:
            for dtype in (torch.float64, torch.float32):
                d, beyond = mask_difference(Metric("a", tree), Metric("b", other), units, dtype)
                if d > 0:
                    tag = f"{what} changed masks: real, {'float64' if dtype == torch.float64 else 'float32'}"
                    count[tag] += 1
                    count[f"{tag}, beyond rounding"] += beyond
                    examples[tag].append((d, f"{tree} -> {other}{'' if beyond else ' (rounding only)'}"))
    return {"count": dict(count), "examples": examples}


def run_flagged(flagged: list, units) -> list[tuple[float, float, bool, str]]:
    """Every rewrite that changed some mask on the fresh inputs, measured on the real statistics:
    (largest fraction of mask bits that differ in float32, in float64, beyond rounding, pair)."""
    out = []
    for tree, new in flagged:
        d32, beyond = mask_difference(Metric("a", tree), Metric("b", new), units, torch.float32)
        d64, _ = mask_difference(Metric("a", tree), Metric("b", new), units, torch.float64)
        out.append((d32, d64, beyond, f"{tree} -> {new}"))
    return sorted(out, reverse=True)


def report(r: dict, command: str) -> str:
    s = r["seconds"]
    lines = ["# OOS fuzz: soundness of simplification on random trees", "",
             f"Command: `{command}`  ", f"Machine: {platform.processor() or platform.machine()}, "
             f"{torch.get_num_threads()} threads, torch {torch.__version__}, Python {platform.python_version()}", "",
             f"{r['trees']} random trees (extended operators, depths 1-5). OOS time per tree: median "
             f"{1e3 * statistics.median(s):.1f} ms, p99 {1e3 * sorted(s)[int(0.99 * len(s))]:.0f} ms, "
             f"max {max(s):.2f} s.", "", "| outcome | trees |", "|---|---:|"]
    lines += [f"| {k} | {v} |" for k, v in sorted(r["count"].items())]
    lines += ["", "What the rows mean: *float64 exact* compares masks in exact arithmetic (rounding noise "
              "snapped, as the simplifier's own exact check does): a count there is an unsound rewrite. "
              "*float64 raw* (real ranges, whose 15 decades the snapping would merge) compares them unsnapped. "
              "*float32 raw* compares the masks the pipeline cuts at float32, bit for bit; *float32 beyond "
              "rounding* forgives the weights whose scores lie within 2^-16 of each other, which float32 "
              "rounding alone orders one way for one spelling and another way for another (and differently "
              "on another CPU or a GPU): a count there is a rewrite that changes what the pipeline prunes "
              "(saturation, underflow, a protective epsilon, cancellation). OOS refuses any rewrite that "
              "changes a float32 mask on its own probes (`primitives/probes.py`); these inputs are fresh. The "
              "adversarial inputs make sums of different statistics cancel to exact zero, which real "
              "statistics do not.", ""]
    for tag, items in sorted(r["examples"].items()):
        lines += [f"Examples, {tag}:", ""] + [f"- `{x}`" for x in items[:5]] + [""]
    real = r.get("real")
    if real:
        lines += [f"## Real statistics: smollm2-135m", "",
                  f"The first {real['trees']} of these trees on the real statistics of {len(REAL_UNITS)} units "
                  f"({', '.join(u.removeprefix('model.') for u in REAL_UNITS)}; austen, 8 x 128 calibration tokens): "
                  f"masks as `pruning.masks.select_mask` cuts them at {', '.join(f'{s:.0%}' for s in SPARSITIES)}, per row "
                  "and per layer. *rewrite*: the tree against what the search evaluates in its place; *key form*: "
                  "the tree against the tree of its SymPy key (what another tree of that key is served). "
                  f"Loading the statistics: {real['load_s']:.0f} s; checking: {real['check_s']:.0f} s.", "",
                  "| outcome | trees |", "|---|---:|"]
        lines += [f"| {k} | {v} |" for k, v in sorted(real["count"].items())]
        lines += [""]
        for tag, items in sorted(real["examples"].items()):
            lines += [f"Cases, {tag} (largest fraction of mask bits that differ):", ""]
            lines += [f"- {d:.2e}: `{x}`" for d, x in sorted(items, reverse=True)[:10]] + [""]
        flagged = real.get("flagged", [])
        if flagged:
            changed = [f for f in flagged if f[0] > 0 or f[1] > 0]
            lines += [f"### The {len(flagged)} rewrites that changed some mask on the fresh inputs above, on the real "
                      "statistics", "",
                      f"{len(changed)} of them change a mask on these units (float32 or float64), "
                      f"{sum(f[2] for f in changed)} beyond rounding. Largest fractions of mask bits that differ "
                      "(float32, float64):", ""]
            lines += [f"- {d32:.2e}, {d64:.2e}{' (beyond rounding)' if beyond else ''}: `{x}`"
                      for d32, d64, beyond, x in flagged[:12]] + [""]
    return "\n".join(lines) + "\n"


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trees", type=int, default=20000)
    parser.add_argument("--seed", type=int, default=2026)
    parser.add_argument("--out", type=Path, default=Path("results/OOS_FUZZ.md"))
    parser.add_argument("--real-trees", type=int, default=0,
                        help="also check the first N trees on smollm2-135m's real statistics")
    args = parser.parse_args(argv)
    result = run(args.trees, args.seed)
    command = f"python experiments/oos_fuzz.py --trees {args.trees} --seed {args.seed}"
    if args.real_trees:
        t0 = time.perf_counter()
        units = real_units()
        t1 = time.perf_counter()
        result["real"] = run_real(result["outcomes"][: args.real_trees], units)
        result["real"]["flagged"] = run_flagged(result["flagged"], units)
        result["real"].update(trees=min(args.real_trees, args.trees), load_s=t1 - t0, check_s=time.perf_counter() - t1)
        command += f" --real-trees {args.real_trees}"
    text = report(result, command)
    atomic_write_text(args.out, text)
    print(text)


if __name__ == "__main__":
    main()
