"""Export a campaign's best metrics as standalone modules (`results/metrics/<id>.py`), and the
best allocations of an allocation or joint campaign and the best removal sets of a skip_plan
campaign as candidate files (`<id>.json`).

Each module imports nothing but torch, defines `metric(W, G, X)` and `EXPRESSION`, and carries
the formula and its provenance in the docstring; `resolve_metric("<id>.py:metric")` loads it
anywhere a metric is accepted. The source is `Metric.source`, which copies the framework's own
operator code, so the exported scores equal the framework's exactly.

A candidate file is plain JSON — `{"kind": "allocation", "metric": ..., "sparsities": [...],
"provenance": {...}}` — that any mode's `candidate()` reads where a metric is accepted (a joint
campaign's tree is also exported as a module).

A run directory may come from anyone, so its values are data until checked: rank, generation and
windows are integers, fitness a finite number, the formula an expression the safe parser accepts,
the directory's name a plain name; every file lands directly in `out_dir`, and text that reaches
the module's docstring is escaped there (`Metric.source`). Otherwise the export names the row and
field and writes nothing.
"""

from __future__ import annotations

import csv
import json
import math
import os
import re
from pathlib import Path

from prunerzero.core.paths import atomic_write_text
from prunerzero.primitives.metric import Metric
from prunerzero.pruning.candidates import Allocation, key_sparsities
from prunerzero.pruning.skip.plan import SkipPlan

from .config import from_dict


class ExportError(ValueError):
    """A run directory whose contents cannot be exported as they are; the message names the field."""


RUN_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")  # a run directory name that may become a file name
_COUNT = re.compile(r"[0-9]{1,9}")  # a rank, generation or window count: digits only (no sign, no path)


def read_hall_of_fame(run_dir: Path) -> list[dict]:
    path = Path(run_dir) / "hall_of_fame.csv"
    if not path.is_file():
        raise FileNotFoundError(f"{run_dir} has no hall_of_fame.csv: has its first generation completed?")
    with path.open(newline="") as f:
        return list(csv.DictReader(f))


def _count(row: dict, field: str, where: str, least: int) -> int:
    value = row.get(field)
    if not isinstance(value, str) or not _COUNT.fullmatch(value) or int(value) < least:
        raise ExportError(f"{where}: {field} {value!r:.80} is not an integer >= {least}")
    return int(value)


def _checked_row(row: dict, where: str) -> dict:
    """The hall-of-fame fields an export uses, as numbers where numbers belong: a shared run
    directory is data, and its values reach file names and generated source."""
    try:
        fitness = float(row.get("fitness"))
    except (TypeError, ValueError):
        fitness = math.nan
    if not math.isfinite(fitness):
        raise ExportError(f"{where}: fitness {row.get('fitness')!r:.80} is not a finite number")
    for field in ("formula", "key"):
        if not isinstance(row.get(field), str):
            raise ExportError(f"{where}: no {field} column")
    return {"rank": _count(row, "rank", where, 1), "generation": _count(row, "generation", where, 0),
            "windows": _count(row, "windows", where, 1), "fitness": fitness,
            "formula": row["formula"], "key": row["key"]}


def _run_name(run_dir: Path) -> str:
    name = run_dir.resolve().name
    if not RUN_NAME.fullmatch(name):
        raise ExportError(f"run directory name {name!r:.80} is not a plain name ({RUN_NAME.pattern}): "
                          "its exported files are named after it; rename the directory")
    return name


def _inside(out_dir: Path, name: str) -> Path:
    """out_dir / name, refused unless it lies directly in out_dir (the file itself is replaced,
    not followed, by the atomic write: only its folder is resolved)."""
    folder = out_dir.resolve()
    if Path(os.path.normpath(folder / name)).parent != folder:
        raise ExportError(f"{name!r:.80} would be written outside {out_dir}; nothing was written")
    return out_dir / name


def provenance(run_dir: Path, row: dict) -> dict:
    """Where an exported metric comes from; `row` is a checked hall-of-fame row (_checked_row)."""
    config = from_dict(json.loads((Path(run_dir) / "config.json").read_text()))
    spec = config.eval_spec()
    return {
        "campaign": f"{config.name} (run {_run_name(Path(run_dir))})",
        "model": spec.model,
        "corpus": spec.corpus,
        "target": spec.describe_target(),
        "protocol": f"{config.protocol.describe()} (fingerprint {config.protocol.fingerprint()})",
        "fitness": f"{spec.fitness} {row['fitness']:.6g} on the {spec.split} split, {row['windows']} windows",
        "generation": str(row["generation"]),
        "hall of fame rank": str(row["rank"]),
    }


def export_run(run_dir: str | Path, top: int = 5, out_dir: str | Path = "results/metrics") -> list[Path]:
    """Write the `top` hall-of-fame metrics of a run as modules; return their paths. Every row is
    checked before anything is written, so a bad row leaves no partial export."""
    if top < 1:
        raise ValueError(f"top must be >= 1, got {top}")
    run_dir, out_dir = Path(run_dir), Path(out_dir)
    config = from_dict(json.loads((run_dir / "config.json").read_text())) if (run_dir / "config.json").is_file() else None
    problem = config.search.problem if config is not None else "metric"
    if problem not in ("metric", "allocation", "joint", "skip_plan"):
        raise ValueError(f"{run_dir} evolved {problem!r} candidates, not metrics or allocations: its hall of fame "
                         "(hall_of_fame.csv) is the result; there is nothing to export")
    name = _run_name(run_dir)
    files = [file for i, row in enumerate(read_hall_of_fame(run_dir)[:top], start=1)
             for file in _files(run_dir, name, problem, config, _checked_row(row, f"hall_of_fame.csv row {i}"))]
    paths = [_inside(out_dir, file_name) for file_name, _ in files]
    for path, (_, text) in zip(paths, files):
        atomic_write_text(path, text)
    return paths


def _files(run_dir: Path, name: str, problem: str, config, row: dict) -> list[tuple[str, str]]:
    """(file name, text) of one checked hall-of-fame row: a module, a candidate file, or both."""
    metric_id = f"{name}-{row['rank']}"
    where = f"hall_of_fame.csv rank {row['rank']}"
    tree = row["formula"].split(" @ ")[0]  # a joint campaign's formula is "tree @ [sparsities]"
    origin = provenance(run_dir, row)
    out = []
    try:
        if problem == "skip_plan":  # a removal set: a candidate file, nothing to run
            data = {**SkipPlan.from_key(row["key"]).to_data(), "provenance": origin}
            return [(f"{metric_id}.json", json.dumps(data, indent=1) + "\n")]
        if problem != "allocation":
            out.append((f"{metric_id}.py", Metric.from_expression(tree, name=metric_id).source(origin)))
        if problem != "metric":
            metric = config.problem["metric"] if problem == "allocation" else tree
            data = {**Allocation(metric, key_sparsities(row["key"])).to_data(), "provenance": origin}
            out.append((f"{metric_id}.json", json.dumps(data, indent=1) + "\n"))
    except ValueError as e:  # a formula that does not parse, sparsities that are not sparsities
        raise ExportError(f"{where}: {e}") from None
    return out
