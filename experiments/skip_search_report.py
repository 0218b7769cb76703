"""results/SKIP-SEARCH.md from what the skip search's scripts wrote: the fitness study
(skip_search_study.py), the campaign's run directory and the bench (skip_search_bench.py).

    python experiments/skip_search_report.py --run results/runs/<skip_plan run>
"""

from __future__ import annotations

import argparse
import csv
import json
import platform
from pathlib import Path

from prunerzero.core.paths import atomic_write_text

RULE = 0.9


def study_section(study: dict) -> list[str]:
    ref = study["reference"]
    return study_lines(
        study, "removal sets",
        f"Reference: {len(ref)} distinct removal sets at ratio {study['ratio']:g} (15 of 60 sublayers), test "
        f"perplexity on the full protocol ({study['protocol']}, test split of austen).",
        ("reference set", "plan"), [(name, study["plans"][name], ref[name][0]) for name in ref],
        "Cheap settings on the valid split (perplexity or KL to the dense model; windows x tokens); "
        "Spearman against the reference over all sets and over the better half (where a search chooses); "
        "seconds: median per candidate (apply + forward + restore).")


def study_lines(study: dict, what: str, reference: str, columns: tuple[str, str], entries: list[tuple],
                settings: str) -> list[str]:
    """A fitness study's section: the command and load, the reference (name, candidate, test ppl
    per entry, best first), the cheap settings cheapest first, and the rule's choice."""
    rows = sorted(study["rows"], key=lambda r: r["seconds"])
    chosen = next((r for r in rows if r["spearman"] >= RULE), None)
    out = [f"## 1. A cheap fitness that ranks {what} like the full protocol", "",
           f"Command: `{study['command']}`; 1-minute load average {study['load_1min'][0]:.1f} before, "
           f"{study['load_1min'][1]:.1f} after (2 cores shared with other work: seconds are comparable "
           "within this run only).", "", reference, "",
           f"| {columns[0]} | {columns[1]} | test ppl |", "|---|---|---:|"]
    for name, candidate, value in sorted(entries, key=lambda e: e[2]):
        out.append(f"| {name} | `{candidate}` | {value:.2f} |")
    out += ["", settings, "", "| setting | Spearman | Spearman (best half) | s / candidate |", "|---|---:|---:|---:|"]
    for r in rows:
        out.append(f"| {r['setting']} | {r['spearman']:.3f} | {r['spearman_best_half']:.3f} | {r['seconds']:.2f} |")
    out += ["", f"Rule: the cheapest setting with Spearman >= {RULE}: " +
            (f"**{chosen['setting']}** (Spearman {chosen['spearman']:.3f})." if chosen else "none reaches it."), ""]
    return out


def campaign_section(run: Path, config_path: str = "experiments/smollm2-skip-plan.toml",
                     what: str = "removal sets", fitness: str = "valid ppl (4x128)") -> list[str]:
    with (run / "history.csv").open(newline="") as f:
        history = list(csv.DictReader(f))
    config = json.loads((run / "config.json").read_text())
    evaluations = sum(int(h["evaluations"]) for h in history)
    wall = sum(float(h["wall_seconds"]) for h in history)
    evals = sum(float(h["eval_seconds"]) for h in history)
    out = ["## 2. The campaign", "", f"Config: `{config_path}`, run `{run}`; "
           f"search {json.dumps(config['search'])}; problem {json.dumps(config.get('problem', {}))}.", "",
           f"{len(history) - 1} generations after the first; **{evaluations} evaluations** (distinct {what} "
           f"measured: neither in the fitness cache nor the same plan as one measured before) in **{wall / 60:.1f} min** "
           f"of generation wall time ({evals / max(evaluations, 1):.2f} s per evaluation, the driver's start — model "
           "load, the seeds' rankings or statistics — not included).", "",
           f"| generation | best {fitness} | median | evaluations | best |", "|---:|---:|---:|---:|---|"]
    for h in history:
        out.append(f"| {h['generation']} | {float(h['best_fitness']):.2f} | {float(h['median_fitness']):.2f} | "
                   f"{h['evaluations']} | `{h['best_formula']}` |")
    return out + [""]


def bench_section(bench: dict) -> list[str]:
    sel = bench["selection"]
    out = ["## 3. The winner against the hand-made rankings", "",
           f"Command (the last run; every run's under \"Commands as run\"): `{bench['command']}`.", "",
           f"Winner chosen on the valid split ({sel['protocol']}) among the hall of fame: "
           f"**{sel['winner']}** `{sel['plan']}`.", "", "| hall of fame | valid ppl 16x512 |", "|---|---:|"]
    for name, (value, _) in sorted(sel["valid"].items(), key=lambda kv: kv[1][0]):
        out.append(f"| {name} | {value:.2f} |")
    out += ["", "Test perplexity, <= 32x512 test tokens of the corpus; hand-made plans from that draw's 8x512 "
            "calibration (the winner is one explicit set, the same under every draw).", "",
            "| corpus:seed | searched (winner) | removal loss | ShortGPT | winner vs best hand-made | load |",
            "|---|---:|---:|---:|---:|---|"]
    for draw, got in bench["draws"].items():
        w, r, s = (got[k]["perplexity"] for k in ("searched (winner)", "removal loss", "ShortGPT"))
        best = min(r, s)
        load = "/".join(f"{x:.1f}" for x in got["load_1min"])
        out.append(f"| {draw} | {w:.2f} | {r:.2f} | {s:.2f} | {100 * (w / best - 1):+.1f}% | {load} |")
    return out + [""]


def main(argv=None) -> None:
    write_report(argv, "SKIP-SEARCH", "skip_search_report.py",
                 "Searching the skip mode's static removal set (smollm2-135m, ratio 0.25)",
                 study_section, campaign_section, bench_section)


def write_report(argv, stem: str, script: str, title: str, study_section, campaign_section, bench_section) -> None:
    """results/<stem>.md from results/<stem>-study.json, the run directory and results/<stem>-bench.json
    (each section where its input exists), with a notes file appended as written."""
    ap = argparse.ArgumentParser(description=f"results/{stem}.md from the search's study, run and bench")
    ap.add_argument("--run", type=Path, required=True)
    ap.add_argument("--study", type=Path, default=Path(f"results/{stem}-study.json"))
    ap.add_argument("--bench", type=Path, default=Path(f"results/{stem}-bench.json"))
    ap.add_argument("--notes", type=Path, default=None, help="a markdown file appended as written (the discussion)")
    ap.add_argument("--out", type=Path, default=Path(f"results/{stem}.md"))
    args = ap.parse_args(argv)
    lines = [f"# {title}", "",
             f"Machine: {platform.processor() or platform.machine()}, 2 cores, shared (load averages below). "
             f"Rendered by `python experiments/{script} --run {args.run}`.", ""]
    if args.study.is_file():
        lines += study_section(json.loads(args.study.read_text()))
    if (args.run / "history.csv").is_file():
        lines += campaign_section(args.run)
    if args.bench.is_file():
        lines += bench_section(json.loads(args.bench.read_text()))
    if args.notes:
        lines += [args.notes.read_text()]
    atomic_write_text(args.out, "\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
