"""The skip_plan campaign's winner against the hand-made static rankings on the test split, then on
another corpus and other calibration draws (issue 26, items 2 and 5, for static skipping).

    python experiments/skip_search_bench.py --run results/runs/<skip_plan run>   # -> results/SKIP-SEARCH-bench.json

The winner is chosen without the test split: the hall of fame's best `--top` plans are measured
again on 16x512 valid tokens (more than the campaign's cheap fitness saw) and the best there wins.
Each (corpus, calibration seed) then measures, on <= 32x512 test tokens of that corpus, the winner
(an explicit removal set: it is the same set under every draw) and the hand-made rankings' plans
(ShortGPT and removal loss, recomputed on that draw's 8x512 calibration tokens).
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
from skip_search_study import REFERENCE, measure  # noqa: E402

from prunerzero.core.paths import atomic_write_text  # noqa: E402
from prunerzero.fitness.cache import FitnessCache  # noqa: E402
from prunerzero.fitness.evaluator import Evaluator  # noqa: E402
from prunerzero.fitness.spec import EvalSpec  # noqa: E402
from prunerzero.pruning.candidates import Method  # noqa: E402
from prunerzero.pruning.skip.mode import ranked  # noqa: E402
from prunerzero.pruning.skip.plan import SkipPlan  # noqa: E402

SELECT = REFERENCE.with_(calib_windows=1, eval_windows=16)  # the winner's selection: 16x512 valid tokens
BASELINES = (("ShortGPT", "shortgpt"), ("removal loss", "removal"))


def hall_of_fame(run: Path, top: int) -> dict[str, SkipPlan]:
    with (run / "hall_of_fame.csv").open(newline="") as f:
        rows = list(csv.DictReader(f))[:top]
    return {f"hall of fame #{r['rank']}": SkipPlan.from_key(r["key"]) for r in rows}


def select(plans: dict[str, SkipPlan], ratio: float, cache, log) -> tuple[str, dict]:
    spec = EvalSpec(split="valid", protocol=SELECT, mode="skip", target={"ratio": ratio})
    got = measure(plans, spec, SELECT.eval_windows, cache, log)
    return min(got, key=lambda n: got[n][0]), got


def compare(winner: SkipPlan, corpus: str, seed: int, ratio: float, cache, log) -> dict:
    """Test perplexity of the winner and the hand-made plans of this draw on this corpus."""
    spec = EvalSpec(corpus=corpus, split="test", protocol=REFERENCE.with_(seed=seed), mode="skip",
                    target={"ratio": ratio})
    ev = Evaluator(spec, log=log)
    plans = {"searched (winner)": winner}
    for name, method in BASELINES:
        plans[name] = SkipPlan(tuple(ranked(ev.ctx, Method(method), ev.target)[1]))
    got = measure(plans, spec, REFERENCE.eval_windows, cache, log)
    return {name: {"perplexity": got[name][0], "seconds": got[name][1], "plan": plans[name].key} for name in plans}


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--run", type=Path, required=True, help="the skip_plan campaign's run directory")
    ap.add_argument("--top", type=int, default=5)
    ap.add_argument("--ratio", type=float, default=0.25)
    ap.add_argument("--draws", default="austen:0,mobydick:0,austen:1,austen:2",
                    help="corpus:calibration seed pairs, in order (each one costs the removal losses of its draw)")
    ap.add_argument("--out", type=Path, default=Path("results/SKIP-SEARCH-bench.json"))
    args = ap.parse_args(argv)
    log = lambda msg: print(msg, flush=True)  # noqa: E731
    cache = FitnessCache()
    data = json.loads(args.out.read_text()) if args.out.is_file() else {}
    data |= {"run": str(args.run), "command": "python experiments/skip_search_bench.py " + " ".join(argv or sys.argv[1:])}
    t0 = time.time()
    best, selection = select(hall_of_fame(args.run, args.top), args.ratio, cache, log)
    winner = hall_of_fame(args.run, args.top)[best]
    data["selection"] = {"protocol": SELECT.describe(), "valid": selection, "winner": best, "plan": winner.key}
    data.setdefault("draws", {})
    for draw in args.draws.split(","):
        corpus, seed = draw.split(":")
        load = os.getloadavg()[0]
        data["draws"][draw] = compare(winner, corpus, int(seed), args.ratio, cache, log)
        data["draws"][draw]["load_1min"] = [load, os.getloadavg()[0]]
        atomic_write_text(args.out, json.dumps(data, indent=1) + "\n")  # each draw kept as it completes
        log(f"{draw}: {json.dumps(data['draws'][draw])} ({time.time() - t0:.0f}s)")


if __name__ == "__main__":
    main()
