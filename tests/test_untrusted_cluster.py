"""Issue 29, item 10: the README's Ray cluster recipe, followed on one machine — a token, a head
started in token mode, a campaign joining it by an explicit --address from a "machine" whose only
token is RAY_AUTH_TOKEN — and the message when the token is there but not sent."""

import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from prunerzero.fitness.pool import connection_advice

BIN = Path(sys.executable).parent  # the venv's `ray` and `prunerzero`, as install.sh puts them on PATH


def _env(home: Path, **extra) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RAY_ADDRESS", "RAY_AUTH"))}
    return env | {"HOME": str(home), **extra}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def ray_head(tmp_path_factory):
    """README: `ray get-auth-token --generate`, then `RAY_AUTH_MODE=token ray start --head --port P`
    (here with --block, so that ending this one process group stops the head: `ray stop` would
    stop every Ray on the machine). Its files under ROOT/ray, where Ray run with RAY_TMPDIR=ROOT looks
    for the cluster this machine started last. Yields (port, token, ROOT). One head for the module:
    each test only joins it or must stay out of it."""
    tmp_path = tmp_path_factory.mktemp("ray-head")
    home = tmp_path / "head-home"  # the head node's ~/.ray/auth_token
    home.mkdir()
    token = subprocess.run([BIN / "ray", "get-auth-token", "--generate"], env=_env(home), capture_output=True,
                           text=True, check=True, timeout=60).stdout.strip()
    port, root = _free_port(), tempfile.mkdtemp(prefix="pzray", dir="/tmp")  # Ray's socket paths must be short
    log = (tmp_path / "head.log").open("w")
    head = subprocess.Popen([BIN / "ray", "start", "--head", "--port", str(port), "--num-cpus", "1",
                             "--include-dashboard=false", "--temp-dir", f"{root}/ray", "--block"],
                            env=_env(home, RAY_AUTH_MODE="token"), stdout=log, stderr=subprocess.STDOUT,
                            start_new_session=True)
    try:
        deadline = time.monotonic() + 60
        while "Ray runtime started" not in (tmp_path / "head.log").read_text():
            assert head.poll() is None and time.monotonic() < deadline, (tmp_path / "head.log").read_text()[-2000:]
            time.sleep(0.2)
        yield port, token, root
    finally:
        head.terminate()  # `ray start --block` ends the processes it started ...
        try:
            head.wait(timeout=20)
        except subprocess.TimeoutExpired:
            head.kill()
            head.wait()
        try:
            os.killpg(head.pid, signal.SIGKILL)  # ... and whatever of its group outlived it
        except ProcessLookupError:
            pass
        log.close()
        shutil.rmtree(root, ignore_errors=True)


def test_a_campaign_joins_a_token_cluster_as_the_readme_says(ray_head, tmp_path):
    port, token, _ = ray_head
    config = tmp_path / "cluster.toml"
    config.write_text(f'name = "cluster"\nruns_dir = "{tmp_path / "runs"}"\ncache = "{tmp_path / "fitness.sqlite"}"\n'
                      '[eval]\nmodel = "toy"\n[protocol]\ncalib_windows = 4\neval_windows = 8\n'
                      '[search]\npopulation = 4\ngenerations = 1\nhall_of_fame = 2\n[backend]\nworkers = 1\n')
    elsewhere = tmp_path / "driver-home"  # another machine: no ~/.ray/auth_token, only the exported token
    elsewhere.mkdir()
    env = _env(elsewhere, RAY_AUTH_MODE="token", RAY_AUTH_TOKEN=token, PRUNERZERO_CACHE=str(tmp_path / "cache"))
    done = subprocess.run([BIN / "prunerzero", "evolve", str(config), "--address", f"127.0.0.1:{port}"], env=env,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    assert "run directory:" in done.stdout and list((tmp_path / "runs").glob("cluster-*/checkpoint.json"))


def test_without_an_address_a_campaign_starts_its_own_ray_beside_a_running_cluster(ray_head, tmp_path):
    """No --address, no RAY_ADDRESS: a Ray of the campaign's own, never the cluster this machine
    started last (ray.init's default finds the head above through RAY_TMPDIR, joins it, and fails
    on its token)."""
    config = tmp_path / "local.toml"
    config.write_text(f'name = "local"\nruns_dir = "{tmp_path / "runs"}"\ncache = "{tmp_path / "fitness.sqlite"}"\n'
                      '[eval]\nmodel = "toy"\n[protocol]\ncalib_windows = 4\neval_windows = 8\n'
                      '[search]\npopulation = 4\ngenerations = 1\nhall_of_fame = 2\n[backend]\nkind = "ray"\nworkers = 1\n')
    home = tmp_path / "no-token-home"
    home.mkdir()
    done = subprocess.run([BIN / "prunerzero", "evolve", str(config)], capture_output=True, text=True, timeout=120,
                          env=_env(home, PRUNERZERO_CACHE=str(tmp_path / "cache"), RAY_TMPDIR=ray_head[2]))
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    assert list((tmp_path / "runs").glob("local-*/checkpoint.json"))


def test_a_token_not_sent_is_named_as_such(tmp_path, monkeypatch):
    """Ray sends a token to an explicit address only with RAY_AUTH_MODE=token: the message says so
    (it said the token was missing)."""
    refused = RuntimeError("RPC error: InvalidAuthToken: Authentication token is missing or incorrect")
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.delenv("RAY_AUTH_MODE", raising=False)
    monkeypatch.delenv("RAY_AUTH_TOKEN_PATH", raising=False)
    monkeypatch.setenv("RAY_AUTH_TOKEN", "secret")
    advice = connection_advice("10.0.0.1:6379", refused)
    assert "did not send it" in advice and "RAY_AUTH_MODE=token" in advice and "does not have" not in advice
    monkeypatch.setenv("RAY_AUTH_MODE", "token")
    assert "is not the cluster's" in connection_advice("10.0.0.1:6379", refused)
    monkeypatch.delenv("RAY_AUTH_TOKEN")
    assert "does not have its token" in connection_advice("10.0.0.1:6379", refused)
