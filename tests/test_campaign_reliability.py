"""What a campaign keeps when things go wrong: results written as they arrive, user errors caught
before a run directory exists, Ray failures named, no Ray process outliving a killed driver."""

import os
import signal
import subprocess
import sys
import time

import psutil
import pytest
from typer.testing import CliRunner

from prunerzero.cli import app
from prunerzero.evolve.campaign import evaluator_factory, run_campaign
from prunerzero.evolve.toy import toy_config
from prunerzero.fitness.cache import FitnessCache
from prunerzero.fitness.pool import RayConnectionError, _check_reachable, connection_advice

from test_evolve_campaign import QUIET, Interrupt


def test_results_reach_the_cache_as_they_arrive_so_a_kill_loses_only_work_in_flight(tmp_path):
    cfg = toy_config(tmp_path, search={"generations": 1})
    with pytest.raises(KeyboardInterrupt):
        run_campaign(cfg, run_dir=tmp_path / "run", console=QUIET,
                     backend=Interrupt(evaluator_factory(cfg.eval_spec()), at=1))
    # the interrupted map measured half of generation 0 before the kill: those results are kept
    assert len(FitnessCache(cfg.cache)) >= cfg.search.population // 2 - 2


def test_user_errors_in_a_campaign_config_come_before_any_run_directory(tmp_path):
    for changes, needle in [({"eval": {"model": "no-such-model"}}, "unknown model 'no-such-model'"),
                            ({"search": {"problem": "allocation"}, "problem": {"metric": "frob(W)"}},
                             "unknown operator 'frob'")]:
        cfg = toy_config(tmp_path, **changes)
        with pytest.raises((ValueError, RuntimeError, KeyError), match=needle):
            run_campaign(cfg, console=QUIET)
        assert not (tmp_path / "runs").exists()


@pytest.mark.real
def test_a_real_campaign_with_a_bad_corpus_or_pattern_fails_cleanly_before_a_run_directory(tmp_path):
    runner = CliRunner()
    for table, needle in [('corpus = "no-such-corpus"', "unknown corpus 'no-such-corpus'"),
                          ('[target]\npattern = "5:7"', "5:7 does not divide")]:
        config = tmp_path / "c.toml"
        eval_table = table if table.startswith("corpus") else ""
        target = table if table.startswith("[target]") else ""
        config.write_text(f'name = "bad"\nruns_dir = "{tmp_path / "runs"}"\ncache = "{tmp_path / "c.sqlite"}"\n'
                          f'[eval]\n{eval_table}\ndevice = "cpu"\n{target}\n[protocol]\nseq_len = 32\n'
                          'calib_windows = 1\neval_windows = 1\n[search]\npopulation = 2\ngenerations = 0\n'
                          'hall_of_fame = 1\nelites = 0\ntournament = 1\n')
        result = runner.invoke(app, ["evolve", str(config)])
        assert result.exit_code == 2 and needle in " ".join(result.output.split()), result.output
        assert "Traceback" not in result.output and not (tmp_path / "runs").exists()


def test_ray_connection_failures_are_named_with_what_to_do():
    try:
        raise ConnectionError("Failed to connect to Ray cluster") from RuntimeError(
            "ray.exceptions.AuthenticationError: RPC error: InvalidAuthToken: Authentication token is missing")
    except ConnectionError as e:
        advice = connection_advice("auto", e)
    assert "token authentication" in advice and "~/.ray/auth_token" in advice and "RAY_AUTH_TOKEN" in advice
    assert "Is a cluster running there" in connection_advice("10.0.0.1:6379", ConnectionError("timed out"))
    t0 = time.monotonic()
    with pytest.raises(RayConnectionError, match="nothing answers at .*:9"):
        _check_reachable("127.0.0.1:9")
    assert time.monotonic() - t0 < 10  # not Ray's minutes of retries


DRIVER = """
import os, sys, time
from functools import partial
from prunerzero.evolve.toy import ToyEvaluator, toy_config
from prunerzero.fitness.pool import RayBackend
backend = RayBackend(partial(ToyEvaluator, toy_config(sys.argv[1]).eval_spec()), workers=1)
print("ready", flush=True)
time.sleep(300)
"""


def test_a_killed_driver_leaves_no_ray_process_behind(tmp_path):
    driver = subprocess.Popen([sys.executable, "-c", DRIVER, str(tmp_path)], stdout=subprocess.PIPE, text=True)
    assert driver.stdout.readline().strip() == "ready"
    ray_processes = [p for p in psutil.Process(driver.pid).children(recursive=True)
                     if "reaper" not in " ".join(p.cmdline())]
    assert any("raylet" in " ".join(p.cmdline()) for p in ray_processes)
    os.kill(driver.pid, signal.SIGKILL)
    driver.wait()
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline and any(_alive(p) for p in ray_processes):
        time.sleep(0.5)
    assert not [p.name() for p in ray_processes if _alive(p)]


def _alive(process: psutil.Process) -> bool:
    try:
        return process.is_running() and process.status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False
