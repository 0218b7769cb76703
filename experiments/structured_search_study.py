"""Which cheap fitness ranks importance metrics for *structured* pruning like the full protocol?
(issue 26, item 1, for the structured mode at 0.8x measured prefill latency, LSQ refit.)

    python experiments/structured_search_study.py          # writes results/STRUCTURED-SEARCH-study.json

Reference: each metric (and the hand-made methods) prunes through the MILP at 0.8x the dense
model's measured prefill latency, the following projections refit by least squares (the recovery
every side gets), test perplexity under structured_bench's protocol (calibration 16x512 train
tokens, 8x512 test tokens). The set: the built-in metrics and Taylor, the committed halls of fame,
random trees and metrics the committed unstructured campaigns evaluated (fitness_study's set),
keeping one metric per structured plan (metrics that keep the same units give the same number).
Cheap settings, on the valid split as a search sees it: perplexity or KL to the dense model on
fewer and shorter windows, calibration of 16 windows of the same length, the LSQ refit inside the
fitness or left out of it. Every measurement goes through the shared fitness cache: a re-run
measures only what is missing.
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
from prunerzero.fitness.cache import FitnessCache
from prunerzero.fitness.spec import EvalSpec
from prunerzero.pruning.candidates import Method

sys.path.insert(0, str(Path(__file__).parent))
from fitness_study import measure_items as measure, reference_metrics  # noqa: E402  (a sibling script)
from skip_search_study import spearman  # noqa: E402

REFERENCE = Protocol(seq_len=512, calib_windows=16, eval_windows=8)  # structured_bench's protocol
TARGET = {"latency": 0.8, "recovery": "lsq"}
# (name, fitness, eval windows, seq_len, recovery inside the fitness); calibration 16 x seq_len: at 512
# the reference's own calibration (the same plans: only the tokens measured differ), shorter ones
# calibrate on shorter windows too (other statistics, removal losses and Gram matrices: other plans)
SETTINGS = [("ppl 2x512 + lsq", "perplexity", 2, 512, "lsq"),
            ("ppl 1x512 + lsq", "perplexity", 1, 512, "lsq"),
            ("kl 1x512 + lsq", "kl", 1, 512, "lsq"),
            ("ppl 4x128 + lsq", "perplexity", 4, 128, "lsq"),
            ("ppl 4x256 + lsq", "perplexity", 4, 256, "lsq"),
            ("ppl 2x512, no refit", "perplexity", 2, 512, "none")]


def reference_set(n: int, seed: int, spec: EvalSpec, cache: FitnessCache, log) -> tuple[dict, dict, dict]:
    """(names, data, reference): `n` candidates that give distinct plans, measured on `spec`."""
    items = [(Method("taylor").key, Method("taylor").to_data())]
    names = {Method("taylor").key: "Taylor (method)"}
    for m in reference_metrics(n * 3, seed):  # more than needed: many metrics keep the same units
        items.append((m.key, m.formula))
        names[m.key] = m.name
    reference, distinct = {}, {}
    for start in range(0, len(items), 8):
        if len(distinct) >= n:
            break
        batch = items[start:start + 8]
        reference |= measure(batch, spec, REFERENCE.eval_windows, cache, log)
        for key, _ in batch:
            value, _, phenotype = reference[key]
            if value == value and value < 1e6 and phenotype not in distinct and len(distinct) < n:
                distinct[phenotype] = key
    keys = list(distinct.values())
    data = dict(items)
    return {k: names[k] for k in keys}, {k: data[k] for k in keys}, {k: reference[k] for k in keys}


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--reference", type=int, default=24, help="distinct plans in the reference set")
    ap.add_argument("--seed", type=int, default=7)
    ap.add_argument("--out", type=Path, default=Path("results/STRUCTURED-SEARCH-study.json"))
    args = ap.parse_args(argv)
    log = lambda msg: print(msg, flush=True)  # noqa: E731
    cache, load = FitnessCache(), [os.getloadavg()[0]]
    t0 = time.time()
    ref_spec = EvalSpec(split="test", protocol=REFERENCE, mode="structured", target=TARGET)
    names, data, reference = reference_set(args.reference, args.seed, ref_spec, cache, log)
    log(f"reference: {len(names)} distinct plans measured in {time.time() - t0:.0f}s")
    keys = list(names)
    best_half = sorted(keys, key=lambda k: reference[k][0])[: len(keys) // 2]
    rows, cheap_all = [], {}
    for name, fitness, windows, seq_len, recovery in SETTINGS:
        protocol = REFERENCE.with_(seq_len=seq_len, calib_windows=16, eval_windows=windows)
        spec = EvalSpec(split="valid", protocol=protocol, mode="structured", fitness=fitness,
                        target=TARGET | {"recovery": recovery})
        cheap = cheap_all[name] = measure(list(data.items()), spec, windows, cache, log)
        secs = statistics.median(cheap[k][1] for k in keys)
        rows.append({"setting": name, "spearman": spearman(reference, cheap, keys),
                     "spearman_best_half": spearman(reference, cheap, best_half), "seconds": secs})
        log(f"{name}: spearman {rows[-1]['spearman']:.3f} (best half {rows[-1]['spearman_best_half']:.3f}), "
            f"{secs:.2f}s")
    load.append(os.getloadavg()[0])
    out = {"command": "python experiments/structured_search_study.py"
           + (f" --reference {args.reference}" if args.reference != 24 else ""),
           "protocol": REFERENCE.describe(), "target": TARGET, "load_1min": load,
           "names": names, "candidates": data, "reference": reference, "cheap": cheap_all, "rows": rows}
    atomic_write_text(args.out, json.dumps(out, indent=1) + "\n")


if __name__ == "__main__":
    main()
