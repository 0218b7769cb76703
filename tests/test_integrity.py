"""Damaged caches are named, set aside and recomputed — never silently used, never left broken."""

import sqlite3

import pytest
import torch

from prunerzero.core.results import FitnessResult
from prunerzero.evolve.campaign import run_campaign
from prunerzero.evolve.toy import toy_config
from prunerzero.fitness.cache import FitnessCache, NotAFitnessCache
from prunerzero.models import corpora

from test_evolve_campaign import QUIET


def test_a_fitness_cache_path_holding_another_file_stops_the_campaign_and_leaves_it_untouched(tmp_path):
    """Not the project's file (no SQLite header, no mark): an error naming it, before any run
    directory is made — never renamed as "corrupt" (it may be the user's notes)."""
    cfg = toy_config(tmp_path, search={"generations": 1})
    cache = tmp_path / "fitness.sqlite"
    cache.write_bytes(b"this is not a database" * 100)
    with pytest.raises(NotAFitnessCache, match="fitness.sqlite is not a prunerzero fitness cache"):
        run_campaign(cfg, console=QUIET)
    assert cache.read_bytes() == b"this is not a database" * 100
    assert not list(tmp_path.glob("fitness.sqlite.corrupt-*")) and not (tmp_path / "runs").exists()


def test_a_cache_damaged_while_in_use_is_set_aside_and_rebuilt(tmp_path):
    path = tmp_path / "c.sqlite"
    logs = []
    cache = FitnessCache(path, log=logs.append)
    cache.put_many([FitnessResult(f"k{i}", float(i), "ok") for i in range(200)], "spec", 8)
    data = bytearray(path.read_bytes())
    for i in range(200, len(data), 5):
        data[i] = 0x55
    path.write_bytes(bytes(data))
    assert cache.get_many(["k1"], "spec", 8) == {}  # answered by a fresh cache, not by damaged rows
    assert "malformed" in logs[-1] or "not a database" in logs[-1]
    assert cache.put_many([FitnessResult("k1", 1.0, "ok")], "spec", 8) == 1
    with sqlite3.connect(path) as db:
        assert db.execute("PRAGMA integrity_check").fetchone()[0] == "ok"


class Chars:
    """A tokenizer of characters (a code-path stand-in: the cache needs ids and a vocabulary)."""

    def get_vocab(self):
        return {chr(i): i for i in range(128)}

    def __call__(self, text, add_special_tokens=False):
        return {"input_ids": [min(ord(c), 127) for c in text]}


def test_a_damaged_token_cache_is_set_aside_and_the_text_tokenized_again(tmp_path, monkeypatch):
    monkeypatch.setenv("PRUNERZERO_CACHE", str(tmp_path))
    text = corpora.CorpusText("tiny", "It is a truth universally acknowledged. " * 20, "test")
    ids = corpora._cached_token_ids(text, Chars())
    (cached,) = (tmp_path / "tokens").glob("tiny-*.pt")
    cached.write_bytes(cached.read_bytes()[:50])
    with pytest.warns(UserWarning, match="is corrupt"):
        again = corpora._cached_token_ids(text, Chars())
    assert torch.equal(again, ids) and len(list((tmp_path / "tokens").glob("*.corrupt-*"))) == 1
