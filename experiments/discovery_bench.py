"""Discovered metrics against the hand-made ones, in every unstructured setting issue 14 names:
mask-only at 50/60/70% and 2:4, uniform and OWL per-block allocation, inside the OBS
reconstruction against SparseGPT, and — with no re-search — on a second model and a second corpus.

    python experiments/discovery_bench.py                 # → results/DISCOVERY.md
    python experiments/discovery_bench.py --only transfer # one table

Every number is a row of results/leaderboard.csv under the committed leaderboard protocol
(calibration 32x512 train tokens, 32x512 test tokens, one-shot statistics): a row already there
for the same model, corpus, protocol, metric key and budget is read, the missing ones are
measured (`leaderboard_rows`) and appended, so a re-run measures only what is new.
"""

from __future__ import annotations

import argparse
import platform
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from prunerzero import leaderboard as lb
from prunerzero.core.paths import atomic_write_text
from prunerzero.core.protocol import Protocol
from prunerzero.jobs import leaderboard_rows
from prunerzero.pruning.modes import get_mode

PROTOCOL = Protocol(seq_len=512, calib_windows=32, eval_windows=32)
FOUND = "results/metrics/smollm2-cpu-unstructured50-20261122-131852-1.py"  # the campaign's best (its #1)
RUNNER_UP = "results/metrics/smollm2-cpu-unstructured50-20261122-131852-4.py"  # its #4 (transferred best before)
# this stop's campaigns from scratch (experiments/smollm2-cpu-{cheap,allocation,joint}.toml), exported
CHEAP = "results/metrics/smollm2-cpu-cheap-20261207-050009-1.py"  # the cheap-fitness campaign's #1 (40 generations)
ALLOCATED = "results/metrics/smollm2-cpu-allocation-20261207-051439-1.json"  # discovered #1 under its evolved per-block allocation
JOINT = "results/metrics/smollm2-cpu-joint-20261207-052403-1.json"  # the joint campaign's #1: tree and allocation
JOINT_TREE = "results/metrics/smollm2-cpu-joint-20261207-052403-1.py"  # its tree alone, uniform
NAMES = {FOUND: "discovered #1", RUNNER_UP: "discovered #4", CHEAP: "cheap-fitness #1",
         ALLOCATED: "discovered #1, evolved allocation", JOINT: "joint #1 (tree + allocation)",
         JOINT_TREE: "joint #1's tree, uniform"}


def unstructured(sparsity: float, pattern: str = "unstructured", **extra) -> dict:
    return {"sparsity": sparsity, "pattern": pattern, "group": "row", **extra}


@dataclass(frozen=True)
class Table:
    name: str
    title: str
    model: str
    corpus: str
    metrics: tuple[str, ...]
    columns: tuple[tuple[str, dict], ...]  # (column label, target)


MASK_TARGETS = (("50%", unstructured(0.5)), ("60%", unstructured(0.6)), ("70%", unstructured(0.7)),
                ("50% OWL", unstructured(0.5, allocation="owl")), ("60% OWL", unstructured(0.6, allocation="owl")),
                ("70% OWL", unstructured(0.7, allocation="owl")), ("2:4", unstructured(0.0, "2:4")))
