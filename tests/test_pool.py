"""Evaluation backends and the fitness cache. The Ray tests use a real local Ray (one per
module) and the toy evaluator, which Ray workers import from the installed package."""

import math
import threading
from functools import partial

import pytest
import ray

from prunerzero.evolve.campaign import run_campaign
from prunerzero.evolve.toy import ToyEvaluator, toy_config
from prunerzero.fitness.cache import FitnessCache
from prunerzero.fitness.evaluator import FitnessResult
from prunerzero.fitness.pool import Job, RayBackend, SerialBackend

from test_evolve_campaign import QUIET, _hof, _rows, _search_trace

JOBS = [Job("Abs(W)", "abs(W)"), Job("sqrt(X)*Abs(W)", "mul(abs(W), sqrt(X))"), Job("G", "G", 2)]


def test_cache_round_trips_results_and_skips_lost_ones(tmp_path):
    cache = FitnessCache(tmp_path / "c.sqlite")
    ok = FitnessResult("Abs(W)", 12.5, "ok", "", 1.5, 1024, 0.5)
    failed = FitnessResult("W", math.nan, "failed", "non-finite perplexity")
    lost = FitnessResult("G", math.nan, "lost", "worker died")
    assert cache.put_many([ok, failed, lost], "spec", 8) == 2
    got = cache.get_many(["Abs(W)", "W", "G"], "spec", 8)
    assert got["Abs(W)"] == ok and got["W"].reason == "non-finite perplexity" and math.isnan(got["W"].perplexity)
    assert "G" not in got
    assert cache.get_many(["Abs(W)"], "other spec", 8) == {} == cache.get_many(["Abs(W)"], "spec", 4)
    assert cache.put_many([FitnessResult("Abs(W)", 99.0, "ok")], "spec", 8) == 0  # first writer wins


def test_cache_serves_phenotypes_and_upgrades_an_older_file(tmp_path):
    import sqlite3

    path = tmp_path / "old.sqlite"
    with sqlite3.connect(path) as db:  # the schema before results carried mask fingerprints
        db.execute("CREATE TABLE fitness (spec TEXT NOT NULL, windows INTEGER NOT NULL, key, perplexity, status, "
                   "reason, seconds, eval_tokens, sparsity, PRIMARY KEY (key, spec, windows))")
        db.execute("INSERT INTO fitness VALUES ('spec', 8, 'W', 40.0, 'ok', '', 1.0, 100, 0.5)")
    cache = FitnessCache(path)
    old = cache.get_many(["W"], "spec", 8)["W"]
    assert old.phenotype == "" and old.measured is True and old.perplexity == 40.0
    cache.put_many([FitnessResult("Abs(W)", 12.5, "ok", "", 1.5, 1024, 0.5, "f00d"),
                    FitnessResult("W**2", 12.5, "ok", "", 0.1, 1024, 0.5, "f00d", measured=False),
                    FitnessResult("X", math.nan, "failed", "non-finite perplexity", phenotype="beef")], "spec", 8)
    assert cache.phenotypes("spec", 8) == {"f00d": 12.5}  # failures and unfingerprinted rows stay out
    assert cache.get_many(["W**2"], "spec", 8)["W**2"].measured is False
    assert cache.phenotypes("spec", 4) == {} == cache.phenotypes("other", 8)


def test_backends_skip_the_forward_of_masks_already_measured():
    spec = toy_config("/tmp").eval_spec()
    jobs = [Job("Abs(W)", "abs(W)"), Job("W**2", "sqr(W)"), Job("X*Abs(W)", "mul(abs(W), X)"), Job("log(Abs(W))", "log(abs(W))")]
    known: dict[str, float] = {}
    results = SerialBackend(partial(ToyEvaluator, spec)).map(jobs, known)
    assert [r.measured for r in results] == [True, False, True, False]
    assert results[1].perplexity == results[3].perplexity == results[0].perplexity
    assert results[0].phenotype == results[1].phenotype != results[2].phenotype
    assert known == {results[0].phenotype: results[0].perplexity, results[2].phenotype: results[2].perplexity}
    again = SerialBackend(partial(ToyEvaluator, spec)).map(jobs[1:2])  # nothing known: measured
    assert again[0].measured and again[0].perplexity == results[0].perplexity


