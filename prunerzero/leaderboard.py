"""The leaderboard: one CSV of results, one row per (metric, model, corpus, protocol, split,
sparsity, pattern, comparison group).

Rule for re-runs: a row whose identity (IDENTITY columns) matches an existing row replaces it, so
re-running never duplicates a row and the file always holds the latest measurement. Appends are
atomic (temporary file + os.replace) under an exclusive lock, so concurrent writers lose nothing.
"""

from __future__ import annotations

import fcntl
import io
from contextlib import contextmanager
from pathlib import Path

import pandas as pd

from prunerzero.paths import atomic_write_text

COLUMNS = [
    "metric", "formula", "key", "model", "corpus", "protocol", "protocol_id", "stats_mode", "split",
    "sparsity", "pattern", "group", "perplexity", "dense_perplexity", "achieved_sparsity",
    "calib_tokens", "eval_tokens", "seed", "version", "device", "seconds", "timestamp",
]
IDENTITY = ["key", "model", "corpus", "protocol_id", "split", "sparsity", "pattern", "group"]
DEFAULT_PATH = Path("results/leaderboard.csv")


class LeaderboardError(ValueError):
    pass


def read(path: Path = DEFAULT_PATH) -> pd.DataFrame:
    if not Path(path).is_file():
        return pd.DataFrame(columns=COLUMNS)
    df = pd.read_csv(path, dtype={"protocol_id": str, "key": str})
    unknown = set(df.columns) - set(COLUMNS)
    if unknown:
        raise LeaderboardError(f"{path}: unknown column(s) {sorted(unknown)}; expected {COLUMNS}")
    return df.reindex(columns=COLUMNS)


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
    both = pd.concat([old.reindex(columns=COLUMNS), new.reindex(columns=COLUMNS)], ignore_index=True)
    ident = both[IDENTITY].astype(str).agg("|".join, axis=1)
    return both[~ident.duplicated(keep="last")].reset_index(drop=True)


def append(rows: list[dict], path: Path = DEFAULT_PATH) -> pd.DataFrame:
    path = Path(path)
    missing = [c for c in IDENTITY if any(c not in r for r in rows)]
    if missing:
        raise LeaderboardError(f"leaderboard rows lack identity column(s) {missing}")
    with _locked(path):
        merged = merge(read(path), pd.DataFrame(rows))
        buf = io.StringIO()
        merged.to_csv(buf, index=False)
        atomic_write_text(path, buf.getvalue())
    return merged


def best(df: pd.DataFrame, by: list[str] | None = None) -> pd.DataFrame:
    """The lowest-perplexity row per setting (model, corpus, protocol, split, pattern, sparsity)."""
    by = by or ["model", "corpus", "protocol_id", "split", "pattern", "sparsity", "group"]
    return df.loc[df.groupby(by, dropna=False)["perplexity"].idxmin()].reset_index(drop=True)


def _label(name: str, width: int = 28) -> str:
    return name if len(name) <= width else "…" + name[-(width - 1):]


def plot(df: pd.DataFrame, path: Path) -> None:
    """Horizontal bars of perplexity per metric, one panel per (pattern, sparsity), dense dashed."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    settings = list(df.groupby(["pattern", "sparsity"], sort=True))
    rows_max = max((len(rows) for _, rows in settings), default=1)
    fig, axes = plt.subplots(1, max(len(settings), 1), figsize=(6.5 * max(len(settings), 1), 0.9 + 0.32 * rows_max),
                             squeeze=False)
    for ax, ((pattern, sparsity), rows) in zip(axes[0], settings):
        rows = rows.sort_values("perplexity", ascending=False)
        ax.barh([_label(m) for m in rows["metric"]], rows["perplexity"], color="tab:blue")
        ax.axvline(rows["dense_perplexity"].iloc[0], color="black", linestyle="--", label="dense")
        ax.set_xscale("log")
        ax.set_title(f"{pattern}, sparsity {sparsity:g}")
        ax.set_xlabel("perplexity (lower is better)")
        ax.legend(loc="lower right")
    fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
