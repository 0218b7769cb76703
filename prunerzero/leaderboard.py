"""The leaderboard: one CSV of results, one row per (metric or method, model, corpus, protocol,
split, mode, target).

Identity: a row is one measurement of one candidate (`key`) on one model, corpus, protocol and split,
in one mode at one whole target (`target`: the recipe's `identity(target)`, every field of the
target as canonical JSON). `budget` is the target in words (`describe()`), kept for people: it
leaves fields out (skip's router init and steps, structured's width, the experts signal), so two
different runs could share it — the identity never uses it.

Rule for re-runs: a row whose identity (IDENTITY columns) matches an existing row replaces it, so
re-running never duplicates a row and the file always holds the latest measurement. Appends are
atomic (temporary file + os.replace) under an exclusive lock, so concurrent writers lose nothing.

What a mode measured of its own (`report.extra`: skip_ratio, predicted_ratio, …) goes into one
JSON column, `extra` (sorted keys, numbers as numbers); `extras(df)` spreads it back into
columns. Only scalar values are kept: a structure in a report (a mode's plan) describes the
pruned model, which the saved model keeps, not a measurement to compare.

Reading validates: every row must have its identity and a number where a number belongs; a
damaged file (a text value in a perplexity cell, a row torn at a field boundary, a `target` or
`extra` cell that is not a JSON object) is an error naming the line, and nothing is written over
it. Files of earlier versions read and are upgraded on the next write: before modes (no `mode`,
`budget`) rows are unstructured; before targets (no `target`, `extra`) a row's target is rebuilt —
see `legacy_target`.

Writing keeps what reading needs: a perplexity that is not a number (a model the pruning broke)
is written as `nan`, which reads back, not as an empty cell, which reads as a torn row. A row
whose achieved sparsity is not its budget's (an allocation file carries its own sparsities) is
refused: its budget would label another experiment.
"""

from __future__ import annotations

import fcntl
import io
import itertools
import json
import numbers
from contextlib import contextmanager
from pathlib import Path

import pandas as pd

from prunerzero.core.paths import atomic_write_text
from prunerzero.pruning.modes import MODES
from prunerzero.pruning.unstructured.allocation import ALLOCATIONS
from prunerzero.pruning.unstructured.target import UPDATES, PruneTarget

COLUMNS = [
    "metric", "formula", "key", "model", "corpus", "protocol", "protocol_id", "stats_mode", "split",
    "mode", "budget", "target", "sparsity", "pattern", "group", "perplexity", "dense_perplexity", "achieved_sparsity",
    "params", "dense_params", "tokens_per_s", "dense_tokens_per_s", "latency_ms", "dense_latency_ms",
    "decode_tokens_per_s", "dense_decode_tokens_per_s", "peak_mem_mb", "calib_tokens", "eval_tokens", "seed", "version",
    "device", "seconds", "timestamp", "extra",
]
IDENTITY = ["key", "model", "corpus", "protocol_id", "split", "mode", "target"]
GIVEN = ["key", "model", "corpus", "protocol_id", "split", "mode", "budget"]  # a row appended must name these
REQUIRED = IDENTITY + ["budget", "metric", "perplexity"]
SETTING = ["model", "corpus", "protocol_id", "split", "mode", "target"]  # rows compared with each other
NUMERIC = ["sparsity", "perplexity", "dense_perplexity", "achieved_sparsity", "params", "dense_params",
           "tokens_per_s", "dense_tokens_per_s", "latency_ms", "dense_latency_ms", "decode_tokens_per_s",
           "dense_decode_tokens_per_s", "peak_mem_mb",
           "calib_tokens", "eval_tokens", "seed", "seconds"]
DEFAULT_PATH = Path("results/leaderboard.csv")
# |sparsity - achieved_sparsity| a row may show: per-row rounding of the kept count (under 0.001
# on the zoo's models); an allocation of another mean sparsity is off by far more
SPARSITY_TOLERANCE = 0.01


class LeaderboardError(ValueError):
    pass


def read(path: Path = DEFAULT_PATH) -> pd.DataFrame:
    """The leaderboard as a table of COLUMNS, validated; an earlier version's file upgraded."""
    path = Path(path)
    if not path.is_file():
        return pd.DataFrame(columns=COLUMNS)
    try:
        df = pd.read_csv(path, dtype=str, keep_default_na=False)
    except (pd.errors.ParserError, UnicodeDecodeError) as e:
        raise LeaderboardError(f"{path}: not a readable leaderboard CSV ({str(e).strip()}); fix or move it") from None
    except pd.errors.EmptyDataError:
        return pd.DataFrame(columns=COLUMNS)
    unknown = set(df.columns) - set(COLUMNS)
    if unknown:
        raise LeaderboardError(f"{path}: unknown column(s) {sorted(unknown)}; expected {COLUMNS}")
    df = df.reindex(columns=COLUMNS, fill_value="")
    _check_json(df, path)
    df = _upgrade(df)
    _validate(df, path)
    for c in NUMERIC:
        df[c] = pd.to_numeric(df[c].replace("", None), errors="coerce")
    return df


