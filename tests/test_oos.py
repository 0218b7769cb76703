"""Opposing Operation Simplification: a table of trees and their simplified forms, rejections,
and score preservation of tree → SymPy → tree on random tensors."""

import os
import random
import subprocess
import sys

import pytest
import torch
from deap import gp

from prunerzero.evolve.problem import primitive_set, to_node
from prunerzero.evolve.simplify import normalisation_rules, simplify
from prunerzero.primitives.expression import parse, to_sympy
from prunerzero.primitives.metric import Metric
from prunerzero.primitives.probes import ranking

# Each rewrite here keeps the masks in exact arithmetic and at float32 on real ranges; those that
# are algebra but change float32 masks (log(exp(W)) = W rounds small weights together at float32)
# are refused: tests/test_oos_float32.py.
TABLE = [
    ("exp(log(X))", "X"),
    ("sqrt(sqr(W))", "abs(W)"),
    ("sqr(sqrt(X))", "X"),
    ("sqr(sqrt(W))", "abs(W)"),
    ("neg(neg(W))", "W"),
    ("abs(abs(W))", "abs(W)"),
    ("abs(mms(W))", "mms(W)"),
    ("abs(mul(G, X))", "mul(G, X)"),
    ("add(W, sub(G, G))", "W"),
    ("mms(mms(G))", "mms(G)"),
    ("zscore(zscore(W))", "zscore(W)"),
    ("rownorm(rownorm(G))", "rownorm(G)"),
    ("zscore(neg(W))", "neg(zscore(W))"),
    ("colnorm(add(G, G))", "colnorm(G)"),
    ("add(W, W)", "mul(2.0, W)"),
    ("sqrt(mul(sqr(W), X))", "mul(sqrt(X), abs(W))"),
    ("sub(W, X)", "sub(W, X)"),
    ("sqrt(W)", "sqrt(W)"),
    ("mul(mul(abs(W), abs(W)), mms(G))", "mul(sqr(W), mms(G))"),
]

# Rewrites that are algebra on the reals but change masks of the protected operators where X or
# G is 0 (div(0, 0) is 0, log(0) is log(1e-8)). They are refused: the tree is evaluated as it is.
REFUSED = [
    ("mul(W, div(X, X))", "W"),
    ("div(mul(W, G), mul(G, X))", "div(W, X)"),
    ("exp(add(log(X), log(G)))", "mul(G, X)"),
]

REJECTED = ["sub(W, W)", "div(G, G)", "add(sub(X, X), 3)", "exp(sub(log(G), log(G)))",
            "mms(sub(W, W))", "zscore(exp(mul(X, 0)))"]


@pytest.mark.parametrize("tree, expected", TABLE)
def test_simplified_form(tree, expected):
    out = simplify(parse(tree))
    assert out.ok, out.rejected
    assert str(out.tree) == expected
    assert out.key == Metric.from_expression(expected).key


@pytest.mark.parametrize("tree, naive", REFUSED)
def test_rewrites_that_change_masks_are_refused_and_keep_their_own_key(tree, naive):
    out = simplify(parse(tree))
    assert out.ok and str(out.tree) == tree
    assert out.key != Metric.from_expression(naive).key  # never the fitness of a tree that prunes otherwise


@pytest.mark.parametrize("tree", REJECTED)
def test_rejected_without_terminals_or_constant_scores(tree):
    out = simplify(parse(tree))
    assert not out.ok


def test_constant_scores_are_rejected_even_when_sympy_keeps_a_terminal():
    # tanh saturates: exp(exp(exp(60))) is clamped, so scores are constant though W appears
    out = simplify(parse("sigmoid(exp(exp(add(exp(abs(W)), 60))))"))
    assert "constant" in out.rejected


def test_key_is_canonical_across_spellings():
    a = simplify(parse("mul(sqrt(X), abs(W))"))
    b = simplify(parse("sqrt(mul(X, sqr(neg(W))))"))
    assert a.key == b.key


def _random_trees(n, seed, operators="extended"):
    pset = primitive_set(operators)
    rnd = random.Random(seed)
    state = random.getstate()
    random.setstate(rnd.getstate())
    try:
        return [to_node(gp.PrimitiveTree(gp.genHalfAndHalf(pset, 1, 4))) for _ in range(n)]
    finally:
        random.setstate(state)


def _inputs(seed):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(24, 20, generator=g, dtype=torch.float64) * 0.5,
            torch.rand(24, 20, generator=g, dtype=torch.float64) + 0.01,
            torch.rand(20, generator=g, dtype=torch.float64) + 0.01)


