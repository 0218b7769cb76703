"""Structured pruning (MDP) on the real smollm2-135m: test perplexity, parameters and measured
latency of the pruned models at several budgets, the MILP beside its baselines.

    python experiments/structured_bench.py                       # budgets 0.8, 0.6, 0.5 of dense prefill
    python experiments/structured_bench.py --budgets 0.7 --eval-windows 8   # quicker

For every budget (a fraction of the dense model's prefill latency at batch 1 x 256 tokens, as
the latency table measured on this machine predicts it) and every method: the plan's predicted
latency, the pruned model's *measured* prefill latency and decode tokens/s against the dense
model's (timed interleaved, median of repeats), parameters, and test perplexity. Writes
results/STRUCTURED.md and results/structured_bench.json. `--lock FILE` holds an exclusive flock
on FILE while timing (for machines where other jobs run beside it).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import statistics
import sys
from pathlib import Path

import torch

from prunerzero.core.protocol import Protocol
from prunerzero.fitness.session import Session
from prunerzero.fitness.spec import EvalSpec
from prunerzero.fitness.speed import compare, exclusive, machine, ratio
from prunerzero.pruning.structured.latency import cached
from prunerzero.pruning.structured.mode import latency_table

DISCOVERED = "results/metrics/smollm2-cpu-unstructured50-20261122-131852-1.py:metric"
# (label, candidate, target fields beyond the budget): the MILP with each importance, then the baselines
METHODS = [
    ("MILP, wanda", "wanda", {}),
    ("MILP, discovered metric", DISCOVERED, {}),
    ("MILP, Taylor", "taylor", {}),
    ("MILP, wanda, unscaled", "wanda", {"scale": "none"}),
    ("MILP, discovered metric + LSQ refit", DISCOVERED, {"recovery": "lsq"}),
    ("greedy, wanda", "wanda", {"solver": "greedy"}),
    ("uniform, wanda", "wanda", {"solver": "uniform"}),
    ("ShortGPT (blocks)", "shortgpt", {}),
]
BASELINES = ("greedy", "uniform", "ShortGPT")


THREADS = torch.get_num_threads()


def run_one(ev: Session, label, candidate, target, ids, lock, repeats, timed=True) -> dict:
    trial = ev.trial(candidate, target, keep=timed)
    report, ppl, params, prune_s, pruned = (trial.report, trial.perplexity.perplexity, trial.params,
                                            trial.prune_seconds, trial.pruned)
    x = report.extra
    if not timed:  # quality only
        row = {"method": label, "budget": target.latency, "perplexity": ppl, "params": params,
               "predicted_ratio": x["predicted_ratio"], "prune_seconds": prune_s}
        print(json.dumps(row), flush=True)
        return row
    with exclusive(lock):
        speed = compare({"dense": ev.model, "pruned": pruned}, ids, repeats=repeats, decode_tokens=8)
    row = {"method": label, "budget": target.latency, "perplexity": ppl, "params": params,
           "predicted_ratio": x["predicted_ratio"], "measured_ratio": 1 / ratio(speed["pruned"], speed["dense"]),
           "prefill_ms": speed["pruned"].prefill_ms, "dense_prefill_ms": speed["dense"].prefill_ms,
           "prefill_tokens_per_s": speed["pruned"].prefill_tokens_per_s,
           "decode_tokens_per_s": speed["pruned"].decode_tokens_per_s,
           "dense_decode_tokens_per_s": speed["dense"].decode_tokens_per_s,
           "solver_gap": x["solver_gap"], "solver_seconds": x["solver_seconds"], "prune_seconds": prune_s,
           **{k: x[k] for k in ("blocks_removed", "attention_removed", "mlp_removed", "heads_kept", "channels_kept")}}
    print(json.dumps(row), flush=True)
    return row


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--budgets", default="0.8,0.6,0.5")
    ap.add_argument("--calib-windows", type=int, default=16)
    ap.add_argument("--eval-windows", type=int, default=8)
    ap.add_argument("--seq-len", type=int, default=512)
    ap.add_argument("--width", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--methods", default="", help="comma-separated labels' prefixes to run (default: all)")
    ap.add_argument("--lock", default=None)
    ap.add_argument("--no-speed", action="store_true", help="perplexity only (no timing of the pruned models)")
    ap.add_argument("--out", default="results/STRUCTURED.md")
    args = ap.parse_args(argv)
    budgets = [float(b) for b in args.budgets.split(",")]
    described = machine() + (f"; timed with {THREADS} threads under an exclusive lock, the rest on 1" if args.lock else "")
    protocol = Protocol(seq_len=args.seq_len, calib_windows=args.calib_windows, eval_windows=args.eval_windows)
    spec = EvalSpec(split="test", protocol=protocol, mode="structured", target={"width": args.width})
    ev = Session(spec, log=print)
    dense_ppl = ev.measure().perplexity
    print(f"dense test perplexity {dense_ppl:.3f}", flush=True)
    target0 = ev.target
    measuring = cached(ev.model, target0.width, target0.batch, target0.seq_len) is None
    with exclusive(args.lock) if measuring else contextlib.nullcontext():  # only measuring needs the lock
        table = latency_table(ev.ctx, target0)
    if args.no_speed or args.lock:
        torch.set_num_threads(1)  # nothing else is timed outside the lock: leave the other core to others
    ids = torch.randint(0, ev.model.config.vocab_size, (target0.batch, target0.seq_len),
                        generator=torch.Generator().manual_seed(1))
    methods = [m for m in METHODS if not args.methods or any(m[0].startswith(p) for p in args.methods.split(","))]
    rows = []
    for budget in budgets:
        for label, cand, fields in methods:
            target = ev.mode.make_target({"latency": budget, "width": args.width, **fields})
            rows.append(run_one(ev, label, ev.candidate(cand), target, ids, args.lock, args.repeats,
                                not args.no_speed))
    doc = {"machine": described, "command": "python experiments/structured_bench.py " + " ".join(argv or sys.argv[1:]),
           "dense_perplexity": dense_ppl, "table": table.to_data(), "rows": rows}
    out = Path(args.out)
    out.with_name(out.stem.lower() + "_bench.json").write_text(json.dumps(doc, indent=1))
    if not args.no_speed:
        out.write_text(render(doc, protocol))
    print(f"wrote {out}")


def render(doc: dict, protocol: Protocol) -> str:
    rows = doc["rows"]
    lines = [
        "# Structured pruning (MDP) on smollm2-135m", "",
        f"Command: `{doc['command']}`  ",
        f"Machine: {doc['machine']}  ",
        f"Protocol: {protocol.describe()}; test split of austen. Dense test perplexity **{doc['dense_perplexity']:.3f}**.  ",
        f"Latency table measured on this machine in {doc['table']['seconds']:.0f} s (batch {doc['table']['batch']} x "
        f"{doc['table']['seq_len']} tokens prefill, one-token decode; channel groups of {doc['table']['width']}).", "",
        "Budget = the pruned model's prefill latency as a fraction of the dense model's, as the table predicts; "
        "*measured* = the pruned model timed against the dense one, interleaved, median of per-repeat ratios.", "",
        "| budget | method | test ppl | params (M) | predicted | measured | prefill ms | decode tok/s (dense) | "
        "blocks / attn / MLP removed | heads | channels |",
        "|---:|---|---:|---:|---:|---:|---:|---:|---|---:|---:|",
    ]
    for r in rows:
        lines.append(
            f"| {r['budget']:g} | {r['method']} | {r['perplexity']:.2f} | {r['params'] / 1e6:.1f} | "
            f"{r['predicted_ratio']:.3f} | {r['measured_ratio']:.3f} | {r['prefill_ms']:.0f} | "
            f"{r['decode_tokens_per_s']:.1f} ({r['dense_decode_tokens_per_s']:.1f}) | "
            f"{r['blocks_removed']} / {r['attention_removed']} / {r['mlp_removed']} | {r['heads_kept']} | "
            f"{r['channels_kept']} |")
    lines += ["", "## MILP against the best baseline at each budget", "",
              "The baselines have no recovery; the MILP is compared with and without it.", "",
              "| budget | best MILP, no recovery | ppl | best MILP with LSQ refit | ppl | best baseline | ppl | "
              "no recovery vs baseline | with refit vs baseline | prediction error (median, max) |",
              "|---:|---|---:|---|---:|---|---:|---:|---:|---:|"]
    for budget in sorted({r["budget"] for r in rows}, reverse=True):
        at = [r for r in rows if r["budget"] == budget]
        plain = [r for r in at if r["method"].startswith("MILP") and "LSQ" not in r["method"]]
        refit = [r for r in at if r["method"].startswith("MILP") and "LSQ" in r["method"]]
        base = [r for r in at if r["method"].startswith(BASELINES)]
        if not plain or not base:
            continue
        m, b = min(plain, key=lambda r: r["perplexity"]), min(base, key=lambda r: r["perplexity"])
        f = min(refit, key=lambda r: r["perplexity"]) if refit else None
        errors = [abs(r["predicted_ratio"] / r["measured_ratio"] - 1) for r in at]
        better = lambda r: f"{100 * (1 - r['perplexity'] / b['perplexity']):+.1f}%"  # noqa: E731
        lines.append(f"| {budget:g} | {m['method']} | {m['perplexity']:.2f} | {f['method'] if f else '-'} | "
                     f"{f['perplexity']:.2f} | {b['method']} | {b['perplexity']:.2f} | {better(m)} | "
                     f"{better(f) if f else '-'} | {100 * statistics.median(errors):.1f}%, {100 * max(errors):.1f}% |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
