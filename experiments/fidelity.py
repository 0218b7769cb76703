"""Does successive halving pay? One campaign run twice — every candidate on the full evaluation
budget, then with successive halving on the evaluation windows — each with a fresh fitness cache,
then both winners re-measured on the full budget of the valid split.

    python experiments/fidelity.py experiments/smoke.toml --rungs 2 --eta 2

Writes results/FIDELITY.md: wall time, evaluations and windows spent, and the winners.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import pandas as pd

from prunerzero.evolve.campaign import evaluator_factory, run_campaign
from prunerzero.evolve.config import from_dict, load_config
from prunerzero.core.paths import atomic_write_text
from prunerzero.primitives.metric import Metric


def run(config, rungs: int, eta: int, root: Path) -> dict:
    data = config.to_dict()
    data |= {"name": f"{config.name}-rungs{rungs}", "runs_dir": str(root / "runs"),
             "cache": str(root / f"fitness-rungs{rungs}.sqlite"), "fidelity": {"rungs": rungs, "eta": eta}}
    t0 = time.perf_counter()
    run_dir = run_campaign(from_dict(data))
    wall = time.perf_counter() - t0
    history = pd.read_csv(run_dir / "history.csv")
    hof = pd.read_csv(run_dir / "hall_of_fame.csv")
    return {"rungs": rungs, "wall_s": wall, "evaluations": int(history["evaluations"].sum()),
            "windows": int(history["eval_windows"].sum()), "winner": hof["formula"].iloc[0],
            "winner_fitness": float(hof["fitness"].iloc[0])}


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("config", type=Path)
    parser.add_argument("--rungs", type=int, default=2)
    parser.add_argument("--eta", type=int, default=2)
    parser.add_argument("--out", type=Path, default=Path("results/FIDELITY.md"))
    args = parser.parse_args(argv)
    config = load_config(args.config)
    with tempfile.TemporaryDirectory() as tmp:
        rows = [run(config, 1, args.eta, Path(tmp)), run(config, args.rungs, args.eta, Path(tmp))]
    evaluator = evaluator_factory(config.eval_spec())()  # re-measure both winners on the full budget
    for r in rows:
        r["winner_full_budget"] = evaluator.evaluate(Metric.from_expression(r["winner"])).perplexity
    full, halving = rows
    lines = [
        "# Successive halving against full-budget evaluation", "",
        f"`python experiments/fidelity.py {args.config} --rungs {args.rungs} --eta {args.eta}` "
        f"({time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}); each campaign with a fresh fitness cache, "
        f"population {config.search.population}, {config.search.generations} generations, seed {config.search.seed}, "
        f"backend {config.backend.kind}. Winners re-measured on the full budget of the valid split.", "",
        "| rungs | wall s | evaluations | windows evaluated | winner | winner perplexity (full budget) |",
        "|---:|---:|---:|---:|---|---:|",
    ]
    lines += [f"| {r['rungs']} | {r['wall_s']:.0f} | {r['evaluations']} | {r['windows']} | `{r['winner']}` | "
              f"{r['winner_full_budget']:.3f} |" for r in rows]
    same = Metric.from_expression(full["winner"]).key == Metric.from_expression(halving["winner"]).key
    lines += ["", f"Time saved by successive halving: **{1 - halving['wall_s'] / full['wall_s']:.0%}** of the wall time, "
              f"{1 - halving['windows'] / max(full['windows'], 1):.0%} of the evaluation windows. "
              f"Winner {'unchanged' if same else 'changed'}."]
    text = "\n".join(lines) + "\n"
    atomic_write_text(args.out, text)
    print(text)


if __name__ == "__main__":
    main()