def test_simplification_preserves_scores_on_fresh_random_tensors():
    W, G, X = _inputs(7)  # not the probes the simplifier checks itself against
    checked = 0
    for tree in _random_trees(60, seed=3):
        out = simplify(tree)
        if not out.ok:
            continue
        before, after = Metric("a", tree)(W, G, X), Metric("b", out.tree)(W, G, X)
        scale = 1.0 + float(before.abs().max())
        assert torch.allclose(before, after, rtol=1e-5, atol=1e-7 * scale), (str(tree), str(out.tree))
        checked += 1
    assert checked >= 40


def test_normalisation_rules_are_sound_numerically():
    W, G, X = _inputs(11)
    for text in ["mms(add(mul(3, W), 2))", "zscore(mul(-2, G))", "rownorm(mul(-3, W))",
                 "colnorm(colnorm(W))", "mms(zscore(add(W, X)))"]:
        tree = parse(text)
        rewritten = normalisation_rules(to_sympy(tree))
        assert rewritten != to_sympy(tree)
        from prunerzero.primitives.expression import from_sympy

        a, b = Metric("a", tree)(W, G, X), Metric("b", from_sympy(rewritten))(W, G, X)
        assert torch.allclose(a, b, rtol=1e-6, atol=1e-9), text


def test_simplified_trees_respect_limits_and_operator_set():
    ops = frozenset({"add", "mul", "abs", "sqrt", "sqr"})
    out = simplify(parse("sqrt(sqr(W))"), allowed_ops=ops, max_depth=1, max_size=2)
    assert str(out.tree) == "abs(W)"
    # div is not allowed: the simplified W/X would need it, so the original tree stays
    out = simplify(parse("mul(W, sqr(sqrt(X)))"), allowed_ops=frozenset({"mul", "sqr", "sqrt"}))
    assert out.tree.operators() <= {"mul", "sqr", "sqrt"}


def test_simplification_is_independent_of_the_hash_seed():
    # a seeded campaign must simplify alike in every process (a resume is a new process)
    trees = [str(t) for t in _random_trees(25, seed=5)]
    code = ("from prunerzero.evolve.simplify import simplify; from prunerzero.primitives.expression import parse; "
            f"print([str(simplify(parse(t)).tree) for t in {trees!r}])")
    seed = "1" if os.environ.get("PYTHONHASHSEED") != "1" else "2"
    other = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                           env={**os.environ, "PYTHONHASHSEED": seed}).stdout
    assert other.strip() == str([str(simplify(parse(t)).tree) for t in trees])


def _fresh_inputs(seed):
    """Inputs the simplifier never saw, with what real statistics have: quantised weights (ties,
    as the dequantised 4-bit zoo model's), exact zeros (weights without gradient, channels no
    token reached) and loud channels; float64, so a rewrite — not float32 rounding — must show.
    (Sums of *different* statistics cancelling to exactly zero, which real ones never do, are
    left to experiments/oos_fuzz.py's adversarial setting.)"""
    g = torch.Generator().manual_seed(seed)
    W = (torch.randn(20, 24, generator=g, dtype=torch.float64) * 6).round() / 16
    G = torch.rand(20, 24, generator=g, dtype=torch.float64) * 0.3
    G[torch.rand(20, 24, generator=g) < 0.2] = 0.0
    X = torch.rand(24, generator=g, dtype=torch.float64) * 2 + 0.01
    X[[2, 9]], X[5] = 0.0, 2e3
    return W, G, X


def _same_masks(a, b):
    """Identical masks at every sparsity, per row and per layer, in exact arithmetic."""
    return all(torch.equal(x, y) for x, y in zip(ranking(a), ranking(b)))


def test_fuzz_rewrites_and_shared_keys_keep_masks_on_fresh_inputs_with_zeros_and_ties():
    """Thousands of random trees: no crash, finite scores, every rewrite and every pair of trees
    sharing a key rank fresh inputs alike (the same masks at every sparsity, per row and layer)."""
    inputs = _fresh_inputs(21)
    by_key: dict[str, list] = {}
    trees = _random_trees(1500, seed=13, operators="extended")
    for tree in trees:
        out = simplify(tree)
        before = Metric("a", tree)(*inputs)
        assert torch.isfinite(before).all(), str(tree)
        if not out.ok:
            continue
        after = Metric("b", out.tree)(*inputs)
        assert _same_masks(before, after), (str(tree), str(out.tree))
        by_key.setdefault(out.key, []).append(after)
    shared = [group for group in by_key.values() if len(group) > 1]
    assert len(shared) > 50  # de-duplication still finds many equal formulas
    for group in shared:
        assert all(_same_masks(group[0], s) for s in group[1:])
