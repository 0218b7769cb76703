"""What a pruning mode works on: one model with its data, its statistics and its way back.

Modes receive a `PruneContext` and nothing else, so they never know whether an evaluator in a
search, a leaderboard run or `prunerzero prune` called them. Every change goes through
`ctx.edits` (interventions.py) or into the prunable weights, which the caller's `DenseSnapshot`
restores; `ctx.remember(key, compute)` keeps what a mode computes once per model (routing statistics, latency
tables, dense references) across the candidates of a search.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import nn

from .interventions import Edits


@dataclass(eq=False)
class PruneContext:
    model: nn.Module
    adapter: object  # models.adapter.ModelAdapter
    calibration: torch.Tensor  # (windows, seq_len) token ids from the train split
    stats: Callable[[frozenset], object]  # needs -> LayerStats of the dense model (computed once, cached)
    stats_mode: str = "one-shot"  # or "sequential": statistics of each block from the pruned prefix
    edits: Edits = field(default_factory=Edits)
    tokenizer: object = None
    log: Callable[[str], None] = lambda msg: None
    memo: dict = field(default_factory=dict)
    # (n, seq_len, seed) -> (n, seq_len) windows of the train split: for modes that train (routers)
    train_windows: Callable[[int, int, int], torch.Tensor] | None = None

    def remember(self, key, compute: Callable[[], object]):
        """`compute()` once per model, then the same value for every later candidate: what a
        mode derives from the dense model (gradients, removal losses, latency tables)."""
        if key not in self.memo:
            self.memo[key] = compute()
        return self.memo[key]

    def identity(self) -> str:
        """The model's class, shape and a digest of its prunable weights: what caches of values
        derived from the dense model (routers, removal losses) are keyed by. Computed once."""
        def compute():
            digest = sum(float(u.weight.double().abs().sum()) for u in self.units)
            hidden = self.model.get_input_embeddings().weight.shape[1]
            return f"{type(self.model).__name__}|{hidden}|{len(self.structure.blocks)}|{digest:.9e}"
        return self.remember("identity", compute)

    @property
    def units(self):
        return self.adapter.prunable()

    @property
    def structure(self):
        return self.adapter.structure

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device
