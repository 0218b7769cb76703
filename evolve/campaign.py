"""A campaign is a run directory you can resume from:

```
<runs_dir>/<name>-<YYYYmmdd-HHMMSS>/
  config.json        the resolved configuration (what --resume runs)
  checkpoint.json    after every generation: engine state (population, hall of fame, logbook,
                     RNG states, generation) + config; plain JSON data (never a pickle: run
                     directories are shared, and reading one must not run code), written atomically
  history.csv        one row per generation (HISTORY_COLUMNS)
  hall_of_fame.csv   the hall of fame after the last completed generation (HOF_COLUMNS)
  evaluations.csv    every measurement: status and reason of failures (EVAL_COLUMNS)
```
The fitness cache is the shared SQLite file (`config.cache`), not copied into the run.
Killed at any point, `resume_campaign` continues from the last checkpoint and ends with the
hall of fame an uninterrupted run ends with.
"""

from __future__ import annotations

import csv
import io
import json
import time
from contextlib import contextmanager
from functools import partial
from pathlib import Path

from rich.console import Console

from prunerzero.core.paths import atomic_write_text
from prunerzero.fitness.cache import FitnessCache
from prunerzero.fitness.evaluator import Evaluator
from prunerzero.fitness.pool import Backend, RayBackend, SerialBackend
from prunerzero.fitness.spec import EvalSpec
from prunerzero.primitives.terminals import TERMINALS
from prunerzero.pruning.candidates import label, refuse_code

from . import simplify
from .config import BackendConfig, CampaignConfig, ConfigError, from_dict
from .engine import Engine
from .evaluation import FitnessMap
from .problems import make_problem
from .toy import ToyEvaluator

HISTORY_COLUMNS = ["generation", "best_fitness", "median_fitness", "best_formula", "best_key", "unique",
                   "offspring", "evaluations", "cache_hits", "cache_hit_rate", "phenotype_hits", "rejected", "clones", "failed", "eval_windows",
                   "eval_seconds", "wall_seconds", "refined"]
HOF_COLUMNS = ["rank", "fitness", "windows", "formula", "key", "generation"]  # + the problem's columns
EVAL_COLUMNS = ["generation", "key", "formula", "windows", "value", "status", "reason", "seconds", "cached",
                "same_masks"]
CHECKPOINT = "checkpoint.json"
LEGACY_CHECKPOINT = "checkpoint.pkl"
CHECKPOINT_VERSION = 2


def evaluator_factory(spec: EvalSpec):
    """A picklable zero-argument constructor of the evaluator for `spec` (model "toy": the
    synthetic evaluator; anything else: the real perplexity Evaluator)."""
    if spec.model == "toy":

        return partial(ToyEvaluator, spec)

    # any candidate may read G and X: calibrate both once, up front, not per first use
    return partial(Evaluator, spec, needs=frozenset(TERMINALS))


def make_backend(cfg: BackendConfig, factory) -> Backend:
    if cfg.kind == "serial":
        return SerialBackend(factory)
    return RayBackend(factory, workers=cfg.workers, cpus_per_worker=cfg.cpus_per_worker,
                      gpus_per_worker=cfg.gpus_per_worker, retries=cfg.retries, timeout_s=cfg.timeout_s,
                      address=cfg.address, dashboard=cfg.dashboard)


def new_run_dir(config: CampaignConfig) -> Path:
    base = Path(config.runs_dir) / f"{config.name}-{time.strftime('%Y%m%d-%H%M%S')}"
    run_dir, n = base, 1
    while run_dir.exists():
        n += 1
        run_dir = base.with_name(f"{base.name}-{n}")
    run_dir.mkdir(parents=True)
    return run_dir


def run_campaign(config: CampaignConfig, run_dir: Path | None = None, backend: Backend | None = None,
                 console: Console | None = None) -> Path:
    """Start a campaign in a new run directory (or `run_dir`); return the run directory.
    `backend` overrides the configured one (it is then not closed here). Everything that can be
    checked — the problem's options, the model, the corpus, the target against the model — is
    checked (the evaluators are built) before the run directory is created."""
    console = _console(console)
    cache = _open_cache(config, console)  # a path that is not a cache is refused before anything is made
    with _prepared(config, backend) as (problem, backend):
        run_dir = Path(run_dir) if run_dir else new_run_dir(config)
        run_dir.mkdir(parents=True, exist_ok=True)
        atomic_write_text(run_dir / "config.json", json.dumps(config.to_dict(), indent=2) + "\n")
        return _run(config, problem, run_dir, None, backend, cache, console)


