"""The registry of pruning modes: mode name -> its recipe (recipe.py).

Registering a recipe is all a mode needs to join: its candidate kinds join what candidates.py
decodes, its reshaped loader joins what `prunerzero.models.loading` loads, and every outer part (the
CLI, jobs, export, campaign configs, the problems registry) reads the recipe from here. This module
imports the mode packages — that is what registering is — and nothing below it imports it back.
"""

from __future__ import annotations

from prunerzero.models.loading import RESHAPED

from . import attention, experts, skip, structured, unstructured
from .candidates import KINDS, decode, encode, label, read_candidate_file
from .recipe import DEFAULT_MODE, ModeError, Recipe, target_fields, unsupported

__all__ = ["DEFAULT_MODE", "MODES", "ModeError", "Recipe", "decode", "encode", "get_mode", "label",
           "only_in", "read_candidate_file", "register", "target_fields", "unsupported"]

MODES: dict[str, Recipe] = {}


def register(recipe: Recipe) -> Recipe:
    """Add a mode: its name, its candidate kinds, its reshaped loader. A kind or a marker another
    mode already registered is an error (two modes cannot decode the same data)."""
    for kind, cls in recipe.kinds.items():
        if KINDS.get(kind, cls.from_data) != cls.from_data:
            raise ModeError(f"mode {recipe.name!r}: candidate kind {kind!r} is registered already")
        KINDS[kind] = cls.from_data
    if recipe.reshaped is not None:
        marker, loader = recipe.reshaped
        if RESHAPED.get(marker, loader) is not loader:
            raise ModeError(f"mode {recipe.name!r}: reshaped marker {marker!r} is registered already")
        RESHAPED[marker] = loader
    MODES[recipe.name] = recipe
    return recipe


def get_mode(name: str) -> Recipe:
    try:
        return MODES[name]
    except KeyError:
        raise ModeError(f"unknown pruning mode {name!r}; modes: {', '.join(MODES)}") from None


def only_in(candidate) -> str | None:
    """The mode a candidate of a mode's own kind applies in (None: a metric or a method)."""
    for recipe in MODES.values():
        if isinstance(candidate, tuple(recipe.kinds.values())):
            return recipe.name
    return None


# the modes, in the order commands list them: a new mode is its package imported above and one line here
register(unstructured.RECIPE)
register(structured.RECIPE)
register(attention.RECIPE)
register(skip.RECIPE)
register(experts.RECIPE)
