"""The leaderboard: one CSV of results, one row per (metric or method, model, corpus, protocol,
split, mode, budget).

Rule for re-runs: a row whose identity (IDENTITY columns) matches an existing row replaces it, so
re-running never duplicates a row and the file always holds the latest measurement. Appends are
atomic (temporary file + os.replace) under an exclusive lock, so concurrent writers lose nothing.

Reading validates: every row must have its identity and a number where a number belongs; a
damaged file (a text value in a perplexity cell, a row torn at a field boundary) is an error
naming the line, and nothing is written over it. A file of an earlier version (before modes:
no `mode` and `budget` columns) is read as unstructured rows and upgraded on the next write.

Writing keeps what reading needs: a perplexity that is not a number (a model the pruning broke)
is written as `nan`, which reads back, not as an empty cell, which reads as a torn row. A row
whose achieved sparsity is not its budget's (an allocation file carries its own sparsities) is
refused: its budget would label another experiment.
"""

from __future__ import annotations

import fcntl
import io
from contextlib import contextmanager
from pathlib import Path

import pandas as pd

from prunerzero.core.paths import atomic_write_text
from prunerzero.pruning.unstructured.target import PruneTarget

COLUMNS = [
    "metric", "formula", "key", "model", "corpus", "protocol", "protocol_id", "stats_mode", "split",
    "mode", "budget", "sparsity", "pattern", "group", "perplexity", "dense_perplexity", "achieved_sparsity",
    "params", "dense_params", "tokens_per_s", "dense_tokens_per_s", "latency_ms", "dense_latency_ms",
    "decode_tokens_per_s", "dense_decode_tokens_per_s", "peak_mem_mb", "calib_tokens", "eval_tokens", "seed", "version", "device", "seconds", "timestamp",
]
IDENTITY = ["key", "model", "corpus", "protocol_id", "split", "mode", "budget"]
REQUIRED = IDENTITY + ["metric", "perplexity"]
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
    df = _upgrade(df.reindex(columns=COLUMNS, fill_value=""))
    _validate(df, path)
    for c in NUMERIC:
        df[c] = pd.to_numeric(df[c].replace("", None), errors="coerce")
    return df


def _upgrade(df: pd.DataFrame) -> pd.DataFrame:
    """Rows written before modes existed are unstructured rows whose budget is their target."""
    old = df["mode"] == ""
    if old.any():
        df.loc[old, "mode"] = "unstructured"
        df.loc[old, "budget"] = [
            _old_budget(PruneTarget, r) for _, r in df.loc[old, ["sparsity", "pattern", "group"]].iterrows()]
    return df


def _old_budget(target_cls, r) -> str:
    try:
        return target_cls(float(r["sparsity"] or 0), r["pattern"] or "unstructured", r["group"] or "row").describe()
    except ValueError:
        return ""  # _validate names the line


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
    """Rows of `new` replace rows of `old` with the same identity; order: old rows first."""
    frames = [f.reindex(columns=COLUMNS) for f in (old, new) if len(f)]
    if not frames:
        return pd.DataFrame(columns=COLUMNS)
    both = pd.concat(frames, ignore_index=True)
    ident = both[IDENTITY].astype(str).agg("|".join, axis=1)
    return both[~ident.duplicated(keep="last")].reset_index(drop=True)


def append(rows: list[dict], path: Path = DEFAULT_PATH) -> pd.DataFrame:
    path = Path(path)
    missing = [c for c in IDENTITY if any(c not in r for r in rows)]
    if missing:
        raise LeaderboardError(f"leaderboard rows lack identity column(s) {missing}")
    for r in rows:
        _check_sparsity(r)
    new = _upgrade(pd.DataFrame(rows).reindex(columns=COLUMNS).fillna({"mode": "", "budget": ""}))
    with _locked(path):
        merged = merge(read(path), new)
        buf = io.StringIO()
        _as_written(merged).to_csv(buf, index=False)
        atomic_write_text(path, buf.getvalue())
    return merged


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


def best(df: pd.DataFrame, by: list[str] | None = None) -> pd.DataFrame:
    """The lowest-perplexity row per setting (model, corpus, protocol, split, mode, budget)."""
    by = by or ["model", "corpus", "protocol_id", "split", "mode", "budget"]
    measured = df[df["perplexity"].notna()]  # a NaN perplexity (a broken model) is never a setting's best
    return measured.loc[measured.groupby(by, dropna=False)["perplexity"].idxmin()].reset_index(drop=True)


def _label(name: str, width: int = 28) -> str:
    return name if len(name) <= width else "…" + name[-(width - 1):]


def plot(df: pd.DataFrame, path: Path) -> None:
    """Horizontal bars of perplexity per metric, one panel per (mode, budget), dense dashed."""
    # matplotlib: only --plot draws
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    df = df.copy()
    if "mode" not in df or "budget" not in df:  # a bare table of an earlier version
        df["mode"] = "unstructured"
        df["budget"] = [f"{p}, sparsity {s:g}" for p, s in zip(df["pattern"], df["sparsity"])]
    settings = list(df.groupby(["mode", "budget"], sort=True))
    rows_max = max((len(rows) for _, rows in settings), default=1)
    fig, axes = plt.subplots(1, max(len(settings), 1), figsize=(6.5 * max(len(settings), 1), 0.9 + 0.32 * rows_max),
                             squeeze=False)
    for ax, ((mode, budget), rows) in zip(axes[0], settings):
        rows = rows.sort_values("perplexity", ascending=False)
        ax.barh([_label(m) for m in rows["metric"]], rows["perplexity"], color="tab:blue")
        ax.axvline(rows["dense_perplexity"].iloc[0], color="black", linestyle="--", label="dense")
        ax.set_xscale("log")
        ax.set_title(f"{mode}: {budget}")
        ax.set_xlabel("perplexity (lower is better)")
        ax.legend(loc="lower right")
    fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
