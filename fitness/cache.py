"""The persistent fitness cache, shared by every campaign on a machine.

One SQLite file (stdlib `sqlite3`, WAL journal: concurrent campaigns read while one writes; a
busy timeout waits for a writer's lock instead of failing). A row is keyed by the metric's
canonical key, the evaluation spec's `cache_key()` (model, corpus, protocol, sparsity, pattern,
group, split, dtype) and the number of evaluation windows (successive halving measures the same
candidate on smaller budgets). Only deterministic outcomes are stored — a success, or a failure
of the metric itself — never a lost worker, which a later run may well evaluate. Each result
keeps its masks' fingerprint, so `phenotypes` tells a new campaign which pruned models are
already measured, whatever formulas produced them.

The cache marks its file as its own (SQLite's `application_id`, set when the file is created):
only a file so marked (or one of an earlier version, holding the `fitness` table) is ever set
aside; anything else at the path is an error naming it, left as it is. Every row read back is
checked against what a measurement can give (a perplexity is >= 1, a KL about >= 0, finite; a
sparsity in [0, 1]); a row that fails is named once, dropped and measured again.

Writes: every call opens and closes its own connection, and closing the last connection to a WAL
database checkpoints it into the file with an fsync (~20-40 ms on a VM disk). A campaign stores
each result as it arrives, so it holds one connection for a whole batch of evaluations
(`held()`): each result is still its own committed transaction, appended to the WAL without an
fsync (`synchronous = NORMAL`: a killed process loses nothing committed; only an OS crash may
lose the batch's last rows, which are then measured again), and the fsync comes once, when the
batch ends.
"""

from __future__ import annotations

import math
import sqlite3
import threading
import time
import warnings
from contextlib import contextmanager
from dataclasses import astuple, fields, replace
from pathlib import Path

from prunerzero.core.integrity import set_aside
from prunerzero.core.results import FitnessResult
from prunerzero.core.paths import cache_dir

_INIT_TRIES = 50
APPLICATION_ID = int.from_bytes(b"PRZ0", "big")  # SQLite's header field for the program that owns the file
_SQLITE_MAGIC = b"SQLite format 3\x00"
_OWN_COLUMNS = {"key", "spec", "windows", "status"}  # a `fitness` table with these: a cache of an earlier version
# The lowest value each fitness measure (fitness/measures.py) can give: a perplexity is exp(mean
# NLL >= 0); a KL is >= 0, less a rounding error of either sign, since the dense model's
# log-probabilities are kept in float16. A measure not named here is bounded by the lowest of all.
LOWEST = {"perplexity": 1.0, "kl": -1e-2}
CACHEABLE = ("ok", "failed")  # statuses a retry would reproduce; "lost" (infrastructure) is not
_COLUMNS = [f.name for f in fields(FitnessResult)]
_SCHEMA = f"""
CREATE TABLE IF NOT EXISTS fitness (
    spec TEXT NOT NULL, windows INTEGER NOT NULL, {', '.join(f'{c}' for c in _COLUMNS)},
    PRIMARY KEY (key, spec, windows)
)"""


_TYPES = {"phenotype": "TEXT NOT NULL DEFAULT ''", "measured": "INTEGER NOT NULL DEFAULT 1"}


class NotAFitnessCache(ValueError):
    """A file at the cache's path that the project did not write: it is never renamed or changed."""

    def __init__(self, path: Path, why: str):
        super().__init__(f"{path} is not a prunerzero fitness cache ({why}); choose another path or remove it")


def _result(row: tuple) -> FitnessResult:
    # SQLite stores NaN as NULL (a failed result's value and sparsity) and bools as 0/1
    r = FitnessResult(*(math.nan if v is None else v for v in row))
    return replace(r, measured=bool(r.measured))


def _number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _damage(row: tuple, lowest: float) -> str:
    """Why a stored row is not a result a measurement can give ("" when it is one)."""
    r = dict(zip(_COLUMNS, row))
    if r["status"] not in CACHEABLE:
        return f"status {r['status']!r:.40}"
    if r["status"] == "ok" and not (_number(r["value"]) and math.isfinite(r["value"]) and r["value"] >= lowest):
        return f"value {r['value']!r:.40} (a measured fitness is finite and >= {lowest:g})"
    if r["status"] == "failed" and r["value"] is not None and not _number(r["value"]):
        return f"value {r['value']!r:.40}"
    if not (_number(r["seconds"]) and 0 <= r["seconds"] < math.inf):
        return f"seconds {r['seconds']!r:.40}"
    if not (isinstance(r["eval_tokens"], int) and r["eval_tokens"] >= 0):
        return f"eval_tokens {r['eval_tokens']!r:.40}"
    if r["sparsity"] is not None and not (_number(r["sparsity"]) and 0 <= r["sparsity"] <= 1):
        return f"sparsity {r['sparsity']!r:.40}"
    if not (isinstance(r["reason"], str) and isinstance(r["phenotype"], str) and r["measured"] in (0, 1)):
        return "reason, phenotype or measured of the wrong type"
    return ""


def default_cache_path() -> Path:
    return cache_dir("fitness") / "fitness.sqlite"


