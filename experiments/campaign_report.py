"""Report on a finished campaign: what it searched, what it cost, how fitness moved, and how its
exported metrics did on the test split against the hand-made ones.

    python experiments/campaign_report.py results/runs/<id> [--leaderboard results/leaderboard.csv]
        [--baselines magnitude,wanda,ria,gradient,pruner-zero]

Writes `<run>/REPORT.md` and `<run>/history.png`. The test table reads leaderboard rows: the
run's exported metrics (named `<id>-<rank>` by `prunerzero export`) and the baselines measured
under the same protocol (same `protocol_id`), model, corpus and split — so it only reports
numbers some command actually measured, and says which rows are missing. `--baselines` also
scores hand-made metrics on the search's own fitness (its valid split and token budget), through
the shared fitness cache: measured once, then read back.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import pandas as pd  # noqa: E402

from prunerzero.leaderboard import read  # noqa: E402

BASELINES = ["magnitude", "wanda", "ria", "gradient", "pruner-zero", "sparsegpt"]
WORST = 1e10  # the engine's fitness of a rejected, failed or penalised individual


def plot_history(history: pd.DataFrame, path: Path) -> None:
    fig, ax = plt.subplots(figsize=(7, 4))
    ax.plot(history["generation"], history["best_fitness"], marker="o", label="best (hall of fame)")
    ax.plot(history["generation"], history["median_fitness"], marker=".", label="median of measured")
    ax.set_yscale("log")
    ax.set_xlabel("generation")
    ax.set_ylabel("valid perplexity after pruning")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def cost_lines(history: pd.DataFrame) -> list[str]:
    total = lambda c: int(history[c].sum()) if c in history else 0  # noqa: E731
    wall = history["wall_seconds"].sum()
    generated = total("offspring") + total("rejected")
    forwards = total("evaluations")
    return [
        f"- wall time {wall / 60:.1f} min over {len(history)} generations ({wall / max(forwards, 1):.1f} s per forward evaluation)",
        f"- trees generated {generated}: rejected by OOS {total('rejected')}, fitness-cache hits {total('cache_hits')}, "
        f"same masks as a measured candidate {total('phenotype_hits')}, evaluated with a forward {forwards} "
        f"({1 - forwards / max(generated, 1):.0%} spared)",
        f"- clones penalised for selection {total('clones')}; failed evaluations {total('failed')}",
    ]


def test_table(run_id: str, config: dict, board: pd.DataFrame) -> list[str]:
    ev = config["eval"]
    ours = board[board["metric"].str.startswith(f"{run_id}-")]
    if ours.empty:
        return [f"No leaderboard rows for `{run_id}-*` yet: export the run and run `prunerzero leaderboard` on them."]
    lines = []
    for protocol_id, rows in ours.groupby("protocol_id"):
        same = board[(board["protocol_id"] == protocol_id) & (board["model"] == ev["model"])
                     & (board["corpus"] == ev["corpus"]) & (board["split"] == "test")]
        same = same[same["metric"].isin(BASELINES) | same["metric"].str.startswith(f"{run_id}-")]
        table = same.pivot_table(index=["metric", "formula"], columns="pattern", values="perplexity", aggfunc="first")
        first = same.iloc[0]
        lines += [f"Test split, protocol `{first['protocol']}` ({int(first['eval_tokens'])} test tokens, "
                  f"dense perplexity {first['dense_perplexity']:.2f}, sparsity {first['sparsity']:g}, group {first['group']}):", ""]
        patterns = [p for p in ("unstructured", "2:4", "4:8") if p in table.columns]
        lines += ["| metric | formula | " + " | ".join(patterns) + " | vs wanda (unstructured) |",
                  "|---|---|" + "---:|" * (len(patterns) + 1)]
        wanda = table.loc["wanda"]["unstructured"].iloc[0] if "wanda" in table.index.get_level_values(0) else None
        for (metric, formula), row in table.sort_values(patterns[0]).iterrows():
            cells = " | ".join(f"{row[p]:.2f}" if pd.notna(row[p]) else "–" for p in patterns)
            ratio = f"{row['unstructured'] / wanda - 1:+.1%}" if wanda and pd.notna(row.get("unstructured")) else ""
            lines.append(f"| {metric} | `{formula}` | {cells} | {ratio} |")
        missing = [b for b in BASELINES if b not in set(same["metric"])]
        if missing:
            lines.append(f"\nBaselines without a row under this protocol: {', '.join(missing)}.")
        lines.append("")
    return lines


def search_budget_baselines(config: dict, names: list[str]) -> list[tuple[str, str, float]]:
    """(name, formula, fitness) of each named metric under the campaign's own evaluation spec,
    through the campaign's own fitness path (cache first, then an evaluator for the rest)."""
    from prunerzero.evolve.campaign import evaluator_factory
    from prunerzero.evolve.config import from_dict
    from prunerzero.evolve.evaluation import FitnessMap
    from prunerzero.fitness.cache import FitnessCache
    from prunerzero.fitness.pool import SerialBackend
    from prunerzero.primitives.metric import resolve_metric

    cfg = from_dict(config)
    spec = cfg.eval_spec()
    metrics = {name: resolve_metric(name) for name in names}
    with SerialBackend(evaluator_factory(spec)) as backend:  # loads the model only if something is missing
        fitness = FitnessMap(backend, FitnessCache(cfg.cache or None, measure=spec.fitness), spec.cache_key(), cfg.protocol.eval_windows)
        measured = fitness([(m.key, m.formula) for m in metrics.values()])
    return [(name, m.formula, got.result.fitness) for (name, m), got in zip(metrics.items(), measured)]