def test_cache_is_safe_for_concurrent_writers(tmp_path):
    path = tmp_path / "c.sqlite"

    def write(worker):
        cache = FitnessCache(path)
        for i in range(20):
            cache.put_many([FitnessResult(f"k{worker}-{i}", float(i), "ok")], "spec", 8)

    threads = [threading.Thread(target=write, args=(w,)) for w in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(FitnessCache(path)) == 80


def test_serial_backend_measures_in_job_order_and_turns_exceptions_into_failures():
    spec = toy_config("/tmp").eval_spec()
    results = SerialBackend(partial(ToyEvaluator, spec)).map(JOBS)
    assert [r.key for r in results] == [j.key for j in JOBS] and all(r.status == "ok" for r in results)
    assert results[2].eval_tokens < results[0].eval_tokens  # max_windows reached the evaluator

    class Broken:
        def evaluate(self, metric, max_windows=None, known=None):
            raise RuntimeError("boom")

    (r,) = SerialBackend(Broken).map(JOBS[:1])
    assert r.status == "failed" and "boom" in r.reason


@pytest.fixture(scope="module")
def local_ray():
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield
    ray.shutdown()


@pytest.fixture(scope="module")
def serial_run(tmp_path_factory):
    cfg = toy_config(tmp_path_factory.mktemp("serial"))
    return run_campaign(cfg, console=QUIET)


def test_ray_campaign_equals_serial_and_survives_a_dying_actor(local_ray, serial_run, tmp_path):
    cfg = toy_config(tmp_path).with_backend(kind="ray", workers=2, cpus_per_worker=0.5, retries=2)
    crash_file = tmp_path / "crashed"
    factory = partial(ToyEvaluator, cfg.eval_spec(), crash_file=str(crash_file), crash_at=3)
    with RayBackend(factory, workers=2, cpus_per_worker=0.5, retries=2) as backend:
        run_dir = run_campaign(cfg, backend=backend, console=QUIET)
    assert crash_file.exists()  # an actor did die mid-campaign
    assert _hof(run_dir) == _hof(serial_run)
    assert _search_trace(run_dir) == _search_trace(serial_run)
    assert all(r["status"] == "ok" for r in _rows(run_dir / "evaluations.csv"))


def test_configured_ray_backend_equals_serial(local_ray, serial_run, tmp_path):
    cfg = toy_config(tmp_path).with_backend(kind="ray", workers=2, cpus_per_worker=0.5)
    run_dir = run_campaign(cfg, console=QUIET)
    assert _hof(run_dir) == _hof(serial_run)
    assert ray.is_initialized()  # a Ray it did not start is left running


def test_candidate_is_lost_after_bounded_retries(local_ray):
    spec = toy_config("/tmp").eval_spec()
    with RayBackend(partial(ToyEvaluator, spec, crash_at=1), workers=1, cpus_per_worker=0.5, retries=1) as backend:
        (r,) = backend.map(JOBS[:1])
    assert r.status == "lost" and "died 2 times" in r.reason and r.key == JOBS[0].key


def test_an_evaluation_past_the_timeout_is_killed_and_reported(local_ray):
    spec = toy_config("/tmp").eval_spec()
    with RayBackend(partial(ToyEvaluator, spec, delay_s=60), workers=1, cpus_per_worker=0.5, retries=0,
                    timeout_s=1.0) as backend:
        (r,) = backend.map(JOBS[:1])
    assert r.status == "lost" and "timed out after 1s" in r.reason


def test_actors_that_cannot_start_fail_the_backend_with_the_cause(local_ray):
    with pytest.raises(RuntimeError, match="failed to start"):
        RayBackend(partial(ToyEvaluator, "not a spec"), workers=1, cpus_per_worker=0.5)
