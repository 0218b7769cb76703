"""Token-aware skipping (SkipGPT) on the real smollm2-135m: test perplexity against the share of
modules skipped, the static baselines at the same budget, and the measured speed and FLOPs of
skipping done by gather/scatter against SkipGPT's multiply-by-zero and the dense model.

    python experiments/skip_bench.py                              # trains (or loads) routers at 0.25
    python experiments/skip_bench.py --ratios 0.25 --repeats 3    # quicker
    python experiments/skip_bench.py --budget flops --out results/SKIP-flops.md   # the ratio counts FLOPs
    python experiments/skip_bench.py --speed-only     # time again (a quiet machine), same routers; re-render

Routers are trained once at `--train-ratio` (cached; 300 steps of 2 x 256 train tokens by
default) and the curve sets their keep threshold on calibration tokens for every ratio; the
static baselines remove that share of sublayers for every token: ShortGPT's influence per
sublayer, the measured removal loss, and a metric's weight scores reduced per sublayer (the
committed discovered metric and Wanda). Speed: dense, gather and multiply timed interleaved
(median of per-repeat ratios) at one batch and prompt length, prefill with the full logits (a
perplexity pass) and with the last position's only (generation's prefill), and one-token decode
with the KV cache. FLOPs counted by torch's FlopCounterMode on the same prefill. Writes
results/SKIP.md, results/SKIP.json and results/SKIP-curve.png (named after --out).
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import json
import os
import sys
from pathlib import Path

import torch
from torch.utils.flop_counter import FlopCounterMode

from prunerzero.core.protocol import Protocol
from prunerzero.fitness.session import Session
from prunerzero.fitness.spec import EvalSpec
from prunerzero.fitness.speed import compare, machine, ratio
from prunerzero.pruning.skip.skipping import skip_counts

DISCOVERED = "results/metrics/smollm2-cpu-unstructured50-20261122-131852-1.py:metric"
STATIC = [("ShortGPT (sublayers)", "shortgpt"), ("removal loss", "removal"),
          ("discovered metric", DISCOVERED), ("wanda", "wanda")]


@contextlib.contextmanager
def skips_counted(session, report):
    """The share skipped on the tokens measured while inside (the routers' counters)."""
    seen: dict = {}
    skip_counts(session.model, reset=True)
    yield seen
    seen.update(skip_counts(session.model))


def measure(ev: Session, candidate, target) -> dict:
    """Prune, measure test perplexity and the share skipped on the test tokens, restore."""
    trial = ev.trial(candidate, target, observe=skips_counted)
    report, ppl, seconds, test = trial.report, trial.perplexity.perplexity, trial.prune_seconds, trial.observed
    x = report.extra
    static = "removed" in x
    row = {"ratio": target.ratio, "modules": target.modules, "perplexity": ppl, "prune_seconds": seconds,
           "skip_ratio": x["skip_ratio"] if static else test["skip_ratio"],
           "flops_skip_ratio": x["flops_skip_ratio"] if static else test["flops_skip_ratio"],
           "attention_skip_ratio": x["attention_skip_ratio"] if static else test.get("attention_skip_ratio", 0.0),
           "mlp_skip_ratio": x["mlp_skip_ratio"] if static else test.get("mlp_skip_ratio", 0.0)}
    return row | ({"removed": x["removed"]} if static else {"calibration_skip_ratio": x["skip_ratio"],
                                                           "threshold": x["threshold"]})


def flops(model, ids) -> int:
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        model(ids, use_cache=False, logits_to_keep=1)
    return counter.get_total_flops()


def speed(ev: Session, routers: str, fields: dict, ids, repeats: int) -> dict:
    """Dense, gather and multiply (the same routers and threshold), interleaved."""
    models, shares, counted = {"dense": copy.deepcopy(ev.model)}, {}, {"dense": flops(ev.model, ids)}
    for execution in ("gather", "multiply"):
        ev.prune("router", ev.mode.make_target(fields | {"routers": routers, "execution": execution}))
        skip_counts(ev.model, reset=True)
        counted[execution] = flops(ev.model, ids)
        shares[execution] = skip_counts(ev.model)
        models[execution] = copy.deepcopy(ev.model)
        ev.restore()
    out = {"flops": counted, "skip_on_timed_ids": shares["gather"], "batch": ids.shape[0], "seq_len": ids.shape[1],
           "load_before": os.getloadavg()[0]}
    for label, keep in (("full_logits", 0), ("last_logits", 1)):
        got = compare(models, ids, repeats=repeats, decode_tokens=8 if keep else 0, logits_to_keep=keep)
        out[label] = {name: {"prefill_ms": s.prefill_ms, "prefill_tokens_per_s": s.prefill_tokens_per_s,
                             "decode_tokens_per_s": s.decode_tokens_per_s,
                             "speedup": ratio(s, got["dense"])} for name, s in got.items()}
        if keep:
            for name, s in got.items():
                out[label][name]["decode_speedup"] = ratio(s, got["dense"], "decode")
    out["load_after"] = os.getloadavg()[0]  # the 1-minute load: above ~2 on 2 cores, other work shared the CPU
    return out


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--ratios", default="0.1,0.2,0.25,0.3,0.4")
    ap.add_argument("--train-ratio", type=float, default=0.25)
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--router-init", default="removal")
    ap.add_argument("--budget", default="modules", help="what the ratio counts: modules (SkipGPT) or flops")
    ap.add_argument("--routers", default="", help="a router folder trained before (default: train or load from the cache)")
    ap.add_argument("--calib-windows", type=int, default=8)
    ap.add_argument("--eval-windows", type=int, default=32)
    ap.add_argument("--seq-len", type=int, default=512)
    ap.add_argument("--speed-batch", type=int, default=1)
    ap.add_argument("--speed-seq-len", type=int, default=512)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--out", default="results/SKIP.md", help="the report; its .json and -curve.png beside it")
    ap.add_argument("--speed-only", action="store_true", help="only time again with the report's routers; re-render")
    args = ap.parse_args(argv)
    ratios = [float(r) for r in args.ratios.split(",")]
    protocol = Protocol(seq_len=args.seq_len, calib_windows=args.calib_windows, eval_windows=args.eval_windows)
    ev = Session(EvalSpec(split="test", protocol=protocol, mode="skip"), log=print)
    out = Path(args.out)
    if args.speed_only:
        doc = json.loads(out.with_suffix(".json").read_text())
        ids = ev.windows[:args.speed_batch, :args.speed_seq_len]
        doc["speed"] = speed(ev, doc["routers"], {"budget": doc["budget"], "ratio": doc["train_ratio"]}, ids, args.repeats)
        doc["speed_command"] = "python experiments/skip_bench.py " + " ".join(argv or sys.argv[1:])
        doc["speed_machine"] = machine()
        return write(doc, out)
    dense = ev.measure().perplexity
    print(f"dense test perplexity {dense:.3f}", flush=True)
    budget = {"budget": args.budget}
    trained = ev.prune("router", ev.mode.make_target(budget | {"ratio": args.train_ratio, "steps": args.steps,
                                                               "router_init": args.router_init, "routers": args.routers}))
    routers, train_s = trained.extra["routers_dir"], trained.extra["router_train_seconds"]
    ev.restore()
    rows = []
    for r in ratios:
        for label, cand in [("routers", "router")] + STATIC:
            fields = budget | {"ratio": r} | ({"routers": routers} if cand == "router" else {})
            row = {"method": label} | measure(ev, ev.candidate(cand), ev.mode.make_target(fields))
            print(json.dumps(row), flush=True)
            rows.append(row)
    multiply = measure(ev, ev.candidate("router"), ev.mode.make_target(
        budget | {"ratio": args.train_ratio, "routers": routers, "execution": "multiply"}))
    ids = ev.windows[:args.speed_batch, :args.speed_seq_len]  # real text: the routers' decisions as in use
    timing = speed(ev, routers, budget | {"ratio": args.train_ratio}, ids, args.repeats)
    doc = {"machine": machine(), "command": "python experiments/skip_bench.py " + " ".join(argv or sys.argv[1:]),
           "protocol": protocol.describe(), "dense_perplexity": dense, "routers": routers,
           "router_train_seconds": train_s, "router_untimed_steps": trained.extra.get("router_untimed_steps", 0),
           "train_ratio": args.train_ratio, "budget": args.budget,
           "router_best": trained.extra.get("router_best", {}), "rows": rows,
           "multiply": {"method": "routers, multiply"} | multiply, "speed": timing}
    write(doc, out)


def write(doc: dict, out: Path) -> None:
    out.with_suffix(".json").write_text(json.dumps(doc, indent=1))
    plot(doc, out.with_name(out.stem + "-curve.png"))
    out.write_text(render(doc, out.stem + "-curve.png"))
    print(f"wrote {out}")


def plot(doc: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (a, b) = plt.subplots(1, 2, figsize=(11, 4))
    for method in dict.fromkeys(r["method"] for r in doc["rows"]):
        at = [r for r in doc["rows"] if r["method"] == method]
        a.plot([r["ratio"] for r in at], [r["perplexity"] for r in at], marker="o", label=method)
    a.axhline(doc["dense_perplexity"], color="grey", ls=":", label="dense")
    a.set(xlabel="share of modules skipped", ylabel="test perplexity (log)", yscale="log",
          title="smollm2-135m, austen test")
    a.legend(fontsize=8)
    at = [r for r in doc["rows"] if r["method"] == "routers"]
    xs = [r["ratio"] for r in at]
    b.bar([x - 0.006 for x in xs], [r["attention_skip_ratio"] for r in at], width=0.012, label="attention")
    b.bar([x + 0.006 for x in xs], [r["mlp_skip_ratio"] for r in at], width=0.012, label="MLP")
    b.set(xlabel="share of modules skipped", ylabel="share skipped on test tokens", title="routers: attention / MLP")
    b.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def resumed_note(doc: dict) -> str:
    """Routers resumed from a checkpoint that kept no time (an earlier version's): say so."""
    at = doc.get("router_untimed_steps", 0)
    return f" (resumed at step {at} from a checkpoint without its time: the steps after it only)" if at else ""


def render(doc: dict, curve: str) -> str:
    rows, sp = doc["rows"], doc["speed"]
    lines = [
        "# Token-aware skipping (SkipGPT) on smollm2-135m", "",
        f"Command: `{doc['command']}`  ",
        f"Machine: {doc['machine']}  ",
        f"Protocol: {doc['protocol']}; test split of austen. Dense test perplexity **{doc['dense_perplexity']:.3f}**.  ",
        f"Routers: trained at ratio {doc['train_ratio']:g} ({doc['budget']} budget) in "
        f"{doc['router_train_seconds'] / 60:.1f} min{resumed_note(doc)} (`{doc['routers']}`; kept: step {doc['router_best'].get('step', '?')}, "
        f"the best on held-out train windows); for every ratio their keep threshold is set on calibration tokens.", "",
        "Skip ratio = share of (sublayer, token) pairs skipped on the test tokens (routers) or share of sublayers "
        f"removed for every token (static baselines); the budget counts {doc['budget']}. FLOPs skipped = share of "
        "the routed sublayers' multiply-adds not computed (an attention's q and o projections, an MLP's three matrices).", "",
        "| ratio | method | test ppl | skipped | FLOPs skipped | attention | MLP |", "|---:|---|---:|---:|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| {r['ratio']:g} | {r['method']} | {r['perplexity']:.2f} | {r['skip_ratio']:.3f} | "
                     f"{r['flops_skip_ratio']:.3f} | {r['attention_skip_ratio']:.3f} | {r['mlp_skip_ratio']:.3f} |")
    lines += ["", f"![perplexity against skip ratio]({curve})", "",
              "## Routers against the best static baseline", "",
              "| ratio | routers ppl | best static | ppl | routers vs static |", "|---:|---:|---|---:|---:|"]
    for r0 in sorted({r["ratio"] for r in rows}):
        at = [r for r in rows if r["ratio"] == r0]
        mine = next(r for r in at if r["method"] == "routers")
        best = min((r for r in at if r["method"] != "routers"), key=lambda r: r["perplexity"])
        lines.append(f"| {r0:g} | {mine['perplexity']:.2f} | {best['method']} | {best['perplexity']:.2f} | "
                     f"{100 * (1 - mine['perplexity'] / best['perplexity']):+.1f}% |")
    m = doc["multiply"]
    g = next(r for r in rows if r["method"] == "routers" and r["ratio"] == doc["train_ratio"])
    lines += ["", f"## Gather/scatter against multiply-by-zero (ratio {doc['train_ratio']:g}, the same routers)", "",
              f"Test perplexity: gather **{g['perplexity']:.4f}**, multiply **{m['perplexity']:.4f}** "
              f"(skipped on test tokens: {g['skip_ratio']:.4f} and {m['skip_ratio']:.4f}).", "",
              (f"Timed again with `{doc['speed_command']}`. " if "speed_command" in doc else "") +
              f"Timed on {sp['batch']} x {sp['seq_len']} test tokens (skipped there: "
              f"{sp['skip_on_timed_ids']['skip_ratio']:.3f}); speedup = dense time / its time, median of per-repeat ratios, "
              f"the three models interleaved; 1-minute load average {sp.get('load_before', 0):.1f} before, "
              f"{sp.get('load_after', 0):.1f} after.", "",
              "| model | GFLOPs (prefill) | prefill ms, full logits | speedup | prefill ms, last logits | speedup | "
              "prefill tok/s | decode tok/s | decode speedup |", "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for name in ("dense", "gather", "multiply"):
        f, last = sp["full_logits"][name], sp["last_logits"][name]
        lines.append(f"| {name} | {sp['flops'][name] / 1e9:.1f} | {f['prefill_ms']:.0f} | {f['speedup']:.3f} | "
                     f"{last['prefill_ms']:.0f} | {last['speedup']:.3f} | {last['prefill_tokens_per_s']:.0f} | "
                     f"{last['decode_tokens_per_s']:.1f} | {last['decode_speedup']:.3f} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
