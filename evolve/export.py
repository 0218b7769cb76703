"""Export a campaign's best metrics as standalone modules (`results/metrics/<id>.py`), and the
best allocations of an allocation or joint campaign as candidate files (`<id>.json`).

Each module imports nothing but torch, defines `metric(W, G, X)` and `EXPRESSION`, and carries
the formula and its provenance in the docstring; `resolve_metric("<id>.py:metric")` loads it
anywhere a metric is accepted. The source is `Metric.source`, which copies the framework's own
operator code, so the exported scores equal the framework's exactly.

A candidate file is plain JSON — `{"kind": "allocation", "metric": ..., "sparsities": [...],
"provenance": {...}}` — that any mode's `candidate()` reads where a metric is accepted (a joint
campaign's tree is also exported as a module).
"""

from __future__ import annotations

import csv
import json
from pathlib import Path

from prunerzero.core.paths import atomic_write_text
from prunerzero.primitives.metric import Metric
from prunerzero.pruning.candidates import Allocation, key_sparsities

from .config import from_dict


def read_hall_of_fame(run_dir: Path) -> list[dict]:
    path = Path(run_dir) / "hall_of_fame.csv"
    if not path.is_file():
        raise FileNotFoundError(f"{run_dir} has no hall_of_fame.csv: has its first generation completed?")
    with path.open(newline="") as f:
        return list(csv.DictReader(f))


def provenance(run_dir: Path, row: dict) -> dict:
    config = from_dict(json.loads((Path(run_dir) / "config.json").read_text()))
    spec = config.eval_spec()
    return {
        "campaign": f"{config.name} (run {Path(run_dir).name})",
        "model": spec.model,
        "corpus": spec.corpus,
        "target": spec.describe_target(),
        "protocol": f"{config.protocol.describe()} (fingerprint {config.protocol.fingerprint()})",
        "fitness": f"{spec.fitness} {float(row['fitness']):.6g} on the {spec.split} split, {row['windows']} windows",
        "generation": row["generation"],
        "hall of fame rank": row["rank"],
    }


def export_run(run_dir: str | Path, top: int = 5, out_dir: str | Path = "results/metrics") -> list[Path]:
    """Write the `top` hall-of-fame metrics of a run as modules; return their paths."""
    if top < 1:
        raise ValueError(f"top must be >= 1, got {top}")
    run_dir, out_dir = Path(run_dir), Path(out_dir)
    config = from_dict(json.loads((run_dir / "config.json").read_text())) if (run_dir / "config.json").is_file() else None
    problem = config.search.problem if config is not None else "metric"
    if problem not in ("metric", "allocation", "joint"):
        raise ValueError(f"{run_dir} evolved {problem!r} candidates, not metrics or allocations: its hall of fame "
                         "(hall_of_fame.csv) is the result; there is nothing to export")
    paths = []
    for row in read_hall_of_fame(run_dir)[:top]:
        metric_id = f"{run_dir.name}-{row['rank']}"
        tree = row["formula"].split(" @ ")[0]  # a joint campaign's formula is "tree @ [sparsities]"
        if problem != "allocation":
            metric = Metric.from_expression(tree, name=metric_id)
            paths.append(out_dir / f"{metric_id}.py")
            atomic_write_text(paths[-1], metric.source(provenance(run_dir, row)))
        if problem != "metric":
            metric = config.problem["metric"] if problem == "allocation" else tree
            data = {**Allocation(metric, key_sparsities(row["key"])).to_data(), "provenance": provenance(run_dir, row)}
            paths.append(out_dir / f"{metric_id}.json")
            atomic_write_text(paths[-1], json.dumps(data, indent=1) + "\n")
    return paths
