"""Candidates: what evaluation and search try on a model, of any kind, as objects and as plain data.

A candidate is whatever a mode can apply: a metric (the Pruner-Zero search's individuals), a named
method of the mode (SparseGPT, ShortGPT, …), a metric with a sparsity per block (an allocation,
the GA's individuals), a set of masks, and what the mode issues add (expert plans, …). Each has a
canonical `key` (the fitness cache's key and the de-duplication key) and a plain-data form
(`encode` / `decode`: strings, numbers, lists) that travels to Ray actors and into run
directories, so nothing is ever pickled to disk. A bare string is a metric expression, as before.

Data never runs code: a metric named in a candidate's data (an allocation's `metric`, a plan's
`order`) may be a built-in, an expression or an exported file (its EXPRESSION is read, nothing in
it runs), never a Python file to import — `decode` refuses one, naming the field.

To add a kind: a frozen dataclass with `key`, `name`, `formula`, `to_data()` and the classmethod
`from_data(data)`, named in its mode's recipe (`kinds`); registering the recipe adds it to `KINDS`.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path

import torch

from prunerzero.primitives.metric import CallableMetric, Metric, resolve_metric

from .masks import MaskDigest


class CandidateError(ValueError):
    """A candidate's data that does not describe a candidate (the message names the field)."""


@dataclass(frozen=True)
class Method:
    """A mode's named method that is not a metric (it may update weights or read other signals)."""

    name: str
    needs: frozenset[str] = frozenset()
    stats_mode: str = ""  # how it calibrates, when not per the protocol ("sequential" for SparseGPT)

    @property
    def key(self) -> str:
        return f"method:{self.name}"

    @property
    def formula(self) -> str:
        return f"<method {self.name}>"

    def to_data(self) -> dict:
        return {"kind": "method", "name": self.name}


@dataclass(frozen=True)
class Allocation:
    """A metric applied with one sparsity per decoder block (non-uniform sparsity, OWL- or
    EvoPress-style). `metric` is the metric's spec (a name, an expression, a file)."""

    metric: str
    sparsities: tuple[float, ...]

    def __post_init__(self) -> None:
        if not self.sparsities or any(not 0.0 <= s < 1.0 for s in self.sparsities):
            raise CandidateError(f"allocation sparsities must be in [0, 1), got {list(self.sparsities)}")

    @cached_property
    def resolved(self) -> Metric | CallableMetric:
        return resolve_metric(self.metric, allow_code=False)  # an allocation travels as data: it never imports

    @property
    def needs(self) -> frozenset[str]:
        return self.resolved.needs

    @property
    def name(self) -> str:
        return f"allocation of {self.resolved.name}"

    @property
    def key(self) -> str:
        return allocation_key(self.sparsities, self.resolved.key)

    @property
    def formula(self) -> str:
        return f"{self.resolved.formula} @ [{', '.join(f'{s:.3g}' for s in self.sparsities)}]"

    def to_data(self) -> dict:
        return {"kind": "allocation", "metric": self.metric, "sparsities": [float(s) for s in self.sparsities]}

    @classmethod
    def from_data(cls, data: dict) -> Allocation:
        sparsities = _field(data, "sparsities", list)
        if not all(isinstance(s, (int, float)) and not isinstance(s, bool) for s in sparsities):
            raise CandidateError(f"allocation sparsities must be numbers, got {sparsities!r}")
        return cls(_field(data, "metric", str), tuple(float(s) for s in sparsities))


def allocation_key(sparsities, metric_key: str) -> str:
    return f"allocation[{','.join(f'{s:.6g}' for s in sparsities)}]:{metric_key}"


def key_sparsities(key: str) -> tuple[float, ...]:
    """The sparsities an `allocation_key` holds."""
    if not key.startswith("allocation[") or "]:" not in key:
        raise CandidateError(f"not an allocation key: {key!r:.80}")
    return tuple(float(s) for s in key[len("allocation["):key.index("]:")].split(","))


