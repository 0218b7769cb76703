"""Campaigns on the cheap deterministic toy evaluator: seeding, exact resume after a kill,
run-directory files, shared cache, de-duplication and successive halving."""

import csv
import io
import random

import pytest
from rich.console import Console

from prunerzero.evolve.campaign import EVAL_COLUMNS, HISTORY_COLUMNS, evaluator_factory, resume_campaign, run_campaign
from prunerzero.evolve.config import ConfigError
from prunerzero.evolve.evaluation import FitnessMap
from prunerzero.evolve.simplify import simplify
from prunerzero.evolve.toy import toy_config
from prunerzero.fitness.cache import FitnessCache
from prunerzero.fitness.evaluator import WORST_FITNESS, FitnessResult
from prunerzero.fitness.pool import SerialBackend
from prunerzero.primitives.expression import parse

QUIET = Console(file=io.StringIO())


def _rows(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def _hof(run_dir):
    return [(r["formula"], r["fitness"], r["windows"]) for r in _rows(run_dir / "hall_of_fame.csv")]


def _search_trace(run_dir):
    """What a campaign decided (not how fast or from which cache)."""
    return [(r["generation"], r["best_formula"], r["best_fitness"], r["median_fitness"], r["unique"], r["rejected"])
            for r in _rows(run_dir / "history.csv")]


class Interrupt(SerialBackend):
    """A serial backend that dies (KeyboardInterrupt) on its `at`-th map call, after measuring
    part of the batch — as a Ctrl-C or a killed driver would."""

    def __init__(self, factory, at):
        super().__init__(factory)
        self.calls, self.at = 0, at

    def map(self, jobs, known=None, on_result=None):
        self.calls += 1
        if self.calls == self.at:
            super().map(jobs[: len(jobs) // 2], known, on_result)
            raise KeyboardInterrupt
        return super().map(jobs, known, on_result)


class NoisyRandom(SerialBackend):
    """A backend that uses (and reseeds) Python's global random, as third-party code may."""

    def map(self, jobs, known=None, on_result=None):
        random.seed(12345)
        random.random()
        for j in jobs:
            assert simplify(parse(j.expression)).ok  # rejected individuals never reach a backend
        return super().map(jobs, known, on_result)


class Forgetful(SerialBackend):
    """Measures every candidate with a forward, whatever is known."""

    def map(self, jobs, known=None, on_result=None):
        return super().map(jobs, None, on_result)


@pytest.fixture(scope="module")
def straight(tmp_path_factory):
    """An uninterrupted 4-generation campaign: the reference."""
    root = tmp_path_factory.mktemp("straight")
    cfg = toy_config(root, search={"generations": 4})
    out = io.StringIO()
    run_dir = run_campaign(cfg, console=Console(file=out, width=200))
    return cfg, run_dir, out.getvalue()


def test_run_directory_files_and_progress(straight):
    cfg, run_dir, printed = straight
    assert {p.name for p in run_dir.iterdir()} >= {"config.json", "checkpoint.json", "history.csv",
                                                    "hall_of_fame.csv", "evaluations.csv"}
    history = _rows(run_dir / "history.csv")
    assert list(history[0]) == HISTORY_COLUMNS and len(history) == cfg.search.generations + 1
    best = [float(r["best_fitness"]) for r in history]
    assert best == sorted(best, reverse=True)  # elitism: the best never gets worse
    measured = _rows(run_dir / "evaluations.csv")
    assert list(measured[0]) == EVAL_COLUMNS
    forwards = [r for r in measured if r["cached"] == "0" and r["same_masks"] == "0"]
    assert sum(int(r["evaluations"]) for r in history) == len(forwards)
    assert sum(int(r["cache_hits"]) for r in history) == sum(r["cached"] == "1" for r in measured)
    assert sum(int(r["phenotype_hits"]) for r in history) == sum(r["same_masks"] == "1" for r in measured) > 0
    assert len(_rows(run_dir / "hall_of_fame.csv")) == cfg.search.hall_of_fame
    assert printed.count("gen ") == cfg.search.generations + 1 and "evals" in printed and "cache" in printed


def test_candidates_with_measured_masks_get_exactly_the_measured_perplexity(straight, tmp_path):
    """A same-masks answer is the perplexity a forward would give: the campaign without the
    phenotype shortcut ends identically."""
    cfg, run_dir, _ = straight
    measured = _rows(run_dir / "evaluations.csv")
    forwards = {r["value"] for r in measured if r["same_masks"] == "0"}
    assert all(r["value"] in forwards for r in measured if r["same_masks"] == "1")
    blind = run_campaign(toy_config(tmp_path, search={"generations": 4}), backend=Forgetful(
        evaluator_factory(cfg.eval_spec())), console=QUIET)
    assert _hof(blind) == _hof(run_dir) and _search_trace(blind) == _search_trace(run_dir)
    assert all(r["same_masks"] == "0" for r in _rows(blind / "evaluations.csv"))


def test_same_seed_same_campaign_whatever_the_backend_does_with_random(straight, tmp_path):
    cfg, run_dir, _ = straight
    again = toy_config(tmp_path, search={"generations": 4})
    other = run_campaign(again, backend=NoisyRandom(evaluator_factory(again.eval_spec())), console=QUIET)
    assert _hof(other) == _hof(run_dir)
    assert _search_trace(other) == _search_trace(run_dir)
    reseeded = run_campaign(toy_config(tmp_path, search={"generations": 4, "seed": 1}), console=QUIET)
    assert _search_trace(reseeded) != _search_trace(run_dir)


@pytest.mark.parametrize("kill_at", [1, 4])  # in generation 0, and in generation 3
def test_resume_after_a_kill_ends_with_the_uninterrupted_hall_of_fame(straight, tmp_path, kill_at):
    _, reference, _ = straight
    cfg = toy_config(tmp_path, search={"generations": 4})
    run_dir = tmp_path / "run"
    with pytest.raises(KeyboardInterrupt):
        run_campaign(cfg, run_dir=run_dir, backend=Interrupt(evaluator_factory(cfg.eval_spec()), kill_at),
                     console=QUIET)
    resume_campaign(run_dir, console=QUIET)
    assert _hof(run_dir) == _hof(reference)
    assert _search_trace(run_dir) == _search_trace(reference)
    generations = [int(r["generation"]) for r in _rows(run_dir / "evaluations.csv")]
    assert generations == sorted(generations)  # the replayed generation was not logged twice


def test_extending_a_finished_campaign_equals_running_it_longer(straight, tmp_path):
    _, reference, _ = straight
    short = run_campaign(toy_config(tmp_path, search={"generations": 2}), console=QUIET)
    assert len(_rows(short / "history.csv")) == 3
    resume_campaign(short, generations=4, console=QUIET)
    assert _hof(short) == _hof(reference) and _search_trace(short) == _search_trace(reference)
    assert '"generations": 4' in (short / "config.json").read_text()
    with pytest.raises(ConfigError, match="already run 4 generations; cannot end it at 3"):
        resume_campaign(short, generations=3, console=QUIET)


def test_a_second_campaign_reads_the_shared_cache(straight):
    cfg, run_dir, _ = straight
    again = run_campaign(cfg, console=QUIET)  # same config: same cache file
    history = _rows(again / "history.csv")
    assert sum(int(r["evaluations"]) for r in history) == 0
    assert all(float(r["cache_hit_rate"]) == 1.0 for r in history)
    assert _hof(again) == _hof(run_dir)


class Recording:
    def __init__(self, results=None):
        self.jobs, self.results = [], results or {}

    def map(self, jobs, known=None, on_result=None):
        self.jobs.extend(jobs)
        out = [self.results.get(j.expression, FitnessResult(j.key, 10.0 + len(j.expression) / (j.max_windows or 8),
                                                             "ok")) for j in jobs]
        for i, r in enumerate(out):
            if on_result:
                on_result(i, r)
        return out

    def close(self):
        pass


def test_duplicates_are_measured_once_and_failures_get_the_worst_fitness(tmp_path):
    failing = {"exp(W)": FitnessResult("exp(W)", float("nan"), "failed", "non-finite perplexity"),
               "sqr(W)": FitnessResult("sqr(W)", float("nan"), "lost", "worker died 3 times")}
    backend, cache = Recording(failing), FitnessCache(tmp_path / "c.sqlite")
    fmap = FitnessMap(backend, cache, "spec", full_windows=8)
    out = fmap([("W", "W"), ("exp(W)", "exp(W)"), ("W", "W"), ("sqr(W)", "sqr(W)")])
    assert [j.expression for j in backend.jobs] == ["W", "exp(W)", "sqr(W)"]
    assert out[0] == out[2] and out[1].result.fitness == out[3].result.fitness == WORST_FITNESS
    assert out[1].result.reason == "non-finite perplexity"
    # the deterministic failure is cached, the lost one is measured again
    assert set(cache.get_many(["W", "exp(W)", "sqr(W)"], "spec", 8)) == {"W", "exp(W)"}
    fmap([("W", "W"), ("exp(W)", "exp(W)"), ("sqr(W)", "sqr(W)")])
    assert [j.expression for j in backend.jobs[3:]] == ["sqr(W)"]


def test_successive_halving_measures_fewer_windows_and_promotes_the_best(tmp_path):
    backend = Recording()
    fmap = FitnessMap(backend, FitnessCache(tmp_path / "c.sqlite"), "spec", full_windows=8, rungs=3, eta=2)
    names = ["W", "G", "X", "abs(W)", "sqr(G)", "sqrt(X)", "exp(W)", "tanh(G)"]
    out = fmap([(n, n) for n in names])
    per_rung = [sum(1 for j in backend.jobs if j.max_windows == w) for w in (2, 4, None)]
    assert per_rung == [8, 4, 2]
    finalists = {n for n, m in zip(names, out) if m.windows == 8}
    assert finalists == {"W", "G"}  # the Recording backend's best are the shortest formulas
    assert fmap.take_stats()["windows"] == 8 * 2 + 4 * 4 + 2 * 8


def test_campaign_with_successive_halving_ranks_full_budget_candidates_first(tmp_path):
    cfg = toy_config(tmp_path, fidelity={"rungs": 2, "eta": 2}, search={"generations": 2})
    run_dir = run_campaign(cfg, console=QUIET)
    windows = [int(w) for _, _, w in _hof(run_dir)]
    assert windows[0] == cfg.protocol.eval_windows and windows == sorted(windows, reverse=True)
    history = _rows(run_dir / "history.csv")
    assert sum(int(r["eval_windows"]) for r in history) < sum(int(r["evaluations"]) for r in history) * 8


def test_oos_in_worker_processes_gives_the_same_campaign(straight, tmp_path):
    """Simplification of each generation in two spawned processes decides exactly as the driver alone."""
    _, run_dir, _ = straight
    parallel = run_campaign(toy_config(tmp_path, search={"generations": 4, "oos_workers": 2}), console=QUIET)
    assert _hof(parallel) == _hof(run_dir) and _search_trace(parallel) == _search_trace(run_dir)


def test_oos_pool_matches_in_process_simplification():
    from prunerzero.evolve.oos_pool import OOSPool

    trees = [parse(t) for t in ("add(W, W)", "div(mul(W, X), X)", "sub(G, G)", "mul(abs(W), sqrt(X))")]
    pool = OOSPool(2)
    try:
        got = pool.map(trees, None, 8, 30)
        assert pool._executor is not None  # really in other processes
    finally:
        pool.close()
    assert got == [simplify(t, None, 8, 30) for t in trees]
    assert got[2].rejected and not got[0].rejected