class FitnessCache:
    """`get_many` / `put_many` over (metric key, spec key, windows) → FitnessResult.

    A cache file that is damaged is named, set aside and replaced by an empty cache: the campaign
    measures again what it held, rather than stopping (core/integrity.py). A file at the path that
    is not a cache is an error (NotAFitnessCache), left untouched. `measure` (EvalSpec.fitness)
    bounds the values read back; without it, by the lowest any measure gives."""

    def __init__(self, path: str | Path | None = None, log=None, measure: str | None = None):
        self.path = Path(path) if path else default_cache_path()
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.log = log or (lambda msg: warnings.warn(msg, stacklevel=3))
        self.lowest = LOWEST.get(measure, min(LOWEST.values()))
        self._named: set[tuple] = set()  # damaged rows already reported
        self._held: sqlite3.Connection | None = None  # the connection of `held()`, for its thread only
        self._held_thread = 0
        self._guarded(self._init)

    def _guarded(self, op, *args):
        """Run `op`; if SQLite says our file is damaged, set it aside, start afresh, run again."""
        try:
            return op(*args)
        except sqlite3.DatabaseError as e:
            if isinstance(e, sqlite3.OperationalError) or not self.path.exists():
                raise
            if _header(self.path)[68:72] != APPLICATION_ID.to_bytes(4, "big"):
                raise NotAFitnessCache(self.path, f"SQLite says {e}") from None
            held = self._held is not None
            if held:  # let go of the damaged file (without a checkpoint into it)
                self._held.close()
                self._held = None
            for extra in ("-wal", "-shm"):  # the journal of a damaged file is no use either
                self.path.with_name(self.path.name + extra).unlink(missing_ok=True)
            set_aside(self.path, f"{type(e).__name__}: {e}", self.log, then="starting an empty cache")
            self._init()
            if held:
                self._hold()
            return op(*args)

    def _claim(self) -> None:
        """Refuse a file the project did not write. Ours: empty (SQLite's first step of a new
        cache), marked with our application_id (damaged or not: _guarded sets a damaged one
        aside), or an unmarked SQLite database holding our table (an earlier version's cache)."""
        if self.path.is_dir():
            raise NotAFitnessCache(self.path, "a directory")
        head = _header(self.path)
        if not head or head[68:72] == APPLICATION_ID.to_bytes(4, "big"):
            return
        if not head.startswith(_SQLITE_MAGIC):
            raise NotAFitnessCache(self.path, "not an SQLite database")
        try:
            with self._connect() as db:
                owner = db.execute("PRAGMA application_id").fetchone()[0]
                columns = {row[1] for row in db.execute("PRAGMA table_info(fitness)")}
        except sqlite3.DatabaseError as e:
            raise NotAFitnessCache(self.path, f"an SQLite database without our mark that SQLite cannot read: {e}") from None
        if owner != APPLICATION_ID and (owner != 0 or not _OWN_COLUMNS <= columns):
            raise NotAFitnessCache(self.path, "an SQLite database of another program" if owner
                                   else "an SQLite database without the fitness table")

    def _init(self) -> None:
        self._claim()
        for attempt in range(_INIT_TRIES):
            try:
                with self._connect() as db:
                    marked = db.execute("PRAGMA application_id").fetchone()[0] == APPLICATION_ID
                    if not marked:  # a new file (or an earlier version's): marked before WAL, in its own header
                        db.execute(f"PRAGMA application_id = {APPLICATION_ID}")
                    db.execute("PRAGMA journal_mode=WAL")
                    if not marked:  # an earlier version's file in WAL mode: its mark to the file now
                        db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
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
    def held(self):
        """One connection for every call in the block (from this thread; other threads open their
        own as always): no checkpoint and no fsync per write, one when the block ends."""
        if self._held is not None:
            yield self
            return
        self._hold()
        try:
            yield self
        finally:
            db, self._held = self._held, None
            if db is not None:
                db.close()

    def _hold(self) -> None:
        db = sqlite3.connect(self.path, timeout=60.0)
        db.execute("PRAGMA synchronous = NORMAL")  # WAL: a commit is durable against a kill without an fsync
        self._held, self._held_thread = db, threading.get_ident()

    @contextmanager
    def _connect(self):
        if self._held is not None and self._held_thread == threading.get_ident():
            with self._held:  # commit on success, roll back on error; the connection stays open
                yield self._held
            return
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
                out.update((row[0], _result(row)) for row in self._sound(db, rows, spec, windows))
        return out

    def _sound(self, db, rows: list[tuple], spec: str, windows: int) -> list[tuple]:
        """The rows a measurement could have given; the others are named once and deleted, so
        the candidate is measured again and its new result stored."""
        good = []
        for row in rows:
            why = _damage(row, self.lowest)
            if not why:
                good.append(row)
                continue
            db.execute("DELETE FROM fitness WHERE key = ? AND spec = ? AND windows = ?", (row[0], spec, windows))
            if (row[0], spec, windows) not in self._named:
                self._named.add((row[0], spec, windows))
                self.log(f"warning: {self.path}: damaged row for key {row[0]!r:.120} ({why}); dropped, measuring again")
        return good

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
            rows = db.execute(f"SELECT {', '.join(_COLUMNS)} FROM fitness WHERE spec = ? AND windows = ? "
                              "AND status = 'ok' AND phenotype != ''", (spec, windows)).fetchall()
            return {r.phenotype: r.value for r in map(_result, self._sound(db, rows, spec, windows))}

    def __len__(self) -> int:
        with self._connect() as db:
            return db.execute("SELECT COUNT(*) FROM fitness").fetchone()[0]


def _header(path: Path) -> bytes:
    """The first 100 bytes (SQLite's header) of the file at `path`; b"" when there is none."""
    try:
        with open(path, "rb") as f:
            return f.read(100)
    except (FileNotFoundError, IsADirectoryError):
        return b""


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
