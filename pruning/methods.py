"""Pruning methods that are not pure metrics (they also update weights), by name.

A method has the shape (model, adapter, calibration windows, target) → PruneReport and runs on
the dense model; `resolve_method` gives None for anything that is a metric instead."""

from __future__ import annotations

from .sparsegpt import prune_sparsegpt

METHODS = {"sparsegpt": prune_sparsegpt}


def resolve_method(spec):
    return METHODS.get(spec.strip().lower()) if isinstance(spec, str) else None
