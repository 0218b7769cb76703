"""Caches touch only what they own and use only what a measurement can give (issue 29, items 3,
4 and 8): a file at the fitness cache's path that the project did not write is an error, left as
it is; a damaged cache of ours is set aside; rows out of bounds are dropped, named once; the token
cache is checksummed and its ids checked against the vocabulary."""

import math
import sqlite3
import warnings

import pytest
import torch

from prunerzero.core.results import FitnessResult
from prunerzero.fitness.cache import APPLICATION_ID, FitnessCache, NotAFitnessCache
from prunerzero.models import corpora

SPEC, WINDOWS = "spec", 8


def _siblings(path):
    return sorted(p.name for p in path.parent.iterdir() if p.name != path.name)


@pytest.mark.parametrize("content", [b"my notes, not a cache\n" * 50, b"SQLite format 3\x00" + b"\x00" * 84,
                                     b"x" * 10])
def test_a_file_that_is_not_a_cache_is_an_error_and_is_left_untouched(tmp_path, content):
    path = tmp_path / "notes.txt"
    path.write_bytes(content)
    with pytest.raises(NotAFitnessCache, match=r"notes.txt is not a prunerzero fitness cache .*choose another path"):
        FitnessCache(path)
    assert path.read_bytes() == content and _siblings(path) == []


def test_another_programs_sqlite_database_is_an_error_and_is_left_untouched(tmp_path):
    path = tmp_path / "theirs.sqlite"
    with sqlite3.connect(path) as db:
        db.execute("CREATE TABLE people (name TEXT)")
        db.execute("INSERT INTO people VALUES ('ada')")
    db.close()
    before = path.read_bytes()
    with pytest.raises(NotAFitnessCache, match="without the fitness table"):
        FitnessCache(path)
    with pytest.raises(NotAFitnessCache, match="not a prunerzero fitness cache"):
        FitnessCache(path).get_many(["k"], SPEC, WINDOWS)
    assert path.read_bytes() == before and _siblings(path) == []


def test_a_damaged_cache_of_ours_is_still_set_aside_and_started_afresh(tmp_path):
    path = tmp_path / "fitness.sqlite"
    FitnessCache(path).put_many([FitnessResult(f"k{i}", 10.0 + i, "ok") for i in range(50)], SPEC, WINDOWS)
    data = bytearray(path.read_bytes())
    assert int.from_bytes(data[68:72], "big") == APPLICATION_ID  # the mark is in the file's own header
    data[:16] = b"garbage garbage!"  # the SQLite header destroyed; our mark survives
    path.write_bytes(bytes(data))
    logs = []
    cache = FitnessCache(path, log=logs.append)
    assert len(cache) == 0 and len(list(tmp_path.glob("fitness.sqlite.corrupt-*"))) == 1
    assert "is corrupt" in logs[0]


def test_a_cache_of_the_version_before_the_mark_is_still_ours_and_gets_marked(tmp_path):
    path = tmp_path / "old.sqlite"
    with sqlite3.connect(path) as db:
        db.execute("CREATE TABLE fitness (spec TEXT NOT NULL, windows INTEGER NOT NULL, key, value, status, reason, "
                   "seconds, eval_tokens, sparsity, PRIMARY KEY (key, spec, windows))")
        db.execute("INSERT INTO fitness VALUES (?, ?, 'W', 40.0, 'ok', '', 1.0, 100, 0.5)", (SPEC, WINDOWS))
    db.close()
    assert FitnessCache(path).get_many(["W"], SPEC, WINDOWS)["W"].value == 40.0
    assert int.from_bytes(path.read_bytes()[68:72], "big") == APPLICATION_ID


def _edit(path, key, **values):
    with sqlite3.connect(path) as db:
        for column, value in values.items():
            db.execute(f"UPDATE fitness SET {column} = ? WHERE key = ?", (value, key))
    db.close()


