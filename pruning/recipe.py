"""A pruning mode is one recipe: everything the rest of the house needs to know about it, in one object.

Every mode is (structure, scores, intervention) — ARCHITECTURE.md, "Pruning modes: one family". Its
package (`pruning/<mode>/`) builds one `Recipe` in its `__init__.py` (`RECIPE`), and the registry
(`pruning/modes.py`) lists the packages. The CLI, export, the campaign config check, the problems
registry and the leaderboard read the recipe and never name a mode:

- `target`: a frozen dataclass of the mode's budget (its fields are the CLI options and the
  campaign's `[target]` table; `describe()` is the leaderboard's `budget` column);
- `apply(ctx, candidate, target) -> PruneReport`: prune the context's model in place with a
  candidate — a metric (every mode takes one: a campaign can evolve metrics *for* any mode), one
  of the mode's `methods`, or one of its candidate `kinds`;
- `methods`: the mode's table name -> function for what is not a metric (SparseGPT, ShortGPT,
  REAP, …); `apply` looks methods up in it (no `if name == …` chains); `method_stats` names the
  methods that calibrate otherwise than the protocol says (SparseGPT: block by block);
- `options`: the target fields that have a CLI option of their own (`--sparsity`, `--latency`, …;
  the rest are `--set KEY=VALUE`), and `sweep`: the field a leaderboard run sweeps over a
  comma-separated option (`--latency 0.8,0.6`); `targets`, when given, builds a leaderboard's
  targets from the options itself (the unstructured mode's sparsities x N:M patterns);
- `leaderboard_metrics`: the candidates a leaderboard evaluates when none are named (each one the
  mode applies), and `columns`: the measurements of its own its reports carry (`report.extra`);
- `kinds`: the candidate kinds only this mode applies, name -> class with `from_data(data)`
  (candidates.py decodes them; a candidate of a kind is refused by every other mode);
- `problems`: the search problems (`[search] problem`, evolve/problems.py) a campaign in this mode
  may run;
- `save` and `reshaped`: for a mode whose pruned model transformers cannot express, how it is saved
  and the (marker file, loader) that `prunerzero.models.loading` rebuilds it with;
- `writes_weights`, `check(ctx, target)` (fail before any work when the model cannot take this
  target), `default` (the candidate `prunerzero prune` uses when none is given);
- `identity(target)`: the target in full (every field), the key of one budget in result tables;
- `measure(report) -> str`: what a pruning achieved in the mode's own unit, in words (`prunerzero
  prune` prints it): weight sparsity by default; a predicted latency, a skip ratio, experts kept.

To add a mode: ARCHITECTURE.md, "Where to add … a pruning mode".
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

from prunerzero.core.fields import build
from prunerzero.primitives.metric import resolve_metric

from .candidates import Method, read_candidate_file

DEFAULT_MODE = "unstructured"  # the mode of a command, a spec or a campaign that names none
DEFAULT_METRIC = "wanda"  # a mode's default candidate unless its recipe names another


class ModeError(ValueError):
    """An unknown mode, or a target or candidate the mode cannot take."""


def _no_check(ctx, target) -> None:
    return None


def weight_sparsity(report) -> str:
    """The default budget measure: the share of the prunable weights that are zero."""
    return f"weight sparsity {report.sparsity:.4f}"


@dataclass(frozen=True)
class Recipe:
    name: str
    summary: str
    target: type
    apply: Callable
    methods: Mapping[str, Callable] = field(default_factory=dict)
    method_stats: Mapping[str, str] = field(default_factory=dict)
    writes_weights: bool = True
    check: Callable = _no_check
    save: Callable | None = None  # (ctx, report, out_dir) -> None; default: save_pretrained
    reshaped: tuple[str, Callable] | None = None  # (marker file, loader(path, dtype)) of what `save` wrote
    default: str = DEFAULT_METRIC
    options: tuple[str, ...] = ()
    sweep: str = ""
    targets: Callable | None = None  # (option name -> text or None) -> list of target field dicts
    leaderboard_metrics: tuple[str, ...] = (DEFAULT_METRIC,)
    columns: tuple[str, ...] = ()
    kinds: Mapping[str, type] = field(default_factory=dict)
    problems: tuple[str, ...] = ("metric",)
    measure: Callable = weight_sparsity  # (PruneReport) -> str: the budget achieved, in the mode's own unit

    def make_target(self, fields: Mapping | None = None, where: str = "target"):
        """The mode's target from a mapping of its fields, keys and types checked; errors name
        the field (`target.sparsity: …`) and the mode."""
        try:
            return build(self.target, dict(fields or {}), where, ModeError)
        except ModeError as e:
            raise ModeError(f"{e} (mode {self.name!r})") from None

    def method(self, name: str) -> Method:
        """The candidate naming one of this mode's methods."""
        return Method(name, stats_mode=self.method_stats.get(name, ""))

    def candidate(self, spec):
        """A method of this mode by name, a saved candidate (`.json`, e.g. an exported
        allocation), else a metric (name, expression or file)."""
        return resolve_candidate(spec, self.methods, self.method_stats)

    def leaderboard_targets(self, options: Mapping[str, str | None]) -> list[dict]:
        """One dict of target fields per target a leaderboard run measures, from the CLI's option
        texts (option name -> text, None when not given): the `sweep` field takes each
        comma-separated value of its option; the other dedicated options the target has are passed
        once (`--group`)."""
        if self.targets is not None:
            return self.targets(options)
        names = {f.name for f in dataclasses.fields(self.target)}
        base = {k: options[k] for k in self.options if k != self.sweep and k in names and options.get(k) is not None}
        values = options.get(self.sweep) if self.sweep else None
        if values is None:
            return [base]
        return [base | {self.sweep: option_number(x, f"--{self.sweep}")} for x in option_list(values)]

    def identity(self, target) -> str:
        """The whole target as one canonical string — the mode and every field, sorted — so two
        budgets are one row of a result table only when they are the same budget."""
        return json.dumps({"mode": self.name, "target": dataclasses.asdict(target)}, sort_keys=True, default=str)


def resolve_candidate(spec, methods: Mapping[str, Callable], method_stats: Mapping[str, str] | None = None):
    """A method named in `methods`, a saved candidate (`.json`), else a metric (name, expression or
    file); what is not a string is a candidate already. (A mode resolving a name of its own target,
    such as the skip mode's `router_init`, calls this with its table.)"""
    if isinstance(spec, str) and spec.strip().lower() in methods:
        name = spec.strip().lower()
        return Method(name, stats_mode=(method_stats or {}).get(name, ""))
    if isinstance(spec, str) and spec.strip().endswith(".json"):
        return read_candidate_file(spec.strip())
    return resolve_metric(spec) if isinstance(spec, str) else spec


def option_list(text: str) -> list[str]:
    """The items of a comma-separated option."""
    return [t.strip() for t in text.split(",") if t.strip()]


def option_number(text: str, option: str) -> float:
    try:
        return float(text)
    except ValueError:
        raise ValueError(f"{option}: {text!r} is not a number") from None


def target_fields(target) -> dict:
    return dataclasses.asdict(target)


def unsupported(mode: str, candidate) -> ModeError:
    return ModeError(f"mode {mode!r} cannot apply a {type(candidate).__name__} candidate")
