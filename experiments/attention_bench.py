"""Attention-mode benchmark: q/k masks optimised for the attention vs the metric's own masks.

    python experiments/attention_bench.py                       # the report (results/ATTENTION.md)
    python experiments/attention_bench.py --tune 5 --steps 100  # one layer: cost and settings

On smollm2-135m and austen, only q and k pruned (v, o and the MLP dense: all else equal), at each
sparsity: the metric's masks (the linear approximation, `steps=0`), the optimised masks, and
SparseGPT on q and k alone (sequential, weights updated). For each, per layer, the
attention-probability error (frobenius: sum ||P - P_dense||^2 / sum ||P_dense||^2 over heads and
windows) on *valid* windows with the dense model's inputs to that layer, and whole-model test
perplexity. The optimiser's seconds per layer on this machine are reported beside them.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

from prunerzero.core.paths import atomic_write_text
from prunerzero.core.protocol import Protocol
from prunerzero.fitness.session import Session
from prunerzero.fitness.spec import EvalSpec
from prunerzero.fitness.speed import machine
from prunerzero.pruning.reduce import unit_scores
from prunerzero.pruning.attention.mode import AttentionTarget, _Grab, optimise_qk
from prunerzero.pruning.attention.loss import BlockAttention, Objective
from prunerzero.pruning.sequential import run_sequential
from prunerzero.pruning.unstructured.sparsegpt import HessianAccumulator, sparsegpt_unit
from prunerzero.pruning.unstructured.target import PruneTarget



def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def attention_inputs(ev, windows: torch.Tensor, tokens: int = 0) -> list:
    """Every layer's attention inputs on `windows`, from one dense forward."""
    grabs = []
    handles = []
    for a in ev.adapter.structure.attentions:
        grabs.append(_Grab(windows.shape[0], tokens))
        handles.append(a.module.register_forward_pre_hook(grabs[-1], with_kwargs=True))
    try:
        with torch.no_grad():
            for i in range(0, windows.shape[0], 8):
                ev.model(windows[i:i + 8].to(ev.lm.device), use_cache=False)
    finally:
        for h in handles:
            h.remove()
    return [g.inputs() for g in grabs]


class LayerErrors:
    """Per-layer attention error of the model's current q/k against the dense q/k, on fixed inputs."""

    def __init__(self, ev, inputs, objective: str = "frobenius", chunk: int = 128) -> None:
        self.attns = ev.adapter.structure.attentions
        self.objectives = [Objective(BlockAttention(a, x, chunk), a.q.weight, a.k.weight, objective)
                           for a, x in zip(self.attns, inputs)]

    def __call__(self) -> list[float]:
        return [o.error(a.q.weight, a.k.weight) for o, a in zip(self.objectives, self.attns)]


@torch.no_grad()
def sparsegpt_qk(ev, sparsity: float) -> None:
    """SparseGPT on q and k only, block by block on the pruned prefix's inputs."""
    target = PruneTarget(sparsity)

    def process_block(i, run_block):
        acc = HessianAccumulator()
        with ev.adapter.capture(acc, blocks=[i]):
            run_block()
        for u in ev.adapter.block_units(i):
            if u.role in ("q", "k"):
                u.weight.copy_(sparsegpt_unit(u.weight, acc.hessian(u.tap), target).to(u.weight.dtype))

    run_sequential(ev.model, ev.adapter, ev.calibration, process_block)


