"""`smollm2-135m-moe-v1`: the derived MoE of recipe version 1 (routers fitted per layer on the
dense model's hidden states, nothing else fitted), kept buildable for comparison with the
default `smollm2-135m-moe` of version 2 (results/MOE.md). The zoo's `derive` contract:
build(out, log) and verify(out)."""

from __future__ import annotations

from pathlib import Path

from .moefy import Recipe, build as build_recipe, verify as verify_recipe

RECIPE = Recipe(version=1)


def build(out: Path, log=print) -> Path:
    return build_recipe(out, recipe=RECIPE, log=log)


def verify(out: Path) -> None:
    verify_recipe(out, RECIPE)
