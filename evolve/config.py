"""One validated campaign configuration, read from TOML.

Defaults live here and nowhere else. Every key is type-checked and unknown keys are errors that
name the key (`search.populaton: unknown key; known: …`). The resolved configuration
(`to_dict`) is written into the run directory and into every checkpoint, and `from_dict` reads
it back, so a resumed campaign runs exactly the configuration it started with.

```toml
name = "smoke"
[eval]       # what a candidate is scored on: model, corpus, mode, fitness (the split is always "valid")
[target]     # the mode's budget: sparsity, pattern, group for "unstructured" (pruning/modes.py)
[protocol]   # measurement protocol overrides: seq_len, calib_windows, eval_windows, seed, ...
[search]     # the engine: problem ("metric": GP; "allocation": GA; "joint": both), population, generations, seed ...
[problem]    # the problem's own options (the allocation's metric, levels, step ...)
[backend]    # "serial" or "ray": workers, resources per worker, retries, address
[fidelity]   # successive halving on evaluation windows (rungs = 1: off)
```
Earlier configs wrote the unstructured target into `[eval]` (sparsity, pattern, group); they
are read as `[target]` still.
"""

from __future__ import annotations

import tomllib
from dataclasses import asdict, dataclass, field
from pathlib import Path

from prunerzero.core.fields import build
from prunerzero.core.protocol import Protocol
from prunerzero.fitness.spec import EvalSpec
from prunerzero.pruning.modes import DEFAULT_MODE

from .problem import operator_set
from .problems import PROBLEMS, check_problem


class ConfigError(ValueError):
    """An invalid campaign configuration; the message names the offending key."""


LEGACY_TARGET_KEYS = ("sparsity", "pattern", "group")  # [eval] keys of the unstructured target before modes


@dataclass(frozen=True)
class EvalConfig:
    model: str = "smollm2-135m"  # "toy" selects the cheap synthetic evaluator (evolve/toy.py)
    corpus: str = "austen"
    mode: str = DEFAULT_MODE  # the pruning mode the candidates are scored under
    fitness: str = "perplexity"  # or "kl" (to the dense model's next-token distribution)
    device: str = "auto"
    dtype: str = "auto"


@dataclass(frozen=True)
class SearchConfig:
    problem: str = "metric"  # what is evolved: "metric" (GP over trees), "allocation" (GA), "joint" (both; evolve/problems.py)
    population: int = 50
    generations: int = 20
    tournament: int = 3
    cx_prob: float = 0.7
    mut_prob: float = 0.2
    point_mutation: float = 0.5  # share of mutations that replace one node (else a subtree)
    init_min_depth: int = 1  # ramped half-and-half depths of the initial trees
    init_max_depth: int = 4
    max_depth: int = 8  # static limits on offspring (DEAP height: a terminal has height 0)
    max_size: int = 30
    operators: str = "pruner-zero"  # or "extended" (adds rownorm, colnorm)
    hall_of_fame: int = 20
    elites: int = 2  # best of the hall of fame copied unchanged into the next generation
    max_redraws: int = 10  # an individual rejected by OOS is replaced by a fresh random one
    clone_penalty: bool = True  # offspring measuring exactly a known fitness (same masks) lose it
    oos_workers: int = 0  # processes simplifying a generation's new trees side by side (0: the driver alone)
    seed: int = 0

    def check(self) -> None:
        _require(self.problem in PROBLEMS, "search.problem",
                 f"unknown problem {self.problem!r}; problems: {', '.join(PROBLEMS)}")
        _require(self.population >= 2, "search.population", "must be at least 2")
        _require(self.generations >= 0, "search.generations", "must be >= 0")
        _require(1 <= self.tournament <= self.population, "search.tournament", "must be in [1, population]")
        for name in ("cx_prob", "mut_prob", "point_mutation"):
            _require(0.0 <= getattr(self, name) <= 1.0, f"search.{name}", "must be in [0, 1]")
        _require(0 <= self.init_min_depth <= self.init_max_depth, "search.init_min_depth", "must be in [0, init_max_depth]")
        _require(self.init_max_depth <= self.max_depth, "search.max_depth", "must be >= init_max_depth")
        _require(self.max_size >= 1, "search.max_size", "must be >= 1")
        _require(self.hall_of_fame >= 1, "search.hall_of_fame", "must be >= 1")
        _require(0 <= self.elites <= min(self.hall_of_fame, self.population - 1), "search.elites",
                 "must be in [0, min(hall_of_fame, population - 1)]")
        _require(self.max_redraws >= 0, "search.max_redraws", "must be >= 0")
        _require(0 <= self.oos_workers <= 256, "search.oos_workers", "must be in [0, 256]")
        try:
            operator_set(self.operators)
        except ValueError as e:
            raise ConfigError(f"search.operators: {e}") from None