TABLES = [
    Table("mask", "Mask-only metrics, uniform and OWL allocation (smollm2-135m, austen test split)",
          "smollm2-135m", "austen", ("wanda", "gradient", FOUND, RUNNER_UP, CHEAP, JOINT_TREE), MASK_TARGETS),
    Table("allocation", "Non-uniform sparsity at 50%: uniform, OWL, the evolved allocation for a fixed metric, and "
          "the metric and allocation searched jointly (smollm2-135m, austen)", "smollm2-135m", "austen",
          ("wanda", FOUND, ALLOCATED, JOINT, JOINT_TREE),
          (("50%", unstructured(0.5)), ("50% OWL", unstructured(0.5, allocation="owl")),
           ("50% + LSQ", unstructured(0.5, update="lsq")))),
    Table("reconstruction", "With reconstruction: a metric's masks with the kept weights refit (SparseGPT's OBS update, "
          "or the exact least-squares refit), against SparseGPT (smollm2-135m, austen)", "smollm2-135m", "austen",
          ("sparsegpt", "wanda", FOUND, CHEAP),
          (("50%", unstructured(0.5)), ("50% + OBS", unstructured(0.5, update="obs")),
           ("50% + LSQ", unstructured(0.5, update="lsq")),
           ("50% OWL + LSQ", unstructured(0.5, allocation="owl", update="lsq")),
           ("2:4", unstructured(0.0, "2:4")), ("2:4 + OBS", unstructured(0.0, "2:4", update="obs")),
           ("2:4 + LSQ", unstructured(0.0, "2:4", update="lsq")))),
    Table("transfer", "Transfer, no re-search: smollm2-135m on a second corpus (mobydick)", "smollm2-135m",
          "mobydick", ("wanda", "gradient", FOUND, RUNNER_UP, CHEAP, ALLOCATED, JOINT),
          (("50%", unstructured(0.5)), ("2:4", unstructured(0.0, "2:4")))),
    Table("transfer-model", "Transfer, no re-search: a second model (gemma3-270m, austen)", "gemma3-270m", "austen",
          ("wanda", "gradient", FOUND, RUNNER_UP, CHEAP, JOINT_TREE),
          (("50%", unstructured(0.5)), ("2:4", unstructured(0.0, "2:4")))),
]
# which cells are measured (skipped pairs cost minutes each)
SKIP = {("reconstruction", "wanda", c) for c in ("50% + OBS", "50% OWL + LSQ", "2:4 + OBS", "2:4 + LSQ")} | {
    ("mask", "gradient", c) for c in ("50% OWL", "60% OWL", "70% OWL")} | {
    ("mask", CHEAP, c) for c in ("50% OWL", "60% OWL", "70% OWL")} | {
    ("mask", JOINT_TREE, c) for c in ("60%", "70%", "50% OWL", "60% OWL", "70% OWL")} | {
    ("reconstruction", CHEAP, c) for c in ("50% + OBS", "50% + LSQ", "50% OWL + LSQ", "2:4 + OBS")} | {
    ("mask", RUNNER_UP, c) for c in ("60%", "70%", "60% OWL", "70% OWL")} | {("reconstruction", FOUND, "2:4 + OBS")} | {
    ("allocation", m, "50% + LSQ") for m in (JOINT, JOINT_TREE)} | {
    ("allocation", JOINT_TREE, "50% OWL")}


def measured(table: Table, metric: str, label: str) -> bool:
    if (table.name, metric, label) in SKIP:
        return False
    if metric == "sparsegpt":  # a method: its own update, uniform
        return "+" not in label and "OWL" not in label
    if metric.endswith(".json"):  # an allocation: its own sparsity per block, at the total it was evolved for
        return label in ("50%", "50% + LSQ")
    return True

def cell_key(mode, metric: str, target: dict) -> tuple[str, str]:
    """(metric key, budget) as the leaderboard writes them."""
    return mode.candidate(metric).key, mode.make_target(target).describe()


def measure_table(table: Table, board, log) -> dict[tuple[str, str], float]:
    """(metric, column) -> perplexity, measuring what the leaderboard lacks."""
    mode = get_mode("unstructured")
    here = board[(board["model"] == table.model) & (board["corpus"] == table.corpus)
                 & (board["protocol_id"] == PROTOCOL.fingerprint()) & (board["mode"] == "unstructured")]
    known = {(r.key, r.budget): r.perplexity for r in here.itertuples()}
    dense = here["dense_perplexity"].iloc[0] if len(here) else None
    out, missing = {}, {}
    for metric in table.metrics:
        gaps = []
        for label, target in table.columns:
            if not measured(table, metric, label):
                continue
            key = cell_key(mode, metric, target)
            if key in known:
                out[metric, label] = known[key]
            else:
                gaps.append(label)
        if gaps:
            missing.setdefault(tuple(gaps), []).append(metric)
    targets = dict(table.columns)
    for labels, metrics in missing.items():  # one model load and calibration per set of missing columns
        rows = leaderboard_rows(table.model, table.corpus, metrics, protocol=PROTOCOL,
                                targets=[targets[label] for label in labels], log=log, on_row=lambda r: lb.append([r]))
        for (metric, label), row in zip([(m, label) for m in metrics for label in labels], rows):
            out[metric, label] = row["perplexity"]
            dense = row["dense_perplexity"]
    out["dense", ""] = dense
    return out


