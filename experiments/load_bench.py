"""Pruned models that are faster from the first second: a whole process — start, load, then new
greedy tokens — for the dense model and saved pruned directories (structured, skip), timed from
outside, interleaved, with each process's peak resident memory.

    python experiments/load_bench.py                 # 5 interleaved repeats, 64 new tokens
    python experiments/load_bench.py --repeats 7 --new 64

Saved directories are made once (prunerzero's own `prune_and_save`) under the cache's `drafts/`
folder. Writes results/LOAD.md and results/LOAD.json.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

from prunerzero.core.paths import atomic_write_text, cache_dir
from prunerzero.core.protocol import Protocol
from prunerzero.core.tables import markdown_table
from prunerzero.fitness.speed import machine
from prunerzero.jobs import prune_and_save
from prunerzero.models.corpora import load_tokenized
from prunerzero.models.loading import load_model

CHILD = """
import json, sys, time
t0 = time.perf_counter()
import torch
import prunerzero.pruning.modes  # registers the loaders of the modes that reshape
from prunerzero.models.loading import load_model
lm = load_model(sys.argv[1], device="cpu")
t1 = time.perf_counter()
ids = torch.tensor([json.loads(sys.argv[2])])
n = int(sys.argv[3])
with torch.no_grad():
    lm.model.generate(ids, max_new_tokens=n, min_new_tokens=n, do_sample=False)
t2 = time.perf_counter()
peak = int(next(l.split()[1] for l in open("/proc/self/status") if l.startswith("VmHWM:"))) / 1024
print(json.dumps({"import_load_s": t1 - t0, "generate_s": t2 - t1, "peak_mb": peak}))
"""

SAVED = {  # label: (mode, candidate, target). Structured: its latency table priced at 32 tokens in groups of
    # 128 channels (measured in minutes on 2 cores; the default 64 x 256 table takes hours there)
    "structured 0.8x latency (wanda)": ("structured", "wanda", {"latency": 0.8, "width": 128, "seq_len": 32}),
    "skip 25% static (ShortGPT)": ("skip", "shortgpt", {"ratio": 0.25}),
}


def saved_dir(label: str) -> Path:
    mode, candidate, target = SAVED[label]
    out = cache_dir("drafts") / ("-".join(["load", mode, candidate, *(f"{k}{v}" for k, v in target.items())]))
    marker = {"structured": "prunerzero_structure.json", "skip": "prunerzero_skip.json"}[mode]
    if not (out / marker).is_file():
        prune_and_save("smollm2-135m", candidate, target, out, protocol=Protocol(seq_len=256, calib_windows=8,
                                                                                 eval_windows=2),
                       device="cpu", measure=False, mode=mode)
    return out


def run_once(model: str, prompt: list[int], new: int) -> dict:
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, "-c", CHILD, model, json.dumps(prompt), str(new)],
                          capture_output=True, text=True, env={**os.environ, "PYTHONWARNINGS": "ignore"})
    wall = time.perf_counter() - t0
    if proc.returncode:
        raise RuntimeError(f"{model} failed:\n{proc.stderr[-2000:]}")
    return {"wall_s": wall, **json.loads(proc.stdout.strip().splitlines()[-1])}


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--new", type=int, default=64)
    ap.add_argument("--prompt-len", type=int, default=128)
    ap.add_argument("--out", default="results/LOAD.md")
    args = ap.parse_args(argv)
    models = {"dense smollm2-135m": "smollm2-135m"} | {label: str(saved_dir(label)) for label in SAVED}
    tokenizer = load_model("smollm2-135m", device="cpu").tokenizer
    prompt = load_tokenized("austen", tokenizer).splits["test"][: args.prompt_len].tolist()
    load_before = os.getloadavg()[0]
    runs = {label: [] for label in models}
    for rep in range(args.repeats + 1):  # the first round warms the page cache: not counted
        for label, model in models.items():
            got = run_once(model, prompt, args.new)
            print(rep, label, json.dumps(got), flush=True)
            if rep:
                runs[label].append(got)
    doc = {"machine": machine(), "command": "python experiments/load_bench.py " + " ".join(argv or sys.argv[1:]),
           "repeats": args.repeats, "new": args.new, "prompt_len": args.prompt_len, "load_before": load_before,
           "load_after": os.getloadavg()[0], "runs": runs, "dirs": models}
    out = Path(args.out)
    atomic_write_text(out.with_suffix(".json"), json.dumps(doc, indent=1))
    atomic_write_text(out, render(doc))
    print(render(doc))


def render(doc: dict) -> str:
    dense = doc["runs"]["dense smollm2-135m"]
    lines = [
        "# Saved pruned models, end to end", "",
        f"Command: `{doc['command']}`  ",
        f"Machine: {doc['machine']}; 1-minute load average {doc['load_before']:.2f} before, "
        f"{doc['load_after']:.2f} after.", "",
        f"Each run is a fresh process: start Python, load the model (`load_model`), then {doc['new']} greedy new "
        f"tokens after a {doc['prompt_len']}-token austen test prompt; wall time measured from outside. Models "
        f"interleaved, {doc['repeats']} repeats after one uncounted round; medians; speed-up = the median of "
        "per-repeat ratios of the dense run's wall time to this one's. Peak = the process's VmHWM.", "",
    ]
    rows = []
    for label, runs in doc["runs"].items():
        med = {k: statistics.median(r[k] for r in runs) for k in runs[0]}
        rows.append({"model": label, **med,
                     "speedup": statistics.median(d["wall_s"] / r["wall_s"] for d, r in zip(dense, runs)),
                     "peak_vs_dense": med["peak_mb"] / statistics.median(r["peak_mb"] for r in dense)})
    lines += markdown_table(rows, [("model", "model", ""), ("wall s", "wall_s", ".2f"), ("speed-up", "speedup", ".3f"),
                                   ("load s (in process)", "import_load_s", ".2f"),
                                   ("generate s", "generate_s", ".2f"), ("peak MiB", "peak_mb", ".0f"),
                                   ("peak vs dense", "peak_vs_dense", ".3f")])
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
