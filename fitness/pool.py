"""Evaluation backends behind one interface: `backend.map(jobs) -> results`, in job order.

- `SerialBackend`: one evaluator in this process (debugging; no Ray).
- `RayBackend`: evaluator actors, each built once from a picklable factory (e.g.
  `functools.partial(Evaluator, spec)`), so the model and its statistics load once per actor.
  Candidates travel as plain data (an expression string, or a dict of a candidate kind:
  pruning/candidates.py) and go to whichever actor is free, driven by a
  bounded `ray.wait` loop (one evaluation in flight per actor) rather than ActorPool, so that
  a dead actor is this code's decision: it is replaced and its candidate retried up to
  `retries` times, then recorded as lost with the reason.

Evaluation is idempotent and deterministic, so both backends give identical results.

`map(jobs, known, on_result)`: `known` maps fingerprints to values on the jobs' budget; each job
travels with what is known when it is dispatched, and every new result is added as it arrives,
so a candidate that prunes like an earlier one of the same call skips its forward too.
`on_result(i, result)` is called as each job's result is final, so a caller can store it at once
(a killed campaign loses only the evaluations in flight). `start()` builds the evaluators now,
so that one that cannot be built (a bad model, corpus or target) fails before any work.
"""

from __future__ import annotations

import logging
import math
import os
import socket
import time
from collections import deque
from collections.abc import Mapping
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Callable, Protocol

from prunerzero.core.results import FitnessResult
from prunerzero.fitness.reaper import start_reaper, stop_reaper
from prunerzero.pruning.modes import decode, label  # the registry: every mode's candidate kinds

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Job:
    key: str  # the candidate's canonical key (results are reported under it)
    candidate: str | dict  # plain data: a metric expression, or {"kind": ..., ...}
    max_windows: int | None = None  # None: the protocol's full evaluation budget

    @property
    def expression(self) -> str:
        """The candidate as one line (the expression of a metric)."""
        return label(self.candidate)


ResultFn = Callable[[int, FitnessResult], None]


class Backend(Protocol):
    def start(self) -> None: ...
    def map(self, jobs: list[Job], known: dict[str, float] | None = None,
            on_result: ResultFn | None = None) -> list[FitnessResult]: ...
    def close(self) -> None: ...


def learn(known: dict[str, float] | None, result: FitnessResult) -> None:
    """Remember a measured phenotype for the jobs dispatched after it."""
    if known is not None and result.phenotype and result.status == "ok":
        known.setdefault(result.phenotype, result.perplexity)


def lost(job: Job, reason: str) -> FitnessResult:
    """An evaluation the infrastructure could not complete (not cached: a later run may)."""
    return FitnessResult(job.key, math.nan, "lost", reason)


class EvaluatorHost:
    """Holds one evaluator; runs a job. A Ray actor class and the serial backend's engine."""

    def __init__(self, factory: Callable[[], object]):
        self.evaluator = factory()

    def ping(self) -> bool:
        return True

    def evaluate(self, job: Job, known: Mapping[str, float] | None = None) -> FitnessResult:
        start = time.perf_counter()
        try:
            result = self.evaluator.evaluate(decode(job.candidate), job.max_windows, known)
        except Exception as e:  # the evaluator should never raise; if it does, it is data
            return FitnessResult(job.key, math.nan, "failed", f"{type(e).__name__}: {e}",
                                 time.perf_counter() - start)
        return replace(result, key=job.key)  # reported under the key the engine asked about


