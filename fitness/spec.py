"""What a fitness value is measured on: `EvalSpec`, light and picklable (it travels to Ray actors).

A spec names the model, the corpus split, the protocol, the pruning mode with its target and the
fitness measure. Its `cache_key` is what a fitness value depends on besides the candidate (a
candidate that applies a metric, as an allocation does, carries the metric in its own key).
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field

from prunerzero.core.protocol import Protocol
from prunerzero.pruning.modes import DEFAULT_MODE, get_mode, target_fields

from .measures import MEASURES

SPLITS = ("train", "valid", "test")


@dataclass(frozen=True)
class EvalSpec:
    """Everything needed to build an evaluator anywhere."""

    model: str = "smollm2-135m"
    corpus: str = "austen"
    split: str = "valid"  # a search never sees "test"
    protocol: Protocol = field(default_factory=Protocol)
    device: str = "auto"  # "auto" picks cuda when there is one
    dtype: str = "auto"  # "auto": bf16 on GPU, fp32 on CPU
    mode: str = DEFAULT_MODE  # pruning/modes.py
    target: dict = field(default_factory=dict)  # the mode's target fields (defaults filled in)
    fitness: str = "perplexity"  # fitness/measures.py

    def __post_init__(self) -> None:
        if self.split not in SPLITS:
            raise ValueError(f"unknown split {self.split!r}: use {', '.join(SPLITS)}")
        if self.fitness not in MEASURES:
            raise ValueError(f"unknown fitness {self.fitness!r}: use one of {', '.join(MEASURES)}")
        resolved = target_fields(get_mode(self.mode).make_target(self.target))
        object.__setattr__(self, "target", resolved)  # every field explicit: equal specs, equal keys

    def prune_target(self):
        return get_mode(self.mode).make_target(self.target)

    def describe_target(self) -> str:
        return f"{self.mode}: {self.prune_target().describe()}"

    def cache_key(self) -> str:
        """What a fitness value depends on besides the candidate (the device does not count). For
        the unstructured mode measured by perplexity the key is the one earlier versions wrote, so
        their fitness caches still answer."""
        d = asdict(self)
        d.pop("device")
        later = {"update": "none", "allocation": "uniform"}  # target fields added since, at their defaults
        if (self.mode == "unstructured" and self.fitness == "perplexity"
                and all(self.target.get(k) == v for k, v in later.items())):
            for k in ("mode", "fitness"):
                d.pop(k)
            d |= {k: v for k, v in d.pop("target").items() if k not in later}
        return hashlib.sha256(json.dumps(d, sort_keys=True, default=str).encode()).hexdigest()[:16]