# ------------------------------------------------------------------ earlier versions
def _upgrade(df: pd.DataFrame) -> pd.DataFrame:
    """Rows written before modes existed are unstructured rows whose budget is their target; rows
    written before targets get one rebuilt from what they carry (`legacy_target`)."""
    old = df["mode"] == ""
    if old.any():
        df.loc[old, "mode"] = "unstructured"
        df.loc[old, "budget"] = [
            _old_budget(PruneTarget, r) for _, r in df.loc[old, ["sparsity", "pattern", "group"]].iterrows()]
    untargeted = df["target"] == ""
    if untargeted.any():
        df.loc[untargeted, "target"] = [legacy_target(r) for _, r in df.loc[untargeted].iterrows()]
    return df


def _old_budget(target_cls, r) -> str:
    try:
        return target_cls(float(r["sparsity"] or 0), r["pattern"] or "unstructured", r["group"] or "row").describe()
    except ValueError:
        return ""  # _validate names the line


def legacy_target(row) -> str:
    """The identity of a row written before rows carried their target. An unstructured row's target
    is rebuilt from its sparsity, pattern and group as a leaderboard run builds it (N:M at sparsity
    0), with the update and allocation its budget names: exactly the identity a re-run of it
    writes, so the re-run replaces it. Other modes' budgets leave fields out (skip's router init,
    structured's width, …): such a row keeps an identity of its own, {"budget": …, "mode": …},
    which no recipe identity equals — a re-run adds a row beside it instead of guessing."""
    if row["mode"] == "unstructured":
        for target in _unstructured_targets(row):
            if target.describe() == row["budget"]:
                return MODES["unstructured"].identity(target)
    return json.dumps({"budget": str(row["budget"]), "mode": str(row["mode"])}, sort_keys=True)


def _unstructured_targets(row):
    options = {"sparsity": str(row["sparsity"] or "0.5"), "pattern": row["pattern"] or "unstructured",
               "group": row["group"] or "row"}
    try:
        base = MODES["unstructured"].leaderboard_targets(options)[0]
    except (ValueError, IndexError):
        return
    for update, allocation in itertools.product(UPDATES, ALLOCATIONS):
        try:
            yield PruneTarget(**base | {"update": update, "allocation": allocation})
        except (TypeError, ValueError):
            continue  # e.g. an allocation with an N:M pattern: not a target that exists


# ------------------------------------------------------------------ validation
def _validate(df: pd.DataFrame, path: Path) -> None:
    for i, r in df.iterrows():
        line = i + 2  # the header is line 1
        empty = [c for c in REQUIRED if str(r[c]).strip() == ""]
        if empty:
            raise LeaderboardError(f"{path}, line {line}: row without {empty} (a torn or damaged row); "
                                   "fix or remove it — nothing was written")
        for c in NUMERIC:
            if str(r[c]).strip() and pd.isna(pd.to_numeric(r[c], errors="coerce")) and r[c].lower() != "nan":
                raise LeaderboardError(f"{path}, line {line}: column {c!r} holds {r[c]!r:.40}, not a number; "
                                       "fix or remove the row — nothing was written")


def _check_json(df: pd.DataFrame, path: Path) -> None:
    """`target` and `extra` cells, when given, are JSON objects (the identity and the mode's values)."""
    for c in ("target", "extra"):
        for i, text in df[c].items():
            if text and not isinstance(_json_object(text), dict):
                raise LeaderboardError(f"{path}, line {i + 2}: column {c!r} holds {text!r:.60}, not a JSON object; "
                                       "fix or remove the row — nothing was written")


def _json_object(text: str):
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return None


