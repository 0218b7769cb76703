"""Interventions: every change a mode makes to a model, with one way back.

`Edits` is a journal. Each change records how to undo it; `restore()` undoes them in reverse
order, so the model ends exactly as it was — the same parameter objects, modules and attributes,
hence bit-identical outputs (tested for each kind). The kinds:

- weights written in place (`write`; the evaluator's `DenseSnapshot` is the cheaper way back for
  the masks of every candidate of a search: one copy for its lifetime, not one per candidate);
- parameters replaced (`set_param`): router rows removed, experts merged or removed, weights
  sliced to a smaller shape — the original Parameter is kept and put back, never copied;
- modules replaced or wrapped (`set_module`): routers before sublayers, skipping wrappers;
- attributes set (`set_attr`): head counts, top-k, expert counts that forwards read.

Between apply and restore, `PrunableUnit`s keep pointing at the original parameters: a mode that
replaces parameters reads the new ones from the modules.
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import contextmanager

import torch
from torch import nn

_ABSENT = object()


class Edits:
    """A journal of reversible changes to a model."""

    def __init__(self) -> None:
        self._undo: list[Callable[[], None]] = []

    def __len__(self) -> int:
        return len(self._undo)

    def set_attr(self, obj, name: str, value) -> None:
        old = obj.__dict__.get(name, _ABSENT) if hasattr(obj, "__dict__") else getattr(obj, name)
        setattr(obj, name, value)

        def undo():
            if old is _ABSENT:
                delattr(obj, name)
            else:
                setattr(obj, name, old)
        self._undo.append(undo)

    def set_param(self, module: nn.Module, name: str, value: torch.Tensor) -> nn.Parameter:
        """Replace `module.<name>` (a parameter) by a new one holding `value` (any shape)."""
        old = module._parameters[name]
        new = nn.Parameter(value.detach(), requires_grad=bool(old is not None and old.requires_grad))
        module._parameters[name] = new
        self._undo.append(lambda: module._parameters.__setitem__(name, old))
        return new

    def set_module(self, parent: nn.Module, name: str, module: nn.Module) -> nn.Module:
        """Put `module` where `parent.<name>` was (a wrapper may hold the original inside)."""
        old = parent._modules[name]
        parent._modules[name] = module
        self._undo.append(lambda: parent._modules.__setitem__(name, old))
        return old

    @torch.no_grad()
    def write(self, target: torch.Tensor, value: torch.Tensor) -> None:
        """Write `value` into `target` (a view of a weight) in place, keeping a copy to put back."""
        old = target.detach().clone()
        target.copy_(value)
        self._undo.append(lambda: target.copy_(old))

    @torch.no_grad()
    def restore(self) -> None:
        while self._undo:
            self._undo.pop()()


@contextmanager
def applied(edits: Edits | None = None):
    """`with applied() as edits: ...` — whatever happens inside is undone on the way out."""
    edits = edits or Edits()
    try:
        yield edits
    finally:
        edits.restore()


class DenseSnapshot:
    """A copy of the prunable weights taken once; `restore()` writes them back bit-identically.
    An evaluator keeps one for its lifetime: one extra copy of the pruned weights, never one per
    candidate."""

    def __init__(self, units, device: str | torch.device | None = None) -> None:
        self.units = list(units)
        self.copies = [u.weight.detach().to(device or u.weight.device, copy=True) for u in self.units]

    @torch.no_grad()
    def restore(self) -> None:
        for u, w in zip(self.units, self.copies):
            u.weight.copy_(w)