def render(table: Table, cells: dict) -> list[str]:
    labels = [label for label, _ in table.columns]
    lines = [f"## {table.title}", "", f"Dense: {cells['dense', '']:.2f}." if cells["dense", ""] else "", "",
             "| metric | " + " | ".join(labels) + " |", "|---|" + "---:|" * len(labels)]
    wanda = {label: cells.get(("wanda", label)) for label in labels}
    for metric in table.metrics:
        row = []
        for label in labels:
            v = cells.get((metric, label))
            if v is None:
                row.append("-")
            elif metric != "wanda" and wanda[label]:
                row.append(f"{v:.2f} ({v / wanda[label] - 1:+.1%})")
            else:
                row.append(f"{v:.2f}")
        lines.append(f"| {NAMES.get(metric, metric)} | " + " | ".join(row) + " |")
    return lines + ["", "In brackets: against Wanda in the same column (negative is better).", ""]


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", default="", help="comma-separated table names: " + ", ".join(t.name for t in TABLES))
    parser.add_argument("--out", type=Path, default=Path("results/DISCOVERY.md"))
    args = parser.parse_args(argv)
    wanted = set(filter(None, args.only.split(","))) or {t.name for t in TABLES}
    if unknown := wanted - {t.name for t in TABLES}:
        parser.error(f"--only: unknown tables {', '.join(sorted(unknown))}")
    log = lambda msg: print(msg, flush=True)  # noqa: E731
    lines = ["# Discovered metrics against the hand-made ones", "",
             f"Written by `python experiments/discovery_bench.py` on {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}; "
             f"machine {platform.machine()}, {torch.get_num_threads()} threads, torch {torch.__version__}.", "",
             f"Protocol: {PROTOCOL.describe()}, test split; 50/60/70% per output row. Discovered #1 and #4: "
             f"`{FOUND}` and `{RUNNER_UP}` (the 48x20 CPU campaign, fitted at 50% on 16x256 valid tokens). "
             f"Cheap-fitness #1: `{CHEAP}` (a campaign from scratch with the chosen fitness, 4x128 valid tokens, 48 x 40 "
             f"generations in 24 min; experiments/smollm2-cpu-cheap.toml, extended with `--generations 40`). Evolved allocation: `{ALLOCATED}` (discovered #1 with one sparsity "
             f"per block, a GA at 50% on 8x128 valid tokens, 16 x 30 generations; experiments/smollm2-cpu-allocation.toml, "
             f"extended with `--generations 30`). Joint #1: "
             f"`{JOINT}` (tree and allocation searched together from scratch; experiments/smollm2-cpu-joint.toml). "
             "An allocation rounds each row's pruned count down, so it prunes a little under the total (the evolved "
             "allocation 49.95%: results/leaderboard.csv, achieved_sparsity). "
             "OWL: per-block sparsity by outlier ratio at the same total. OBS: the metric's masks, the kept weights "
             "updated by SparseGPT's blockwise optimal-brain-surgeon step on the pruned prefix's inputs; LSQ: the kept "
             "weights of each row refit jointly by damped least squares on those inputs (`update=lsq`). A dash: not "
             "measured (each reconstruction row costs minutes here).", ""]
    for table in TABLES:
        if table.name in wanted:
            lines += render(table, measure_table(table, lb.read(), log))
    atomic_write_text(args.out, "\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