# ------------------------------------------------------------------ writing
@contextmanager
def _locked(path: Path):
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path.with_name(path.name + ".lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def merge(old: pd.DataFrame, new: pd.DataFrame) -> pd.DataFrame:
    """Rows of `new` replace rows of `old` with the same identity, in their place (a re-run moves
    nothing in the file); rows of new identities follow."""
    frames = [f.reindex(columns=COLUMNS) for f in (old, new) if len(f)]
    if not frames:
        return pd.DataFrame(columns=COLUMNS)
    both = pd.concat(frames, ignore_index=True)
    ident = both[IDENTITY].astype(str).agg("|".join, axis=1)
    first = {key: i for i, key in reversed(list(enumerate(ident)))}  # where each identity first appears
    kept = both[~ident.duplicated(keep="last")]
    place = ident[kept.index].map(first)
    return kept.iloc[place.argsort(kind="stable")].reset_index(drop=True)


def append(rows: list[dict], path: Path = DEFAULT_PATH) -> pd.DataFrame:
    """Add rows (a re-run replaces the row of the same identity); the file upgraded as it is written.
    A row's keys outside COLUMNS are its mode's own values: they go into `extra`."""
    path = Path(path)
    missing = [c for c in GIVEN if any(c not in r for r in rows)]
    if missing:
        raise LeaderboardError(f"leaderboard rows lack identity column(s) {missing}")
    for r in rows:
        _check_sparsity(r)
    new = pd.DataFrame([_with_extra(r) for r in rows]).reindex(columns=COLUMNS)
    new = _upgrade(new.fillna({"mode": "", "budget": "", "target": "", "extra": ""}).astype({"target": str}))
    with _locked(path):
        merged = merge(read(path), new)
        _write(merged, path)
    return merged


def upgrade(path: Path = DEFAULT_PATH) -> pd.DataFrame:
    """Rewrite a file of an earlier version in this version's columns now (what the next append
    would do): every row and value kept, targets rebuilt (`legacy_target`)."""
    path = Path(path)
    with _locked(path):
        df = read(path)
        _write(df, path)
    return df


def _write(df: pd.DataFrame, path: Path) -> None:
    buf = io.StringIO()
    _as_written(df).to_csv(buf, index=False)
    atomic_write_text(path, buf.getvalue())


def _with_extra(row: dict) -> dict:
    """The row with its keys outside COLUMNS folded into `extra` (merged with any `extra` it has)."""
    given = row.get("extra") or {}
    given = _json_object(given) if isinstance(given, str) else dict(given)
    if not isinstance(given, dict):
        raise LeaderboardError(f"{row.get('metric')!s:.80}: extra {row.get('extra')!r:.60} is not a JSON object")
    loose = {k: v for k, v in row.items() if k not in COLUMNS}
    kept = {k: _scalar(v) for k, v in (given | loose).items() if _is_scalar(v)}
    out = {k: v for k, v in row.items() if k in COLUMNS}
    out["extra"] = json.dumps(kept, sort_keys=True)
    if isinstance(out.get("target"), str) and out["target"]:  # canonical, so equal targets are equal text
        target = _json_object(out["target"])
        if not isinstance(target, dict):
            raise LeaderboardError(f"{row.get('metric')!s:.80}: target {out['target']!r:.60} is not a JSON object")
        out["target"] = json.dumps(target, sort_keys=True)
    return out


def _is_scalar(value) -> bool:
    return value is None or isinstance(value, (str, bool, numbers.Number)) or getattr(value, "ndim", None) == 0


def _scalar(value):
    """A number as a JSON number (numpy's and torch's included), text as text."""
    if getattr(value, "ndim", None) == 0 and hasattr(value, "item"):
        value = value.item()
    if isinstance(value, bool) or value is None or isinstance(value, str):
        return value
    return int(value) if isinstance(value, numbers.Integral) else float(value)


def _check_sparsity(row: dict) -> None:
    """Refuse a row pruned at another sparsity than its budget names."""
    try:
        budget, achieved = float(row.get("sparsity")), float(row.get("achieved_sparsity"))
    except (TypeError, ValueError):
        return  # a mode without a weight sparsity, or none measured
    if abs(budget - achieved) > SPARSITY_TOLERANCE:  # false for NaN: nothing to compare
        raise LeaderboardError(
            f"{row.get('metric')!s:.80} ({row.get('mode')}: {row.get('budget')}): pruned at sparsity {achieved:.4g}, "
            f"not the budget's {budget:g} (an allocation file sets its own sparsities): give the budget it was "
            "pruned at; nothing was written")


def _as_written(df: pd.DataFrame) -> pd.DataFrame:
    """A required number that is NaN as `nan`: an empty cell there reads as a torn row."""
    out = df.copy()
    for c in REQUIRED:
        if c in NUMERIC:
            out[c] = out[c].astype(object).where(out[c].notna(), "nan")
    return out


# ------------------------------------------------------------------ reading back
def extras(df: pd.DataFrame, mode: str | None = None) -> pd.DataFrame:
    """The `extra` column spread into one column per value (NaN where a row has none): the mode's
    recipe `columns` first, in its order, then any others sorted. Rows of `mode` only, when given."""
    if mode is not None:
        df = df[df["mode"] == mode]
    values = [(_json_object(t) if isinstance(t, str) and t else None) or {} for t in df["extra"]]
    names = sorted(set().union(*values)) if values else []
    order = [c for c in (MODES[mode].columns if mode in MODES else ()) if c in names]
    spread = pd.DataFrame(values, index=df.index, columns=order + [c for c in names if c not in order])
    return pd.concat([df.drop(columns=["extra"]), spread], axis=1)


def best(df: pd.DataFrame, by: list[str] | None = None) -> pd.DataFrame:
    """The lowest-perplexity row per setting (model, corpus, protocol, split, mode, target)."""
    by = by or SETTING
    measured = df[df["perplexity"].notna()]  # a NaN perplexity (a broken model) is never a setting's best
    return measured.loc[measured.groupby(by, dropna=False)["perplexity"].idxmin()].reset_index(drop=True)


def modes_in(df: pd.DataFrame) -> list[str]:
    """The modes with rows, in the registry's order (then any unknown ones)."""
    present = list(dict.fromkeys(df["mode"]))
    return [m for m in MODES if m in present] + sorted(m for m in present if m not in MODES)