def baseline_lines(rows: list[tuple[str, str, float]], hof: pd.DataFrame) -> list[str]:
    best = hof["fitness"].iloc[0]
    lines = ["## Hand-made metrics on the search's fitness", "",
             f"Same valid split, token budget and statistics as every candidate; the campaign's best: {best:.2f}.", "",
             "| metric | formula | valid perplexity | campaign's best vs it |", "|---|---|---:|---:|"]
    for name, formula, fitness in sorted(rows, key=lambda r: r[2]):
        lines.append(f"| {name} | `{formula}` | {fitness:.2f} | {best / fitness - 1:+.1%} |")
    return lines + [""]


def _target(config: dict) -> str:
    from prunerzero.evolve.config import from_dict

    return from_dict(config).eval_spec().describe_target()


def report(run_dir: Path, board: pd.DataFrame, baselines: list[str] = ()) -> str:
    from prunerzero.evolve.config import from_dict

    config = from_dict(json.loads((run_dir / "config.json").read_text())).to_dict()  # earlier versions' too
    history = pd.read_csv(run_dir / "history.csv")
    hof = pd.read_csv(run_dir / "hall_of_fame.csv")
    ev, p, s, b = config["eval"], config["protocol"], config["search"], config["backend"]
    plot_history(history, run_dir / "history.png")
    lines = [f"# Campaign {run_dir.name}", "",
             f"Search: {ev['model']} on {ev['corpus']} (valid split), {_target(config)}; "
             f"fitness = {ev['fitness']} on {p['eval_windows']}x{p['seq_len']} valid tokens, statistics from "
             f"{p['calib_windows']}x{p['seq_len']} train tokens ({p['stats_mode']}), seed {p['seed']}.",
             f"Population {s['population']}, {s['generations']} generations, operators `{s['operators']}`, "
             f"tournament {s['tournament']}, crossover {s['cx_prob']}, mutation {s['mut_prob']}, depth <= {s['max_depth']}, "
             f"size <= {s['max_size']}, elites {s['elites']}, search seed {s['seed']}; from scratch (no metric seeded). "
             f"Backend: {b['kind']}" + (f", {b['workers']} evaluators x {b['cpus_per_worker']:g} CPU" if b["kind"] == "ray" else "")
             + ".", "", "## Cost", "", *cost_lines(history), "",
             "## Fitness by generation", "", "![history](history.png)", "",
             "| generation | best | median of measured | best formula | forwards | cache hits | same masks |",
             "|---:|---:|---:|---|---:|---:|---:|"]
    for _, r in history.iterrows():
        lines.append(f"| {r['generation']} | {r['best_fitness']:.2f} | {r['median_fitness']:.4g} | `{r['best_formula']}` | "
                     f"{r['evaluations']} | {r['cache_hits']} | {r.get('phenotype_hits', 0)} |")
    lines += ["", "## Hall of fame (valid perplexity, the search's fitness)", "",
              "| rank | valid perplexity | formula | found in generation |", "|---:|---:|---|---:|"]
    for _, r in hof[hof["fitness"] < WORST].iterrows():
        lines.append(f"| {r['rank']} | {r['fitness']:.2f} | `{r['formula']}` | {r['generation']} |")
    lines.append("")
    if baselines:
        lines += baseline_lines(search_budget_baselines(config, list(baselines)), hof)
    lines += ["## On the test split", "", *test_table(run_dir.name, config, board)]
    return "\n".join(lines) + "\n"


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run_dir", type=Path)
    parser.add_argument("--leaderboard", type=Path, default=Path("results/leaderboard.csv"))
    parser.add_argument("--baselines", default="", help="comma-separated metrics to score on the search's fitness")
    args = parser.parse_args(argv)
    board = read(args.leaderboard) if args.leaderboard.is_file() else pd.DataFrame(columns=["metric"])
    text = report(args.run_dir, board, [b for b in args.baselines.split(",") if b])
    (args.run_dir / "REPORT.md").write_text(text)
    print(f"wrote {args.run_dir / 'REPORT.md'} and history.png")


if __name__ == "__main__":
    main()