@dataclass(frozen=True)
class BackendConfig:
    kind: str = "serial"  # "serial" (in-process) or "ray"
    workers: int = 1  # evaluator actors (model replicas)
    cpus_per_worker: float = 1.0
    gpus_per_worker: float = 0.0  # 1.0 on a GPU machine: one replica per GPU
    retries: int = 2  # a candidate whose worker died is retried this many times
    timeout_s: float = 0.0  # an evaluation running longer is treated as a dead worker; 0: none
    address: str = ""  # Ray cluster to join ("auto", "ray://…"); "" starts a local Ray (or uses RAY_ADDRESS)
    dashboard: bool = False  # start Ray's dashboard with a local Ray

    def check(self) -> None:
        _require(self.kind in ("serial", "ray"), "backend.kind", f"must be 'serial' or 'ray', got {self.kind!r}")
        _require(self.workers >= 1, "backend.workers", "must be >= 1")
        _require(self.cpus_per_worker >= 0 and self.gpus_per_worker >= 0, "backend.cpus_per_worker",
                 "resources must be >= 0")
        _require(self.retries >= 0, "backend.retries", "must be >= 0")
        _require(self.timeout_s >= 0, "backend.timeout_s", "must be >= 0")


@dataclass(frozen=True)
class FidelityConfig:
    rungs: int = 1  # successive-halving rungs; 1 = every candidate on the full budget
    eta: int = 2  # each rung keeps the best 1/eta and gives them eta times the windows

    def check(self) -> None:
        _require(self.rungs >= 1, "fidelity.rungs", "must be >= 1")
        _require(self.eta >= 2, "fidelity.eta", "must be >= 2")


@dataclass(frozen=True)
class CampaignConfig:
    name: str = "campaign"
    runs_dir: str = "results/runs"
    cache: str = ""  # fitness cache file; "" = the shared default under the prunerzero cache dir
    eval: EvalConfig = field(default_factory=EvalConfig)
    target: dict = field(default_factory=dict)  # the mode's target fields
    protocol: Protocol = field(default_factory=Protocol)
    search: SearchConfig = field(default_factory=SearchConfig)
    problem: dict = field(default_factory=dict)  # the problem's options
    backend: BackendConfig = field(default_factory=BackendConfig)
    fidelity: FidelityConfig = field(default_factory=FidelityConfig)

    def __post_init__(self) -> None:
        _require(bool(self.name) and "/" not in self.name, "name", "must be a non-empty name without '/'")
        for part in (self.search, self.backend, self.fidelity):
            part.check()
        try:
            spec = self.eval_spec()
        except ValueError as e:
            where = "" if str(e).startswith("target") else "eval: "
            raise ConfigError(f"{where}{e}") from None
        object.__setattr__(self, "target", dict(spec.target))  # defaults filled in: the resolved config
        try:
            check_problem(self.search.problem, spec.mode)  # the mode's recipe names the problems it accepts
        except ValueError as e:
            raise ConfigError(str(e)) from None
        _require(self.protocol.eval_windows >= self.fidelity.eta ** (self.fidelity.rungs - 1),
                 "fidelity.rungs", "leaves less than one evaluation window on the first rung")

    def eval_spec(self) -> EvalSpec:
        """What a candidate's fitness is measured on. A search only ever sees the valid split."""
        return EvalSpec(**asdict(self.eval), target=self.target, split="valid", protocol=self.protocol)

    def to_dict(self) -> dict:
        return asdict(self)

    def with_generations(self, generations: int) -> "CampaignConfig":
        """The same campaign run to another number of generations (an extension continues the
        search's RNG stream, so it equals a campaign configured that long from the start)."""
        return from_dict({**self.to_dict(), "search": {**asdict(self.search), "generations": generations}})

    def with_backend(self, **changes) -> "CampaignConfig":
        """The same campaign on another backend (results do not depend on it)."""
        return from_dict({**self.to_dict(), "backend": {**asdict(self.backend), **changes}})


def _require(ok: bool, key: str, message: str) -> None:
    if not ok:
        raise ConfigError(f"{key}: {message}")


def from_dict(data: dict) -> CampaignConfig:
    return build(CampaignConfig, _legacy_target(data), "", ConfigError)


def _legacy_target(data: dict) -> dict:
    """Move an earlier version's [eval] sparsity / pattern / group into [target]."""
    if not isinstance(data, dict) or not isinstance(data.get("eval"), dict):
        return data
    moved = {k: data["eval"][k] for k in LEGACY_TARGET_KEYS if k in data["eval"]}
    if not moved:
        return data
    target = data.get("target") or {}
    if not isinstance(target, dict):
        return data
    both = sorted(set(moved) & set(target))
    if both:
        raise ConfigError(f"eval.{both[0]}: given in [eval] and in [target]; write it in [target] only")
    return {**data, "eval": {k: v for k, v in data["eval"].items() if k not in moved}, "target": {**moved, **target}}


def load_config(path: str | Path) -> CampaignConfig:
    path = Path(path)
    try:
        data = tomllib.loads(path.read_text())
    except FileNotFoundError:
        raise ConfigError(f"campaign config {str(path)!r} does not exist") from None
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"{path}: not valid TOML: {e}") from None
    config = from_dict(data)  # unknown keys (a misspelt table) are named first
    if "search" not in data:  # an empty file, or one without its search, would start a default campaign
        raise ConfigError(f"{path}: no [search] table{' (the file is empty)' if not data else ''}; a campaign "
                          "config names at least its search (e.g. [search] generations = 10): see experiments/smoke.toml")
    return config
