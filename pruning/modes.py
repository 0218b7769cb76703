"""The pruning modes, one family: mode name → target type → apply.

Every mode is (structure, scores, intervention) — docs/DESIGN.md, "Pruning modes: one family". Here
each is registered once with:

- `target`: a frozen dataclass of the mode's budget (its fields are the CLI options and the
  campaign's `[target]` table; `describe()` is the leaderboard's `budget` column);
- `apply(ctx, candidate, target) -> PruneReport`: prune the context's model in place with a
  candidate — a metric (every mode takes one: a campaign can evolve metrics *for* any mode), one
  of the mode's `methods`, or a kind of candidate the mode knows (candidates.py);
- `methods`: name → candidate for what is not a metric (SparseGPT, …);
- `writes_weights`: whether apply writes into the prunable weights (restored from the dense
  snapshot) or changes only parameters, modules and attributes through `ctx.edits`;
- `check(ctx, target)`: fail before any work when the model cannot take this target;
- `default`: the candidate `prunerzero prune` uses when none is given.

To add a mode: a module in pruning/ with its target and apply, and one `register(Mode(...))`
call at the end of this file (imported here so the registry is always complete).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

from prunerzero.core.fields import build
from prunerzero.models.loading import RESHAPED
from prunerzero.primitives.metric import resolve_metric

from .candidates import Method, read_candidate_file


class ModeError(ValueError):
    """An unknown mode, or a target or candidate the mode cannot take."""


@dataclass(frozen=True)
class Mode:
    name: str
    summary: str
    target: type
    apply: Callable
    methods: Mapping[str, Method] = field(default_factory=dict)
    writes_weights: bool = True
    check: Callable = lambda ctx, target: None
    save: Callable | None = None  # (ctx, report, out_dir) -> None; default: save_pretrained
    default: str = "wanda"

    def make_target(self, fields: Mapping | None = None, where: str = "target"):
        """The mode's target from a mapping of its fields, keys and types checked; errors name
        the field (`target.sparsity: …`) and the mode."""
        try:
            return build(self.target, dict(fields or {}), where, ModeError)
        except ModeError as e:
            raise ModeError(f"{e} (mode {self.name!r})") from None

    def candidate(self, spec):
        """A method of this mode by name, a saved candidate (`.json`, e.g. an exported
        allocation), else a metric (name, expression or file)."""
        if isinstance(spec, str) and spec.strip().lower() in self.methods:
            return self.methods[spec.strip().lower()]
        if isinstance(spec, str) and spec.strip().endswith(".json"):
            return read_candidate_file(spec.strip())
        return resolve_metric(spec) if isinstance(spec, str) else spec


MODES: dict[str, Mode] = {}


def register(mode: Mode) -> Mode:
    MODES[mode.name] = mode
    return mode


def get_mode(name: str) -> Mode:
    try:
        return MODES[name]
    except KeyError:
        raise ModeError(f"unknown pruning mode {name!r}; modes: {', '.join(MODES)}") from None


def target_fields(target) -> dict:
    return dataclasses.asdict(target)


def unsupported(mode: str, candidate) -> ModeError:
    return ModeError(f"mode {mode!r} cannot apply a {type(candidate).__name__} candidate")


# ---------------------------------------------------------------- the registry
from . import apply as _unstructured  # noqa: E402  (the modes register below, after Mode exists)
from .target import PruneTarget  # noqa: E402

register(Mode(
    "unstructured",
    "weights zeroed by a metric, per output row or layer, or N:M (the Pruner-Zero setting)",
    PruneTarget, _unstructured.apply_unstructured,
    methods={"sparsegpt": Method("sparsegpt", stats_mode="sequential")},
    check=_unstructured.check_unstructured,
))

from . import structured as _structured  # noqa: E402

register(Mode(
    "structured",
    "heads, MLP channel groups, sublayers and blocks sliced out under a measured latency budget, chosen by a MILP (MDP)",
    _structured.StructuredTarget, _structured.apply_structured,
    methods=_structured.METHODS, writes_weights=False,
    check=_structured.check_structured,
    save=_structured.save_structured,
))
RESHAPED[_structured.MARKER] = _structured.load_structured

from . import attention as _attention  # noqa: E402

register(Mode(
    "attention",
    "q/k masks optimised by gradient descent to keep each head's attention probabilities (from a metric's masks); "
    "v/o/MLP by the metric or dense",
    _attention.AttentionTarget, _attention.apply_attention, check=_attention.check_attention,
))

from . import skip as _skip  # noqa: E402

register(Mode(
    "skip",
    "attention and MLP sublayers skipped per token by trained routers, compute really skipped (SkipGPT); "
    "static sublayer removal by ShortGPT influence, removal loss or a metric",
    _skip.SkipTarget, _skip.apply_skip, methods=_skip.METHODS, writes_weights=True,
    check=_skip.check_skip, save=_skip.save_skip, default="router",
))
RESHAPED[_skip.MARKER] = _skip.load_skip

from . import experts as _experts  # noqa: E402

register(Mode(
    "experts",
    "routed experts of a Mixture-of-Experts model removed or merged (router rows with them) and fewer active per "
    "token, by a metric with routing statistics, frequency, REAP, NAEE or an evolved plan (EEP)",
    _experts.ExpertsTarget, _experts.apply_experts, methods=_experts.METHODS, writes_weights=False,
    check=_experts.check_experts, save=_experts.save_experts, default="reap",
))
RESHAPED[_experts.MARKER] = _experts.load_experts
