"""The structured campaign's winner against every hand-made importance, each followed by the same
LSQ refit, on the test split; then on another corpus, other calibration draws and another model
(issue 26, items 2 and 5, for the structured mode; no re-search).

    python experiments/structured_search_bench.py --run results/runs/<structured run>
        # -> results/STRUCTURED-SEARCH-bench.json

The winner is chosen without the test split: the hall of fame's best `--top` metrics are measured
again on 8x512 valid tokens with 16x512 calibration tokens (the reference protocol of
structured_search_study.py, on the valid split) and the best there wins. Each draw (model, corpus,
calibration seed) then measures, on 8x512 test tokens of that corpus, the winner and the hand-made
importances (Wanda, magnitude, RIA, gradient, Pruner-Zero's published metric, Taylor, the
discovered unstructured metric) through the same MILP at 0.8x measured prefill latency with the same
LSQ refit, and ShortGPT's whole blocks (nothing to refit: a removed block has no following projection).
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from structured_search_study import REFERENCE, TARGET, measure  # noqa: E402

from prunerzero.core.paths import atomic_write_text  # noqa: E402
from prunerzero.fitness.cache import FitnessCache  # noqa: E402
from prunerzero.fitness.spec import EvalSpec  # noqa: E402
from prunerzero.primitives.metric import BUILTINS, Metric, resolve_metric  # noqa: E402
from prunerzero.pruning.candidates import Method  # noqa: E402

DISCOVERED = "results/metrics/smollm2-cpu-unstructured50-20261122-131852-1.py"  # structured_bench's metric
HANDMADE = {**{name: Metric.from_expression(text, name).formula for name in
               ("wanda", "magnitude", "ria", "gradient", "pruner-zero") for text in [BUILTINS[name]]},
            "Taylor": Method("taylor").to_data(), "ShortGPT (blocks)": Method("shortgpt").to_data(),
            "discovered unstructured metric": resolve_metric(DISCOVERED, allow_code=False).formula}


def hall_of_fame(run: Path, top: int) -> dict[str, str]:
    with (run / "hall_of_fame.csv").open(newline="") as f:
        rows = list(csv.DictReader(f))[:top]
    return {f"hall of fame #{r['rank']}": r["formula"] for r in rows}


def keyed(candidates: dict[str, str | dict]) -> list[tuple[str, str | dict]]:
    """(key, data) per candidate: a method's key, a metric's canonical key."""
    return [(f"method:{c['name']}" if isinstance(c, dict) else Metric.from_expression(c).key, c)
            for c in candidates.values()]


def select(run: Path, top: int, cache, log) -> tuple[str, dict]:
    candidates = hall_of_fame(run, top)
    spec = EvalSpec(split="valid", protocol=REFERENCE, mode="structured", target=TARGET)
    got = measure(keyed(candidates), spec, REFERENCE.eval_windows, cache, log)
    valid = {name: got[key][0] for name, (key, _) in zip(candidates, keyed(candidates))}
    best = min(valid, key=valid.get)
    return candidates[best], {"valid": valid, "winner": best, "formula": candidates[best]}


def compare(winner: str, model: str, corpus: str, seed: int, cache, log) -> dict:
    """Test perplexity of the winner and every hand-made importance on one draw."""
    spec = EvalSpec(model=model, corpus=corpus, split="test", protocol=REFERENCE.with_(seed=seed),
                    mode="structured", target=TARGET)
    candidates = {"searched (winner)": winner, **HANDMADE}
    got = measure(keyed(candidates), spec, REFERENCE.eval_windows, cache, log)
    return {name: {"perplexity": got[key][0], "seconds": got[key][1]}
            for name, (key, _) in zip(candidates, keyed(candidates))}


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--run", type=Path, required=True, help="the structured campaign's run directory")
    ap.add_argument("--top", type=int, default=5)
    ap.add_argument("--draws", default="smollm2-135m:austen:0,smollm2-135m:mobydick:0,smollm2-135m:austen:1,"
                                       "smollm2-135m:austen:2,gemma3-270m:austen:0",
                    help="model:corpus:calibration seed triples, in order")
    ap.add_argument("--out", type=Path, default=Path("results/STRUCTURED-SEARCH-bench.json"))
    args = ap.parse_args(argv)
    log = lambda msg: print(msg, flush=True)  # noqa: E731
    cache = FitnessCache()
    data = json.loads(args.out.read_text()) if args.out.is_file() else {}
    data |= {"run": str(args.run), "protocol": REFERENCE.describe(), "target": TARGET,
             "command": "python experiments/structured_search_bench.py " + " ".join(argv or sys.argv[1:])}
    t0 = time.time()
    winner, data["selection"] = select(args.run, args.top, cache, log)
    data.setdefault("draws", {})
    for draw in args.draws.split(","):
        model, corpus, seed = draw.split(":")
        load = os.getloadavg()[0]
        data["draws"][draw] = compare(winner, model, corpus, int(seed), cache, log)
        data["draws"][draw]["load_1min"] = [load, os.getloadavg()[0]]
        atomic_write_text(args.out, json.dumps(data, indent=1) + "\n")  # each draw kept as it completes
        log(f"{draw}: {json.dumps(data['draws'][draw])} ({time.time() - t0:.0f}s)")


if __name__ == "__main__":
    main()
