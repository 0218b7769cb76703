"""The persistent fitness cache, shared by every campaign on a machine.

One SQLite file (stdlib `sqlite3`, WAL journal: concurrent campaigns read while one writes; a
busy timeout waits for a writer's lock instead of failing). A row is keyed by the metric's
canonical key, the evaluation spec's `cache_key()` (model, corpus, protocol, sparsity, pattern,
group, split, dtype) and the number of evaluation windows (successive halving measures the same
candidate on smaller budgets). Only deterministic outcomes are stored — a success, or a failure
of the metric itself — never a lost worker, which a later run may well evaluate. Each result
keeps its masks' fingerprint, so `phenotypes` tells a new campaign which pruned models are
already measured, whatever formulas produced them.
"""

from __future__ import annotations

import math
import sqlite3
import time
import warnings
from contextlib import contextmanager
from dataclasses import astuple, fields, replace
from pathlib import Path

from prunerzero.core.integrity import set_aside
from prunerzero.core.results import FitnessResult
from prunerzero.core.paths import cache_dir

_INIT_TRIES = 50
CACHEABLE = ("ok", "failed")  # statuses a retry would reproduce; "lost" (infrastructure) is not
_COLUMNS = [f.name for f in fields(FitnessResult)]
_SCHEMA = f"""
CREATE TABLE IF NOT EXISTS fitness (
    spec TEXT NOT NULL, windows INTEGER NOT NULL, {', '.join(f'{c}' for c in _COLUMNS)},
    PRIMARY KEY (key, spec, windows)
)"""


_TYPES = {"phenotype": "TEXT NOT NULL DEFAULT ''", "measured": "INTEGER NOT NULL DEFAULT 1"}


def _result(row: tuple) -> FitnessResult:
    # SQLite stores NaN as NULL (a failed result's value and sparsity) and bools as 0/1
    r = FitnessResult(*(math.nan if v is None else v for v in row))
    return replace(r, measured=bool(r.measured))


def default_cache_path() -> Path:
    return cache_dir("fitness") / "fitness.sqlite"


class FitnessCache:
    """`get_many` / `put_many` over (metric key, spec key, windows) → FitnessResult.

    A file that is not a usable database (damaged, or something else at that path) is named, set
    aside and replaced by an empty cache: the campaign measures again what it held, rather than
    stopping (core/integrity.py)."""

    def __init__(self, path: str | Path | None = None, log=None):
        self.path = Path(path) if path else default_cache_path()
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.log = log or (lambda msg: warnings.warn(msg, stacklevel=3))
        self._guarded(self._init)

    def _guarded(self, op, *args):
        """Run `op`; if SQLite says the file is damaged, set it aside, start afresh, run again."""
        try:
            return op(*args)
        except sqlite3.DatabaseError as e:
            if isinstance(e, sqlite3.OperationalError) or not self.path.exists():
                raise
            for extra in ("-wal", "-shm"):  # the journal of a damaged file is no use either
                self.path.with_name(self.path.name + extra).unlink(missing_ok=True)
            set_aside(self.path, f"{type(e).__name__}: {e}", self.log, then="starting an empty cache")
            self._init()
            return op(*args)

    def _init(self) -> None:
        for attempt in range(_INIT_TRIES):
            try:
                with self._connect() as db:
                    db.execute("PRAGMA journal_mode=WAL")
                    db.execute(_SCHEMA)
                    _add_missing_columns(db)
                break
            except sqlite3.OperationalError as e:
                # switching to WAL needs the file to itself and SQLite answers "locked" at once,
                # without the busy timeout, when another process is opening it at that moment
                if "locked" not in str(e) or attempt == _INIT_TRIES - 1:
                    raise
                time.sleep(0.02 * (attempt + 1))

    @contextmanager
    def _connect(self):
        db = sqlite3.connect(self.path, timeout=60.0)
        try:
            with db:  # commit on success, roll back on error
                yield db
        finally:
            db.close()

    def get_many(self, keys: list[str], spec: str, windows: int) -> dict[str, FitnessResult]:
        return self._guarded(self._get_many, keys, spec, windows)

    def put_many(self, results: list[FitnessResult], spec: str, windows: int) -> int:
        """Store the cacheable results; the first writer of a key wins. Returns rows written."""
        return self._guarded(self._put_many, results, spec, windows)

    def phenotypes(self, spec: str, windows: int) -> dict[str, float]:
        """Fingerprint → value of every successful measurement on this budget."""
        return self._guarded(self._phenotypes, spec, windows)

    def _get_many(self, keys: list[str], spec: str, windows: int) -> dict[str, FitnessResult]:
        out: dict[str, FitnessResult] = {}
        unique = sorted(set(keys))
        with self._connect() as db:
            for start in range(0, len(unique), 500):  # SQLite bounds the number of parameters
                chunk = unique[start:start + 500]
                rows = db.execute(
                    f"SELECT {', '.join(_COLUMNS)} FROM fitness WHERE spec = ? AND windows = ? "
                    f"AND key IN ({', '.join('?' * len(chunk))})", (spec, windows, *chunk)).fetchall()
                out.update((row[0], _result(row)) for row in rows)
        return out

    def _put_many(self, results: list[FitnessResult], spec: str, windows: int) -> int:
        rows = [(spec, windows, *astuple(r)) for r in results if r.status in CACHEABLE]
        if not rows:
            return 0
        with self._connect() as db:
            before = db.total_changes
            db.executemany(
                f"INSERT OR IGNORE INTO fitness (spec, windows, {', '.join(_COLUMNS)}) "
                f"VALUES ({', '.join('?' * (len(_COLUMNS) + 2))})", rows)
            return db.total_changes - before

    def _phenotypes(self, spec: str, windows: int) -> dict[str, float]:
        with self._connect() as db:
            rows = db.execute("SELECT phenotype, value FROM fitness WHERE spec = ? AND windows = ? "
                              "AND status = 'ok' AND phenotype != ''", (spec, windows)).fetchall()
        return dict(rows)

    def __len__(self) -> int:
        with self._connect() as db:
            return db.execute("SELECT COUNT(*) FROM fitness").fetchone()[0]


def _add_missing_columns(db) -> None:
    """Bring a cache written by an earlier version up to the current columns (the value column
    was called perplexity before fitness measures other than perplexity existed)."""
    have = {row[1] for row in db.execute("PRAGMA table_info(fitness)")}
    if "perplexity" in have and "value" not in have:
        db.execute("ALTER TABLE fitness RENAME COLUMN perplexity TO value")
        have = (have - {"perplexity"}) | {"value"}
    for column in _COLUMNS:
        if column not in have:
            db.execute(f"ALTER TABLE fitness ADD COLUMN {column} {_TYPES[column]}")