def resume_campaign(run_dir: Path, backend: Backend | None = None, console: Console | None = None,
                    generations: int | None = None, **backend_changes) -> Path:
    """Continue the campaign in `run_dir` from its last checkpoint (or from the start if it
    has none). `generations` extends (or shortens, not below what is done) the campaign;
    `backend_changes` (kind, workers, address, …) change where, never what."""
    run_dir = Path(run_dir)
    if not (run_dir / "config.json").is_file():
        raise FileNotFoundError(f"{run_dir} is not a run directory: it has no config.json")
    state = load_checkpoint(run_dir)
    config = from_dict(state["config"] if state else _read_json(run_dir / "config.json"))
    if generations is not None:
        done = state["engine"]["generation"] if state else -1
        if generations < done:
            raise ConfigError(f"search.generations: {run_dir.name} has already run {done} generations; "
                              f"cannot end it at {generations}")
        config = config.with_generations(generations)
    if backend_changes:
        config = config.with_backend(**backend_changes)
    console = _console(console)
    cache = _open_cache(config, console)
    with _prepared(config, backend) as (problem, backend):
        if generations is not None:
            saved = from_dict(_read_json(run_dir / "config.json")).with_generations(generations)
            atomic_write_text(run_dir / "config.json", json.dumps(saved.to_dict(), indent=2) + "\n")
        return _run(config, problem, run_dir, state, backend, cache, console)


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ConfigError(f"{path}: not valid JSON ({e})") from None


@contextmanager
def _prepared(config: CampaignConfig, backend: Backend | None):
    """The campaign's problem and a started backend (closed on the way out if built here)."""
    _no_code(config)
    problem = make_problem(config)
    own = backend is None
    backend = backend or make_backend(config.backend, evaluator_factory(config.eval_spec()))
    try:
        backend.start()
        yield problem, backend
    finally:
        getattr(problem, "close", lambda: None)()  # the metric problem's OOS processes
        if own:
            backend.close()


def _no_code(config: CampaignConfig) -> None:
    """A config is data (a shared TOML, a run directory's config.json or checkpoint): a metric it
    names may be an exported file, read for its EXPRESSION, never a Python file to import."""
    refuse_code(config.problem, lambda name: f"problem.{name}")


def load_checkpoint(run_dir: Path) -> dict | None:
    """The run's checkpoint as plain data, or None before its first generation. A checkpoint that
    does not parse or does not have the expected fields is an error naming the file; a pickled
    checkpoint of an earlier version is refused unread (unpickling runs code)."""
    path = Path(run_dir) / CHECKPOINT
    if not path.is_file():
        legacy = Path(run_dir) / LEGACY_CHECKPOINT
        if legacy.is_file():
            raise ConfigError(f"{legacy}: a pickled checkpoint of an earlier prunerzero; it is not read, because "
                              "unpickling a file can run code. Start the campaign again, or convert a checkpoint "
                              "you trust with experiments/convert_checkpoint.py")
        return None
    try:
        state = json.loads(path.read_text())
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ConfigError(f"{path}: not a valid checkpoint ({e}); remove it to restart the campaign from scratch") from None
    _check_checkpoint(state, path)
    return state


def _check_checkpoint(state, path: Path) -> None:
    engine = state.get("engine") if isinstance(state, dict) else None
    problems = []
    if not isinstance(state, dict) or state.get("version") != CHECKPOINT_VERSION:
        problems.append(f"version must be {CHECKPOINT_VERSION}")
    if not isinstance(state, dict) or not isinstance(state.get("config"), dict):
        problems.append("no config table")
    if not isinstance(engine, dict):
        problems.append("no engine state")
    else:
        expected = {"generation": int, "population": list, "hall_of_fame": list, "logbook": list,
                    "first_seen": dict, "rng": dict}
        problems += [f"engine.{k} must be a {t.__name__}" for k, t in expected.items() if not isinstance(engine.get(k), t)]
    if problems:
        raise ConfigError(f"{path}: not a valid checkpoint ({'; '.join(problems)}); "
                          "remove it to restart the campaign from scratch")


def _console(console: Console | None) -> Console:
    return console or Console(highlight=False, soft_wrap=True)  # one line per generation, piped too


def _open_cache(config: CampaignConfig, console: Console) -> FitnessCache:
    """The shared fitness cache, its read-back values bounded by the campaign's measure."""
    return FitnessCache(config.cache or None, log=lambda msg: console.print(msg, markup=False),
                        measure=config.eval_spec().fitness)


