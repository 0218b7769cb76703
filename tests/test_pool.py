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
        def evaluate(self, metric, max_windows=None):
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