class SerialBackend:
    def __init__(self, factory: Callable[[], object]):
        self.factory = factory
        self._host: EvaluatorHost | None = None

    def start(self) -> None:
        if self._host is None:
            self._host = EvaluatorHost(self.factory)

    def map(self, jobs: list[Job], known: dict[str, float] | None = None,
            on_result: ResultFn | None = None) -> list[FitnessResult]:
        if jobs:
            self.start()  # heavy: load on first use
        results = []
        for i, job in enumerate(jobs):
            results.append(self._host.evaluate(job, known))
            learn(known, results[-1])
            if on_result:
                on_result(i, results[-1])
        return results

    def close(self) -> None:
        self._host = None

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class RayBackend:
    def __init__(self, factory: Callable[[], object], workers: int = 1, cpus_per_worker: float = 1.0,
                 gpus_per_worker: float = 0.0, retries: int = 2, timeout_s: float = 0.0,
                 address: str = "", dashboard: bool = False):
        # ray takes seconds to import: only the Ray backend needs it
        import ray

        self.ray = ray
        self.factory, self.retries, self.timeout_s = factory, retries, timeout_s
        self._started_ray = _ensure_ray(ray, address, workers * cpus_per_worker, dashboard)
        self._actor_cls = ray.remote(EvaluatorHost).options(
            num_cpus=cpus_per_worker, num_gpus=gpus_per_worker, max_restarts=0, max_task_retries=0)
        self.actors = [self._actor_cls.remote(factory) for _ in range(workers)]
        self._check_started()

    def _check_started(self) -> None:
        """Fail now, with the cause, if evaluators cannot be built at all (a bad model name)."""
        try:
            self.ray.get([a.ping.remote() for a in self.actors])
        except self.ray.exceptions.RayActorError as e:
            self.close()
            raise RuntimeError(f"evaluator actors failed to start: {e}") from None

    def _replace(self, actor):
        self.ray.kill(actor, no_restart=True)
        new = self._actor_cls.remote(self.factory)
        self.actors[self.actors.index(actor)] = new
        return new

    def start(self) -> None:
        pass  # the actors were built and pinged in the constructor

    def map(self, jobs: list[Job], known: dict[str, float] | None = None,
            on_result: ResultFn | None = None) -> list[FitnessResult]:
        results: list[FitnessResult | None] = [None] * len(jobs)
        attempts = [0] * len(jobs)
        pending = deque(range(len(jobs)))
        running: dict = {}  # object ref -> (actor, job index, start time)
        overdue: set = set()  # refs whose actor was killed for running past the timeout
        idle = list(self.actors)
        while pending or running:
            while idle and pending:  # at most one evaluation in flight per actor
                actor, i = idle.pop(), pending.popleft()
                running[actor.evaluate.remote(jobs[i], known)] = (actor, i, time.monotonic())
            done, _ = self.ray.wait(list(running), num_returns=1, timeout=self._wait_s(running))
            overdue |= self._kill_overdue(running, done)
            for ref in done:
                actor, i, _ = running.pop(ref)
                try:
                    results[i] = self.ray.get(ref)
                    learn(known, results[i])
                    idle.append(actor)
                    if on_result:
                        on_result(i, results[i])
                except self.ray.exceptions.RayActorError as e:
                    idle.append(self._replace(actor))
                    attempts[i] += 1
                    why = f"timed out after {self.timeout_s:g}s" if ref in overdue else _first_line(e)
                    if attempts[i] > self.retries:
                        results[i] = lost(jobs[i], f"worker died {attempts[i]} times, last: {why}")
                        log.warning("candidate %s lost: %s", jobs[i].expression, results[i].reason)
                        if on_result:
                            on_result(i, results[i])
                    else:
                        log.warning("worker died on %s; retrying (%d/%d)", jobs[i].expression, attempts[i], self.retries)
                        pending.appendleft(i)
        return results

    def _wait_s(self, running: dict) -> float | None:
        if not self.timeout_s:
            return None
        oldest = min(start for _, _, start in running.values())
        return max(0.0, oldest + self.timeout_s - time.monotonic())

    def _kill_overdue(self, running: dict, done: list) -> set:
        """Kill the actor of each evaluation past the timeout (its ref then fails as a dead
        actor's); return those refs."""
        if not self.timeout_s:
            return set()
        now = time.monotonic()
        killed = {ref for ref, (_, _, start) in running.items() if ref not in done and now - start > self.timeout_s}
        for ref in killed:
            self.ray.kill(running[ref][0], no_restart=True)
        return killed

    def close(self) -> None:
        for a in self.actors:
            self.ray.kill(a, no_restart=True)
        self.actors = []
        if self._started_ray:
            _shutdown_ray(self.ray)
            self._started_ray = False

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _first_line(e: Exception) -> str:
    return (str(e).strip().splitlines() or [type(e).__name__])[0][:300]


class RayConnectionError(RuntimeError):
    """The Ray cluster named by --address / RAY_ADDRESS could not be joined; the message says why
    and what to do."""


_reaper = None  # the watchdog of the local Ray instance this process started (fitness/reaper.py)