def tune(ev, args) -> None:
    """One layer: the optimiser's cost and its error on calibration and valid tokens."""
    layer = args.tune
    a = ev.adapter.structure.attentions[layer]
    calib = attention_inputs(ev, ev.calibration[:args.windows])[layer]
    valid = attention_inputs(ev, ev.corpus.evaluation("valid", args.seq_len, args.valid_windows, ev.bos))[layer]
    stats = ev.stats(frozenset({"X"}))
    metric = ev.candidate(args.metric)
    for s in args.sparsities:
        for lr in args.lrs:
            t = AttentionTarget(sparsity=s, steps=args.steps, lr=lr, soft=args.soft, objective=args.objective,
                                windows=args.windows)
            obj = Objective(BlockAttention(a, calib, t.chunk), a.q.weight, a.k.weight, t.objective)
            r = optimise_qk(obj, a.q.weight, a.k.weight, unit_scores(metric, a.q, stats),
                            unit_scores(metric, a.k, stats), t)
            check = Objective(BlockAttention(a, valid), a.q.weight, a.k.weight, "frobenius")
            init = optimise_qk(obj, a.q.weight, a.k.weight, unit_scores(metric, a.q, stats),
                               unit_scores(metric, a.k, stats), AttentionTarget(sparsity=s, steps=0)).masks
            v0 = check.error(a.q.weight * ~init[0], a.k.weight * ~init[1])
            v1 = check.error(a.q.weight * ~r.masks[0], a.k.weight * ~r.masks[1])
            log(f"layer {layer} s={s} lr={lr} soft={args.soft}: calib {r.init_error:.4g} -> {r.error:.4g} "
                f"({r.error / r.init_error - 1:+.1%}, best step {r.best_step}); valid {v0:.4g} -> {v1:.4g} "
                f"({v1 / v0 - 1:+.1%}); {r.seconds:.1f} s ({r.seconds / max(args.steps, 1):.3f} s/step)")


def run(ev, args) -> dict:
    valid = ev.corpus.evaluation("valid", args.seq_len, args.valid_windows, ev.bos)
    errors = LayerErrors(ev, attention_inputs(ev, valid))
    dense = ev.measure()
    log(f"dense test perplexity {dense.perplexity:.3f} on {dense.tokens} tokens")
    metric = ev.candidate(args.metric)
    results = {"dense": dense.perplexity}
    for s in args.sparsities:
        for name, steps in (("metric", 0), ("optimised", args.steps)):
            target = AttentionTarget(sparsity=s, others="dense", steps=steps, lr=args.lr, soft=args.soft,
                                     objective=args.objective, windows=args.windows)
            t0 = time.perf_counter()
            try:
                report = ev.prune(metric, target)
                layer_err = errors()
                ppl = ev.measure().perplexity
            finally:
                ev.restore()
            results[(s, name)] = dict(errors=layer_err, ppl=ppl, seconds=time.perf_counter() - t0,
                                      per_layer=report.extra["seconds_per_layer"])
            log(f"s={s} {name}: test perplexity {ppl:.3f}, median valid error {statistics.median(layer_err):.4g}, "
                f"{results[(s, name)]['seconds']:.0f} s")
        if args.sparsegpt:
            t0 = time.perf_counter()
            try:
                sparsegpt_qk(ev, s)
                layer_err = errors()
                ppl = ev.measure().perplexity
            finally:
                ev.restore()
            results[(s, "sparsegpt")] = dict(errors=layer_err, ppl=ppl, seconds=time.perf_counter() - t0)
            log(f"s={s} sparsegpt: test perplexity {ppl:.3f}, median valid error {statistics.median(layer_err):.4g}")
    return results