def _run(config: CampaignConfig, problem, run_dir: Path, state: dict | None, backend: Backend,
         cache: FitnessCache, console: Console) -> Path:
    spec = config.eval_spec()
    fitness = FitnessMap(backend, cache, spec.cache_key(),
                         config.protocol.eval_windows, config.fidelity.rungs, config.fidelity.eta)
    engine = Engine(config.search, fitness, extra_stats=lambda: _fitness_stats(fitness), problem=problem)
    if state:
        simplify.timed_out.update(state.get("oos_timeouts", []))  # decide as the interrupted run did
        try:
            engine.load_state_dict(state["engine"])
        except (KeyError, TypeError, ValueError, IndexError) as e:
            raise ConfigError(f"{run_dir / CHECKPOINT}: its engine state does not load ({type(e).__name__}: "
                              f"{str(e)[:200]}); remove it to restart the campaign from scratch") from None
    _truncate_evaluations(run_dir, engine.generation)
    console.print(f"[bold]{config.name}[/]: {problem.name} search, {spec.model} on {spec.corpus} ({spec.split}), "
                  f"{spec.describe_target()}, fitness {spec.fitness}, {config.protocol.describe()} → {run_dir}")
    while not engine.done:
        record = engine.step()
        _append_evaluations(run_dir, engine.generation, fitness.take_log())
        _save(run_dir, config, engine)
        console.print(progress_line(record, config.search.generations))
    _save(run_dir, config, engine)
    return run_dir


def _fitness_stats(fitness: FitnessMap) -> dict:
    s = fitness.take_stats()
    looked_up = s["cache_hits"] + s["evaluations"] + s["phenotype_hits"]
    return {"evaluations": s["evaluations"], "cache_hits": s["cache_hits"],
            "cache_hit_rate": s["cache_hits"] / looked_up if looked_up else 0.0,
            "phenotype_hits": s["phenotype_hits"], "failed": s["failed"],
            "eval_windows": s["windows"], "eval_seconds": s["eval_seconds"]}


def progress_line(r: dict, generations: int) -> str:
    rate = r["evaluations"] / r["wall_seconds"] if r["wall_seconds"] > 0 else 0.0
    return (f"gen {r['generation']:>3}/{generations}  best [bold green]{r['best_fitness']:.4g}[/] "
            f"{r['best_formula']}  | median {r['median_fitness']:.4g}  {r['evaluations']} evals "
            f"{rate:.2f}/s  cache {r['cache_hit_rate']:.0%}  same masks {r['phenotype_hits']}  rejected {r['rejected']}  "
            f"unique {r['unique']}  {r['wall_seconds']:.1f}s")


# ---------------------------------------------------------------- files
def _save(run_dir: Path, config: CampaignConfig, engine: Engine) -> None:
    """Checkpoint first: history and hall of fame are derived from it, so a kill in between
    leaves nothing that a resume would not rewrite."""
    state = {"version": CHECKPOINT_VERSION, "config": config.to_dict(), "engine": engine.state_dict(),
             "oos_timeouts": sorted(simplify.timed_out)}
    atomic_write_text(run_dir / CHECKPOINT, json.dumps(state, separators=(",", ":")) + "\n")
    atomic_write_text(run_dir / "history.csv", _csv(HISTORY_COLUMNS, list(engine.logbook)))
    atomic_write_text(run_dir / "hall_of_fame.csv",
                      _csv(HOF_COLUMNS + list(engine.problem.columns), hall_of_fame_rows(engine)))


def hall_of_fame_rows(engine: Engine) -> list[dict]:
    problem = engine.problem
    return [{"rank": rank, "fitness": ind.fitness.values[1], "windows": int(ind.fitness.values[0]),
             "formula": problem.describe(ind), "key": ind.key, "generation": engine.first_seen.get(ind.key, ""),
             **problem.fields(ind)}
            for rank, ind in enumerate(engine.hof, start=1)]


def _csv(columns: list[str], rows: list[dict]) -> str:
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=columns, extrasaction="ignore", lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    return buf.getvalue()


def _append_evaluations(run_dir: Path, generation: int, log: list) -> None:
    path = run_dir / "evaluations.csv"
    new = not path.is_file()
    with path.open("a", newline="") as f:
        writer = csv.writer(f, lineterminator="\n")
        if new:
            writer.writerow(EVAL_COLUMNS)
        for key, candidate, m in log:
            r = m.result
            writer.writerow([generation, key, label(candidate), m.windows, r.value, r.status, r.reason,
                             f"{r.seconds:.3f}", int(m.cached), int(not m.cached and not r.measured)])


def _truncate_evaluations(run_dir: Path, generation: int) -> None:
    """Drop rows of generations after the checkpoint (they will be measured again) and a
    partial last line left by a kill."""
    path = run_dir / "evaluations.csv"
    if not path.is_file():
        return
    with path.open(newline="") as f:
        rows = list(csv.reader(f))
    keep = [r for r in rows[1:] if len(r) == len(EVAL_COLUMNS) and r[0].isdigit() and int(r[0]) <= generation]
    buf = io.StringIO()
    csv.writer(buf, lineterminator="\n").writerows([EVAL_COLUMNS, *keep])
    atomic_write_text(path, buf.getvalue())
