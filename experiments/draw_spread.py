"""Do the discovered unstructured winners survive a new calibration draw? (issue 26, item 5)

Each winner against Wanda at 50% and 2:4, on the test split, under calibration draws that differ
by seed and corpus (and, with --models, on a second model): a gain that holds on one draw only is
not a discovery.

    python experiments/draw_spread.py                                   # → results/DRAWS.md, DRAWS.json
    python experiments/draw_spread.py --models gemma3-270m --draws austen:0,mobydick:0,austen:1  # the second model

Every draw is measured by `leaderboard_rows` (the CLI's own path): one session per draw (its
statistics collected once, cached), every metric at every target, one row each. Draws already in
the JSON are kept, so a re-run measures only the new ones.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

from prunerzero.core.paths import atomic_write_text
from prunerzero.core.protocol import Protocol
from prunerzero.core.tables import markdown_table
from prunerzero.fitness.speed import machine
from prunerzero.jobs import leaderboard_rows

METRICS = {  # label -> what `--metric` takes
    "wanda": "wanda",
    "cheap #1 G*X*colnorm(W^2)": "results/metrics/smollm2-cpu-cheap-20261207-050009-1.py",  # the 2:4 winner
    "joint #1's tree": "results/metrics/smollm2-cpu-joint-20261207-052403-1.py",  # the 50% winner's tree, uniform
}
TARGETS = {"50%": "unstructured", "2:4": "2:4"}  # label -> pattern (2:4: its sparsity is 1 - 2/4)
DRAWS = [("austen", 0), ("austen", 1), ("austen", 2), ("mobydick", 0)]  # (calibration corpus, seed)


def measure(model: str, corpus: str, seed: int, protocol: Protocol) -> dict:
    """{metric label: {target label: test perplexity}} for one calibration draw."""
    rows = leaderboard_rows(model, corpus, list(METRICS.values()), [0.5], list(TARGETS.values()),
                            protocol=protocol.with_(seed=seed), log=lambda m: print(f"  {m}", flush=True))
    labels = list(METRICS)
    per_metric = len(rows) // len(labels)  # rows come metric by metric, each at every target
    out: dict = {"dense": rows[0]["dense_perplexity"]}
    for i, r in enumerate(rows):
        target = next(t for t, p in TARGETS.items() if r["pattern"] == p)
        out.setdefault(labels[i // per_metric], {})[target] = r["perplexity"]
    return out


def render(doc: dict) -> str:
    rows, ratios = [], {}  # (model, metric, target) -> ratios over that model's draws
    for key, got in doc["draws"].items():
        model, corpus, seed = key.split("/")
        for t in TARGETS:
            row = {"model": model, "corpus": corpus, "seed": seed, "target": t, "dense": got["dense"]}
            for m in METRICS:
                row[m] = got[m][t]
                if m != "wanda":
                    ratio = got[m][t] / got["wanda"][t]
                    row[f"{m} / wanda"] = f"{100 * (ratio - 1):+.1f}%"
                    ratios.setdefault((model, m, t), []).append(ratio)
            rows.append(row)
    cols = [("model", "model", ""), ("calibration corpus", "corpus", ""), ("seed", "seed", ""),
            ("target", "target", ""), ("dense", "dense", ".2f"),
            *[(m, m, ".2f") for m in METRICS],
            *[(f"{m} vs Wanda", f"{m} / wanda", "") for m in METRICS if m != "wanda"]]
    summary = [{"model": model, "metric": m, "target": t, "draws": len(v), "mean": f"{100 * (statistics.mean(v) - 1):+.1f}%",
                "best": f"{100 * (min(v) - 1):+.1f}%", "worst": f"{100 * (max(v) - 1):+.1f}%",
                "better on every draw": "yes" if max(v) < 1 else "no"} for (model, m, t), v in ratios.items()]
    scols = [(c, c, "") for c in ("model", "metric", "target", "draws", "mean", "best", "worst", "better on every draw")]
    return "\n".join([
        "# Discovered winners under new calibration draws", "",
        "Commands: " + ", ".join(f"`{c}`" for c in doc["commands"]) + "  ",
        f"Machine: {doc['machine']}.  ",
        f"Protocol: {doc['protocol']} (the seed and the calibration corpus vary per draw); perplexity on the "
        "test split of the calibration corpus. Mask-only, one-shot statistics, per-row selection; no re-search.", "",
        "## Spread against Wanda (perplexity ratio - 1; negative = the winner is better)", "",
        *markdown_table(summary, scols), "",
        "## Every draw", "", *markdown_table(rows, cols), ""])


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default="smollm2-135m")
    parser.add_argument("--seq-len", type=int, default=512)
    parser.add_argument("--calib-windows", type=int, default=32)
    parser.add_argument("--eval-windows", type=int, default=16)
    parser.add_argument("--draws", default=",".join(f"{c}:{s}" for c, s in DRAWS),
                        help="calibration corpus:seed pairs, in order (a draw already in the JSON is kept)")
    parser.add_argument("--out", type=Path, default=Path("results/DRAWS.md"))
    args = parser.parse_args(argv)
    protocol = Protocol(seq_len=args.seq_len, calib_windows=args.calib_windows, eval_windows=args.eval_windows)
    path = args.out.with_suffix(".json")
    doc = json.loads(path.read_text()) if path.is_file() else {"draws": {}}
    if doc.get("protocol", protocol.describe()) != protocol.describe():
        sys.exit(f"{path} holds draws of another protocol ({doc['protocol']}): use another --out")
    command = " ".join(["python experiments/draw_spread.py", *(argv if argv is not None else sys.argv[1:])])
    doc |= {"commands": list(dict.fromkeys([*doc.get("commands", []), command])),  # every run's that added draws
            "machine": machine(), "protocol": protocol.describe()}
    for model in args.models.split(","):
        for corpus, seed in (d.split(":") for d in args.draws.split(",")):
            key = f"{model}/{corpus}/{seed}"
            if key in doc["draws"]:
                continue
            t0 = time.time()
            print(f"{key}: measuring", flush=True)
            doc["draws"][key] = measure(model, corpus, int(seed), protocol) | {"seconds": round(time.time() - t0, 1),
                                                                        "load": os.getloadavg()[0]}
            atomic_write_text(path, json.dumps(doc, indent=1))  # each draw kept as soon as it is measured
    text = render(doc)
    atomic_write_text(args.out, text)
    print(text)


if __name__ == "__main__":
    main()
