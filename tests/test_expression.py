"""Expression trees: the safe parser, string round trips, and tree → SymPy → tree."""

import builtins

import pytest
import sympy
import torch

from prunerzero.primitives.expression import (
    ExpressionError, Node, compile_tree, const, from_sympy, parse, to_sympy,
)
from prunerzero.primitives.metric import BUILTINS
from prunerzero.primitives.terminals import SYMBOLS, terminal_env

W, G, X = (SYMBOLS[t] for t in "WGX")

ROUND_TRIP = [
    "W",
    "abs(W)",
    "mul(abs(W), sqrt(X))",
    "mul(mul(abs(W), abs(W)), mms(G))",
    "div(W, sub(G, 2.5))",
    "add(neg(W), -0.125)",
    "sigmoid(zscore(log(exp(tanh(W)))))",
    "mul(add(rownorm(abs(W)), colnorm(abs(W))), sqrt(sqrt(X)))",
    "sqr(div(3.0, add(X, G)))",
    *BUILTINS.values(),
]

SCORE_TABLE = [
    *BUILTINS.values(),
    "sqr(sqrt(X))",
    "div(W, X)",
    "div(mul(W, 3.0), 4.0)",
    "sub(W, mul(0.5, G))",
    "exp(log(X))",
    "log(mul(G, X))",
    "mul(tanh(W), sigmoid(G))",
    "div(sqr(W), mul(sqrt(X), G))",
    "neg(div(1.0, sqrt(abs(W))))",
    "add(mms(G), zscore(W))",
    "mul(sqr(W), sqr(sqr(X)))",
    "sub(W, W)",
]


def _env(seed: int = 0) -> dict:
    """Random terminals away from 0, where the torch epsilons do not matter."""
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(6, 10, generator=g, dtype=torch.float64)
    w = w + torch.sign(w) * 0.2
    return terminal_env(w, torch.rand(6, 10, generator=g, dtype=torch.float64) + 0.1,
                        torch.rand(10, generator=g, dtype=torch.float64) + 0.1)


def _scores(node: Node, env: dict) -> torch.Tensor:
    return compile_tree(node)(env).expand_as(env["W"])


@pytest.mark.parametrize("text", ROUND_TRIP)
def test_parse_str_round_trip(text):
    tree = parse(text)
    assert str(tree) == text
    assert parse(str(tree)) == tree


def test_parse_normalises_spacing_and_numbers():
    assert str(parse("  mul( abs(W) ,sqrt( X ) ) ")) == "mul(abs(W), sqrt(X))"
    assert str(parse("add(W, 2)")) == "add(W, 2.0)"
    assert parse("add(W, -3)") == Node("add", (Node("W"), const(-3.0)))


def test_tree_queries():
    tree = parse("mul(mul(abs(W), abs(W)), mms(G))")
    assert tree.terminals() == {"W", "G"}
    assert tree.operators() == {"mul", "abs", "mms"}
    assert tree.size() == 8 and tree.depth() == 4
    assert parse("add(W, 1.0)").terminals() == {"W"}


@pytest.mark.parametrize("text", SCORE_TABLE)
def test_tree_sympy_tree_preserves_scores(text):
    tree = parse(text)
    back = from_sympy(to_sympy(tree))
    assert to_sympy(back) == to_sympy(tree) or sympy.simplify(to_sympy(back) - to_sympy(tree)) == 0
    for seed in range(2):
        env = _env(seed)
        # atol: log's epsilon (log|x| + 1e-8) may cancel in SymPy, e.g. exp(log(X)) → X
        torch.testing.assert_close(_scores(back, env), _scores(tree, env), rtol=1e-9, atol=1e-7)


@pytest.mark.parametrize("expr, expected", [
    (X ** sympy.Rational(3, 2), lambda x, w: x ** 1.5),
    (X ** sympy.Rational(1, 4), lambda x, w: x ** 0.25),
    (W ** -1, lambda x, w: 1 / w),
    (W ** -2, lambda x, w: 1 / w**2),
    (W ** 5, lambda x, w: w**5),
    (X ** sympy.Rational(-1, 2) * W, lambda x, w: w / x ** 0.5),
    (sympy.Rational(3, 4) * W, lambda x, w: 0.75 * w),
    (-sympy.Rational(5, 2) * W * X, lambda x, w: -2.5 * w * x),
    (sympy.Rational(1, 3) * X, lambda x, w: x / 3),
    (sympy.Float(0.3) * W + 2, lambda x, w: 0.3 * w + 2),
    (sympy.Rational(7, 2), lambda x, w: torch.full_like(w, 3.5)),
])
def test_from_sympy_powers_and_rationals(expr, expected):
    env = _env(3)
    tree = from_sympy(expr)
    assert tree.operators() <= {"mul", "div", "sqrt", "sqr", "add", "neg"}
    torch.testing.assert_close(_scores(tree, env), expected(env["X"], env["W"]), rtol=1e-9, atol=1e-12)