def write_report(ev, args, results: dict, command: str) -> str:
    spec = ev.spec
    lines = [
        "# Attention mode: q/k masks optimised for the attention vs the metric's masks", "",
        f"Written by `{command}` on {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}.",
        f"Machine: {machine()}. Device {ev.lm.device}, weights {str(ev.lm.dtype).replace('torch.', '')}.",
        f"Model {spec.model}, corpus {spec.corpus}; {spec.protocol.describe()}. Only q and k are pruned "
        f"(v, o, MLP dense). Metric {args.metric} (row groups); the optimiser reads the first {args.windows} "
        f"calibration windows of {args.seq_len} tokens, {args.steps} steps per layer (lr {args.lr}, "
        f"soft fraction {args.soft}, objective {args.objective}), one-shot (the dense model's inputs).",
        f"Attention error per layer = sum over heads and windows of ||P - P_dense||_F^2 / ||P_dense||_F^2 on "
        f"{args.valid_windows} *valid* windows (never seen by the optimiser), each layer fed the dense model's "
        f"inputs. Test perplexity on {spec.protocol.eval_windows} test windows; dense {results['dense']:.3f}.", "",
        "| q/k sparsity | masks | test ppl | median layer error | mean layer error | seconds (all) | optimiser s/layer |",
        "|---|---|---|---|---|---|---|",
    ]
    for s in args.sparsities:
        for name in ("metric", "optimised", "sparsegpt"):
            r = results.get((s, name))
            if r:
                lines.append(f"| {s:g} | {name} | {r['ppl']:.3f} | {statistics.median(r['errors']):.4g} | "
                             f"{statistics.fmean(r['errors']):.4g} | {r['seconds']:.0f} | "
                             f"{_cell(r.get('per_layer'))} |")
    lines += ["", "Per-layer reduction of the valid attention error, optimised vs metric "
              "(1 - optimised / metric; target: >= 30%):", "",
              "| q/k sparsity | median reduction | min | max | layers >= 30% | ppl metric -> optimised |",
              "|---|---|---|---|---|---|"]
    per_layer_rows = []
    for s in args.sparsities:
        m, o = results[(s, "metric")], results[(s, "optimised")]
        red = [1 - b / a if a > 0 else 0.0 for a, b in zip(m["errors"], o["errors"])]
        lines.append(f"| {s:g} | {statistics.median(red):.1%} | {min(red):.1%} | {max(red):.1%} | "
                     f"{sum(r >= 0.3 for r in red)}/{len(red)} | {m['ppl']:.3f} -> {o['ppl']:.3f} |")
        per_layer_rows.append((s, m["errors"], o["errors"]))
    verdicts = []
    for s in args.sparsities:
        m, o = results[(s, "metric")], results[(s, "optimised")]
        worst = min(1 - b / a if a > 0 else 0.0 for a, b in zip(m["errors"], o["errors"]))
        verdicts.append(f"at {s:g}: attention error >= 30% lower in every layer "
                        f"{'met' if worst >= 0.3 else 'missed'} (worst layer {worst:.1%}); perplexity below the "
                        f"metric's {'met' if o['ppl'] < m['ppl'] else 'missed'}"
                        + (f", gap to SparseGPT's {o['ppl'] - results[(s, 'sparsegpt')]['ppl']:+.3f}"
                           if (s, "sparsegpt") in results else ""))
    lines += ["", "Targets — " + "; ".join(verdicts) + "."]
    lines += ["", "Per layer (valid error, metric / optimised):", ""]
    for s, me, oe in per_layer_rows:
        lines.append(f"- {s:g}: " + ", ".join(f"{i}: {a:.3g}/{b:.3g}" for i, (a, b) in enumerate(zip(me, oe))))
    return "\n".join(lines) + "\n"


def _cell(seconds) -> str:
    return "–" if seconds is None else f"{seconds:.1f}"


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--corpus", default="austen")
    p.add_argument("--metric", default="wanda")
    p.add_argument("--sparsities", default="0.5,0.7")
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--calib-windows", type=int, default=16, help="protocol calibration (X statistics, SparseGPT)")
    p.add_argument("--windows", type=int, default=8, help="calibration windows the optimiser reads")
    p.add_argument("--valid-windows", type=int, default=8)
    p.add_argument("--eval-windows", type=int, default=32, help="test windows for perplexity")
    p.add_argument("--steps", type=int, default=100)
    p.add_argument("--lr", type=float, default=0.05)
    p.add_argument("--lrs", default="0.05", help="--tune: learning rates to try")
    p.add_argument("--soft", type=float, default=0.5)
    p.add_argument("--objective", default="frobenius")
    p.add_argument("--sparsegpt", action="store_true")
    p.add_argument("--tune", type=int, default=None, help="only this layer: cost and settings")
    p.add_argument("--out", type=Path, default=Path("results/ATTENTION.md"))
    args = p.parse_args(argv)
    args.sparsities = [float(s) for s in args.sparsities.split(",")]
    args.lrs = [float(s) for s in args.lrs.split(",")]
    protocol = Protocol(seq_len=args.seq_len, calib_windows=args.calib_windows, eval_windows=args.eval_windows)
    ev = Session(EvalSpec(model=args.model, corpus=args.corpus, split="test", protocol=protocol, mode="attention",
                            target={"windows": args.windows}), log=log)
    if args.tune is not None:
        return tune(ev, args)
    results = run(ev, args)
    command = "python experiments/attention_bench.py " + " ".join(argv if argv is not None else sys.argv[1:])
    atomic_write_text(args.out, write_report(ev, args, results, command.strip()))
    log(f"report written to {args.out}")


if __name__ == "__main__":
    main()
