"""The driver's own work per generation (issue 27, item 4). The fitness cache holds one connection
per generation: every result is still committed as it arrives (a killed driver loses only what is
in flight), the file is checkpointed when the generation ends, damage is still set aside, and a
campaign decides exactly as with a connection per write. Redraws are prepared ahead, side by
side, and the campaign is the same."""

import contextlib
import csv
import io
import multiprocessing
import os
import sqlite3

from rich.console import Console

from prunerzero.core.results import FitnessResult
from prunerzero.evolve.campaign import run_campaign
from prunerzero.evolve.toy import toy_config
from prunerzero.fitness.cache import FitnessCache

QUIET = Console(file=io.StringIO())


def _history(run_dir):
    """history.csv without the columns that time things."""
    with open(run_dir / "history.csv", newline="") as f:
        return [{k: v for k, v in r.items() if k not in ("wall_seconds", "eval_seconds")} for r in csv.DictReader(f)]


def _others_see(path, key):
    with contextlib.closing(sqlite3.connect(path)) as db:
        return db.execute("SELECT value FROM fitness WHERE key = ?", (key,)).fetchall()


def test_held_writes_are_committed_one_by_one_and_checkpointed_at_the_end(tmp_path):
    path = tmp_path / "c.sqlite"
    cache = FitnessCache(path)
    with cache.held():
        assert cache.put_many([FitnessResult("k1", 11.0, "ok")], "spec", 8) == 1
        assert _others_see(path, "k1") == [(11.0,)]  # committed: another process reads it at once
        assert cache.put_many([FitnessResult("k1", 99.0, "ok")], "spec", 8) == 0  # the first writer still wins
        with cache.held():  # nested: the same connection
            cache.put_many([FitnessResult("k2", 12.0, "ok")], "spec", 8)
        assert cache._held is not None
        assert cache.get_many(["k1", "k2"], "spec", 8)["k2"].value == 12.0
    assert cache._held is None
    assert not (tmp_path / "c.sqlite-wal").exists() or (tmp_path / "c.sqlite-wal").stat().st_size == 0
    assert len(FitnessCache(path)) == 2


def _write_and_die(path):
    cache = FitnessCache(path)
    with cache.held():
        cache.put_many([FitnessResult("kept", 5.0, "ok")], "spec", 8)
        os._exit(0)  # a killed driver: no close, no checkpoint


def test_a_driver_killed_inside_a_held_block_keeps_what_it_committed(tmp_path):
    path = tmp_path / "c.sqlite"
    FitnessCache(path)
    child = multiprocessing.get_context("spawn").Process(target=_write_and_die, args=(path,))
    child.start()
    child.join(60)
    assert child.exitcode == 0
    assert FitnessCache(path).get_many(["kept"], "spec", 8)["kept"].value == 5.0


def test_other_threads_use_their_own_connection(tmp_path):
    import threading

    cache = FitnessCache(tmp_path / "c.sqlite")
    errors = []

    def write():
        try:
            cache.put_many([FitnessResult("t", 1.0, "ok")], "spec", 8)
        except Exception as e:  # a connection shared across threads raises ProgrammingError
            errors.append(e)

    with cache.held():
        thread = threading.Thread(target=write)
        thread.start()
        thread.join()
        assert errors == [] and cache.get_many(["t"], "spec", 8)["t"].value == 1.0


def test_a_cache_damaged_inside_a_held_block_is_set_aside_and_the_block_goes_on(tmp_path):
    path = tmp_path / "c.sqlite"
    logs = []
    cache = FitnessCache(path, log=logs.append)
    cache.put_many([FitnessResult(f"k{i}", float(i), "ok") for i in range(200)], "spec", 8)
    with cache.held():
        data = bytearray(path.read_bytes())
        for i in range(200, len(data), 5):
            data[i] = 0x55
        path.write_bytes(bytes(data))
        assert cache.get_many(["k1"], "spec", 8) == {}
        assert "malformed" in logs[-1] or "not a database" in logs[-1]
        assert cache.put_many([FitnessResult("k1", 1.0, "ok")], "spec", 8) == 1
    assert len(list(tmp_path.glob("c.sqlite.corrupt-*"))) == 1
    assert FitnessCache(path).get_many(["k1"], "spec", 8)["k1"].value == 1.0


def test_same_seed_same_history_with_a_connection_per_write(tmp_path, monkeypatch):
    cfg = dict(search={"generations": 4, "population": 16}, fidelity={"rungs": 2, "eta": 2})
    held = run_campaign(toy_config(tmp_path / "held", **cfg), console=QUIET)
    monkeypatch.setattr(FitnessCache, "held", lambda self: contextlib.nullcontext(self))  # the earlier way
    per_write = run_campaign(toy_config(tmp_path / "per-write", **cfg), console=QUIET)
    assert _history(held) == _history(per_write)
    assert (held / "hall_of_fame.csv").read_text() == (per_write / "hall_of_fame.csv").read_text()
    assert len(FitnessCache(tmp_path / "held" / "fitness.sqlite")) == len(FitnessCache(tmp_path / "per-write" / "fitness.sqlite"))


def test_redraws_prepared_ahead_leave_the_campaign_unchanged(tmp_path, monkeypatch):
    """The engine draws the likely redraws of a generation ahead, on a copy of its RNG state, so that
    they are simplified side by side with the offspring; the search decides exactly as without."""
    from prunerzero.evolve.engine import Engine

    cfg = dict(search={"generations": 2, "population": 48, "oos_workers": 2, "operators": "extended", "max_depth": 6,
                       "max_size": 20, "init_max_depth": 3, "seed": 0})  # the CPU campaign's search: it redraws
    counts = []
    ahead = Engine._prepare_redraws
    monkeypatch.setattr(Engine, "_prepare_redraws", lambda self, n: (counts.append(n), ahead(self, n)))
    with_ahead = run_campaign(toy_config(tmp_path / "ahead", **cfg), console=QUIET)
    assert sum(counts) > 0  # this campaign rejects some offspring: redraws were prepared ahead
    monkeypatch.setattr(Engine, "_prepare_redraws", lambda self, n: None)
    without = run_campaign(toy_config(tmp_path / "without", **cfg), console=QUIET)
    assert _history(with_ahead) == _history(without)
    assert (with_ahead / "hall_of_fame.csv").read_text() == (without / "hall_of_fame.csv").read_text()
    assert (with_ahead / "checkpoint.json").read_text().split('"rng"')[1] == \
        (without / "checkpoint.json").read_text().split('"rng"')[1]  # the search's RNG state too