@dataclass(frozen=True, eq=False)
class MaskSet:
    """Masks given directly (True = pruned), by unit name: the output of an optimiser, say."""

    masks: Mapping[str, torch.Tensor] = field(repr=False)
    name: str = "masks"
    needs: frozenset[str] = frozenset()

    @property
    def key(self) -> str:
        digest = MaskDigest()
        for unit_name in sorted(self.masks):
            digest.add(unit_name, self.masks[unit_name])
        return f"masks:{digest.hexdigest()}"

    @property
    def formula(self) -> str:
        return f"<{len(self.masks)} masks>"

    def to_data(self) -> dict:
        raise CandidateError("a mask set does not travel as plain data: evaluate it in process")


def _metric(data: dict):
    return Metric.from_expression(_field(data, "expression", str))


def _method(data: dict):
    return Method(_field(data, "name", str))


# The kinds every mode takes; a mode's own kinds (an allocation, an expert plan) join when the
# registry (modes.py) registers its recipe.
KINDS: dict[str, Callable[[dict], object]] = {"metric": _metric, "method": _method}
METRIC_FIELDS = ("metric", "order")  # fields of a kind's data that may name a metric file


def data_metric(spec: str, where: str) -> Metric | CallableMetric:
    """The metric a name read from data gives, never importing a file (`where` names the field)."""
    try:
        return resolve_metric(spec, allow_code=False)
    except (ValueError, KeyError) as e:
        raise CandidateError(f"{where}: {e.args[0] if isinstance(e, KeyError) and e.args else e}") from None


def refuse_code(data: Mapping, where: Callable[[str], str]) -> None:
    """Refuse a field of `data` naming a Python file without EXPRESSION before anything resolves
    it (it may be resolved later, when the data's origin is forgotten); `where(field)` names it."""
    for name in METRIC_FIELDS:
        value = data.get(name)
        if isinstance(value, str) and ".py" in value:
            data_metric(value, where(name))


def _field(data: dict, name: str, kind: type):
    value = data.get(name)
    if not isinstance(value, kind):
        raise CandidateError(f"{data.get('kind', 'candidate')} candidate: field {name!r} must be a "
                             f"{kind.__name__}, got {value!r:.80}")
    return value


def read_candidate_file(path) -> object:
    """A candidate saved as JSON data (`prunerzero export` of an allocation or joint campaign):
    plain data, nothing executed — a metric it names is never imported. Errors name the file."""
    try:
        data = json.loads(Path(path).read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise CandidateError(f"{path}: not a readable candidate file ({e})") from None
    try:
        return decode(data)  # fields a kind does not read (the export's provenance) are left alone
    except CandidateError as e:
        raise CandidateError(f"{path}: {e}") from None


def decode(data: str | dict):
    """The candidate described by plain data (a string is a metric expression)."""
    if isinstance(data, str):
        return Metric.from_expression(data)
    if not isinstance(data, dict) or data.get("kind") not in KINDS:
        kind = data.get("kind") if isinstance(data, dict) else type(data).__name__
        raise CandidateError(f"unknown candidate kind {kind!r}; kinds: {', '.join(KINDS)}")
    refuse_code(data, lambda name: f"{data.get('kind')} candidate: field {name!r}")
    return KINDS[data["kind"]](data)


def encode(candidate) -> str | dict:
    """Plain data for a candidate (a metric with a tree: its expression string)."""
    if isinstance(candidate, Metric):
        return candidate.formula
    if isinstance(candidate, CallableMetric):
        raise CandidateError(f"metric {candidate.name!r} is a Python function without an expression: "
                             "it cannot travel to an evaluator process")
    return candidate.to_data()


def label(data: str | dict) -> str:
    """A one-line description of a candidate's data (for logs and evaluations.csv)."""
    if isinstance(data, str):
        return data
    try:
        return decode(data).formula
    except (CandidateError, ValueError, KeyError):
        return str(data)[:200]
