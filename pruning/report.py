"""What a pruning mode achieved: the report every mode returns (sparsity per unit, the fingerprint
of its decisions, its own measurements)."""

from __future__ import annotations

from dataclasses import dataclass, field

import pandas as pd
import torch

from .masks import MaskDigest


@dataclass
class PruneReport:
    """What a mode did: achieved sparsity per unit and in total, a fingerprint of the change, and
    any measurements of the mode's own (`extra`: leaderboard columns such as tokens_per_s)."""

    target: object  # the mode's target (PruneTarget for unstructured)
    method: str
    rows: list[dict] = field(default_factory=list)  # name, block, role, expert, numel, zeros
    seconds: float = 0.0
    extra: dict = field(default_factory=dict)
    _masks: MaskDigest = field(default_factory=MaskDigest, repr=False)

    def add_mask(self, name: str, mask: torch.Tensor) -> None:
        """Fold a unit's mask into the fingerprint (units in pruning order)."""
        self._masks.add(name, mask)

    def add_plan(self, name: str, plan) -> None:
        """Fold a structural decision into the fingerprint (kept heads, experts, a merge matrix —
        anything whose repr is exact): equal fingerprints, the same model after the mode."""
        self._masks.add_data(name, repr(plan).encode())

    @property
    def masked_units(self) -> int:
        return len(self._masks)

    @property
    def fingerprint(self) -> str:
        """Digest of every mask and plan added: equal fingerprints, the same weights pruned — and
        so the same pruned model, whatever formula chose them. "" when nothing was added (a
        method such as SparseGPT that also updates the weights kept)."""
        return self._masks.hexdigest()

    def add(self, unit, zeros: int) -> None:
        self.rows.append({"name": unit.name, "block": unit.block, "role": unit.role, "expert": unit.expert,
                          "numel": unit.weight.numel(), "zeros": int(zeros)})

    def add_units(self, units) -> None:
        """Record each unit's zeros as they are now, with one device→host transfer for all of
        them (not one synchronisation per unit on the per-candidate path). Counted by comparison:
        torch.count_nonzero branches per element, 5x slower on half-zero weights (measured)."""
        units = list(units)
        if units:
            for unit, zeros in zip(units, torch.stack([(u.weight == 0).sum() for u in units]).tolist()):
                self.add(unit, zeros)

    @property
    def sparsity(self) -> float:
        numel = sum(r["numel"] for r in self.rows)
        return sum(r["zeros"] for r in self.rows) / numel if numel else 0.0

    def table(self) -> pd.DataFrame:
        df = pd.DataFrame(self.rows, columns=["name", "block", "role", "expert", "numel", "zeros"])
        df["sparsity"] = df["zeros"] / df["numel"]
        return df