def _ensure_ray(ray, address: str, cpus: float, dashboard: bool) -> bool:
    """Join `address` (or RAY_ADDRESS), else start a local Ray; use one already initialised.
    Returns whether this call started Ray (and so should shut it down)."""
    global _reaper
    if ray.is_initialized():
        return False
    address = address or os.environ.get("RAY_ADDRESS", "")
    if address:
        _check_reachable(address)  # Ray itself retries an unreachable address for minutes
        try:
            ray.init(address=address, log_to_driver=False)
        except Exception as e:  # ConnectionError, AuthenticationError, RuntimeError: Ray raises several
            raise RayConnectionError(connection_advice(address, e)) from None
    else:
        # "local": a Ray of its own. Without it ray.init joins whatever cluster this machine
        # started last (`ray start`, another campaign's), which no option asked for.
        ray.init(address="local", num_cpus=max(os.cpu_count() or 1, math.ceil(cpus)), include_dashboard=dashboard,
                 log_to_driver=False)
        _reaper = start_reaper()  # a killed driver leaves no Ray agent behind
    return True


def _shutdown_ray(ray) -> None:
    global _reaper
    ray.shutdown()
    stop_reaper(_reaper)
    _reaper = None


def _check_reachable(address: str, timeout_s: float = 5.0) -> None:
    """Fail at once, naming the address, when nothing accepts a connection there ("auto": the
    cluster this machine last started or joined)."""
    if address.startswith("ray://"):
        hostport = address[len("ray://"):]
    else:
        try:
            # ray: only joining a cluster needs it
            from ray._private.services import canonicalize_bootstrap_address_or_die

            hostport = canonicalize_bootstrap_address_or_die(address)
        except Exception as e:  # "Could not find any running Ray instance", a bad address
            raise RayConnectionError(connection_advice(address, e)) from None
    host, _, port = hostport.rpartition(":")
    try:
        socket.create_connection((host, int(port)), timeout=timeout_s).close()
    except (OSError, ValueError) as e:
        raise RayConnectionError(
            f"could not join the Ray cluster at {address!r}: nothing answers at {hostport} ({e}). Is a "
            "cluster running there (`ray status` on the head node) and reachable from this machine?") from None


def connection_advice(address: str, error: BaseException) -> str:
    """What went wrong joining a cluster, and what to do about it."""
    chain, e = [], error
    while e is not None and len(chain) < 8:
        chain.append(f"{type(e).__name__}: {e}")
        e = e.__cause__ or e.__context__
    text = " ".join(chain)
    first = _first_line(error)
    if "Authentication" in text or "InvalidAuthToken" in text:
        return _token_advice(address)
    return (f"could not join the Ray cluster at {address!r} ({first}). Is a cluster running there "
            "(`ray status` on the head node) and reachable from this machine? Without --address, "
            "prunerzero starts a local Ray of its own.")


def _token_advice(address: str) -> str:
    """The cluster refused this machine's (missing, unsent or wrong) token: which, and the fix."""
    where = f"could not join the Ray cluster at {address!r}: it uses token authentication"
    if address != "auto" and _token_here() and not _token_mode():  # "auto" turns token mode on by itself
        return (f"{where}, and this machine has a token but did not send it: Ray sends it to an explicit "
                "--address only with RAY_AUTH_MODE=token. Set RAY_AUTH_MODE=token too (see README, 'A Ray cluster').")
    found = "its token here is not the cluster's" if _token_here() else "this machine does not have its token"
    return (f"{where} and {found}. Copy the head node's token (`ray get-auth-token` there, or its "
            "~/.ray/auth_token) to ~/.ray/auth_token here, or set RAY_AUTH_TOKEN / RAY_AUTH_TOKEN_PATH, with "
            "RAY_AUTH_MODE=token (see README, 'A Ray cluster').")


def _token_mode() -> bool:
    return os.environ.get("RAY_AUTH_MODE", "").lower() == "token"


def _token_here() -> bool:
    """Whether a Ray token is on this machine where Ray looks: RAY_AUTH_TOKEN, the file
    RAY_AUTH_TOKEN_PATH names, or ~/.ray/auth_token."""
    path = os.environ.get("RAY_AUTH_TOKEN_PATH")
    return bool(os.environ.get("RAY_AUTH_TOKEN")) or Path(path or Path.home() / ".ray" / "auth_token").is_file()