@pytest.mark.parametrize("measure, column, value", [
    ("perplexity", "value", -5.0), ("perplexity", "value", 0.5), ("perplexity", "value", "sixty"),
    ("perplexity", "value", math.inf), ("perplexity", "value", None), ("kl", "value", -5.0),
    ("kl", "value", "0.1"), (None, "value", -5.0), ("perplexity", "sparsity", 1.5), ("perplexity", "sparsity", -0.1),
    ("perplexity", "status", "lost"), ("perplexity", "seconds", "slow"), ("perplexity", "eval_tokens", -3),
])
def test_a_row_no_measurement_can_give_is_dropped_named_once_and_measured_again(tmp_path, measure, column, value):
    path = tmp_path / "fitness.sqlite"
    logs = []
    cache = FitnessCache(path, log=logs.append, measure=measure)
    good = FitnessResult("good", 2.5, "ok", "", 1.0, 64, 0.5, "f00d")
    cache.put_many([good, FitnessResult("bad", 3.0, "ok", "", 1.0, 64, 0.5, "beef")], SPEC, WINDOWS)
    _edit(path, "bad", **{column: value})
    assert cache.get_many(["good", "bad"], SPEC, WINDOWS) == {"good": good}
    assert cache.phenotypes(SPEC, WINDOWS) == {"f00d": 2.5}
    assert len(logs) == 1 and str(path) in logs[0] and "'bad'" in logs[0] and column in logs[0]
    again = FitnessResult("bad", 3.0, "ok", "", 1.0, 64, 0.5, "beef")
    assert cache.put_many([again], SPEC, WINDOWS) == 1  # the new measurement takes the damaged row's place
    assert cache.get_many(["bad"], SPEC, WINDOWS) == {"bad": again}


@pytest.mark.parametrize("measure", ["perplexity", "kl", None])
def test_failed_results_and_real_values_stay_valid(tmp_path, measure):
    cache = FitnessCache(tmp_path / "fitness.sqlite", measure=measure)
    results = [FitnessResult("nan", math.nan, "failed", "non-finite perplexity"),
               FitnessResult("inf", math.inf, "failed", "RuntimeError: boom"),
               FitnessResult("one", 1.0, "ok", "", 0.5, 64, 0.0), FitnessResult("big", 1e9, "ok", "", 0.5, 64, 1.0)]
    if measure == "kl":
        results.append(FitnessResult("dense", -1e-4, "ok", "", 0.5, 64, 0.0))  # float16 log-probs: a rounding error
    cache.put_many(results, SPEC, WINDOWS)
    got = cache.get_many([r.key for r in results], SPEC, WINDOWS)
    assert sorted(got) == sorted(r.key for r in results)
    assert got["nan"].fitness == got["inf"].fitness == 1e10 and got["one"] == results[2]


# ---------------------------------------------------------------- token cache (item 8)
class Chars:
    """A tokenizer of characters (the cache needs ids and a vocabulary)."""

    def get_vocab(self):
        return {chr(i): i for i in range(128)}

    def __call__(self, text, add_special_tokens=False):
        return {"input_ids": [min(ord(c), 127) for c in text]}


def _token_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("PRUNERZERO_CACHE", str(tmp_path))
    text = corpora.CorpusText("tiny", "It is a truth universally acknowledged. " * 20, "test")
    ids = corpora._cached_token_ids(text, Chars())
    (path,) = (tmp_path / "tokens").glob("tiny-*.pt")
    return text, ids, path


def _rewrite(path, ids):
    """The cache file with other ids, saved as the cache saves them (a valid torch file)."""
    payload = torch.load(path, weights_only=True)
    if isinstance(payload, dict):
        payload = {**payload, "ids": ids}
    else:
        payload = ids
    torch.save(payload, path)


@pytest.mark.parametrize("change", ["one id", "out of range", "negative"])
def test_a_token_cache_with_changed_ids_is_set_aside_and_tokenized_again(tmp_path, monkeypatch, change):
    text, ids, path = _token_cache(tmp_path, monkeypatch)
    bad = ids.clone()
    bad[5] = {"one id": (int(ids[5]) + 1) % 128, "out of range": 50_000, "negative": -1}[change]
    _rewrite(path, bad)
    with pytest.warns(UserWarning, match="is corrupt"):
        again = corpora._cached_token_ids(text, Chars())
    assert torch.equal(again, ids) and len(list((tmp_path / "tokens").glob("*.corrupt-*"))) == 1
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert torch.equal(corpora._cached_token_ids(text, Chars()), ids)  # the new cache verifies


def test_token_ids_outside_the_vocabulary_are_refused_even_under_a_valid_checksum(tmp_path, monkeypatch):
    text, ids, path = _token_cache(tmp_path, monkeypatch)
    bad = ids.clone()
    bad[0] = 128  # one past the tokenizer's vocabulary: the embedding would fail on every run
    corpora._save_token_ids(path, bad)
    with pytest.warns(UserWarning, match=r"outside the vocabulary \[0, 128\)"):
        assert torch.equal(corpora._cached_token_ids(text, Chars()), ids)


def test_a_token_cache_of_the_version_before_checksums_is_tokenized_again_and_replaced(tmp_path, monkeypatch):
    text, ids, path = _token_cache(tmp_path, monkeypatch)
    torch.save(ids, path)  # the earlier version's file: a bare tensor
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert torch.equal(corpora._cached_token_ids(text, Chars()), ids)
    assert isinstance(torch.load(path, weights_only=True), dict)