def test_from_sympy_keeps_exact_rationals_as_integer_division():
    assert str(from_sympy(sympy.Rational(3, 4) * W)) == "div(mul(3.0, W), 4.0)"


def test_powers_other_than_square_roots_become_the_pow_operator():
    assert str(from_sympy(X ** sympy.Rational(1, 3))) == f"pow(X, {1 / 3!r})"
    assert str(from_sympy(sympy.Abs(W) ** X)) == "pow(abs(W), X)"
    assert str(from_sympy(X ** sympy.Rational(3, 4))) == "sqrt(sqrt(mul(X, sqr(X))))"  # still a chain of roots


@pytest.mark.parametrize("expr, fragment", [
    (sympy.sin(W), "sin"),
    (sympy.Symbol("Y"), "symbol Y"),
    (sympy.zoo * W, "zoo"),
])
def test_from_sympy_rejects_what_the_table_cannot_express(expr, fragment):
    with pytest.raises(ExpressionError, match=fragment):
        from_sympy(expr)


@pytest.mark.parametrize("text, fragment", [
    ("foo(W)", "unknown operator 'foo'"),
    ("add(W)", "add takes 2 argument"),
    ("abs(W, X)", "abs takes 1 argument"),
    ("mul(W, Y)", "unknown terminal 'Y'"),
    ("mul(W,", "malformed expression"),
    ("abs(W))", "malformed expression"),
    ("", "empty"),
    ("   ", "empty"),
    ("W.__class__", "W.__class__"),
    ("abs(W).__class__.__bases__", "__bases__"),
    ("__import__('os').system('true')", "__import__"),
    ("lambda: W", "lambda"),
    ("'W'", "'W'"),
    ("abs('W')", "'W'"),
    ("abs(x=W)", "x=W"),
    ("abs(*W)", r"\*W"),
    ("W + X", "W \\+ X"),
    ("-W", "-W"),
    ("abs(True)", "True"),
    ("[W]", r"\[W\]"),
    ("W if X else G", "if"),
    ("mul(W, 1e400)", "not finite"),
    ("mul(W, " + "9" * 400 + ")", "not finite"),
    ("import os", "malformed expression"),
])
def test_malformed_expressions_raise_naming_the_problem(text, fragment):
    with pytest.raises(ExpressionError, match=fragment):
        parse(text)


def test_non_string_input_is_rejected():
    with pytest.raises(ExpressionError):
        parse(None)


def test_parser_never_evaluates(monkeypatch):
    """Nothing in an expression string is ever run: eval/exec are never called, and a call of a
    name bound in builtins is rejected rather than made."""
    calls = []

    def forbidden(*args, **kwargs):
        raise AssertionError("eval/exec called while parsing")

    monkeypatch.setattr(builtins, "eval", forbidden)
    monkeypatch.setattr(builtins, "exec", forbidden)
    monkeypatch.setattr(builtins, "canary", lambda *a: calls.append(a), raising=False)
    for text in ("canary(W)", "abs(canary())", "canary.__call__(1)", "mul(W, canary)"):
        with pytest.raises(ExpressionError):
            parse(text)
    assert str(parse("mul(abs(W), sqrt(X))")) == "mul(abs(W), sqrt(X))"
    assert calls == []


def test_constants_compile_to_tensors_of_the_weight_shape_and_dtype():
    env = _env()
    out = compile_tree(parse("add(W, 1.5)"))(env)
    assert out.dtype == torch.float64
    torch.testing.assert_close(out, env["W"] + 1.5)
    assert compile_tree(const(2.0))(env).shape == env["W"].shape
    # layer-wise operators accept a constant operand
    assert torch.isfinite(compile_tree(parse("colnorm(2.0)"))(env)).all()
