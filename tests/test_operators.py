"""The operator table: every operator total on adversarial inputs, and its SymPy face agreeing
with its torch face."""

import itertools

import numpy as np
import pytest
import sympy
import torch

from prunerzero.primitives.expression import compile_tree, parse
from prunerzero.primitives.operators import BOUND, OPERATORS, export_source, get_operator
from prunerzero.primitives.terminals import terminal_env


def _adversarial() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    rand = torch.randn(6, 8, generator=g)
    mixed = rand.clone()
    mixed[0, :4] = torch.tensor([1e30, -1e30, 1e-30, -1e-30])
    mixed[1, :3] = torch.tensor([0.0, 3e38, -3e38])
    return {
        "zeros": torch.zeros(6, 8),
        "negatives": -rand.abs() - 0.1,
        "huge+": torch.full((6, 8), 1e30),
        "huge±": torch.where(rand > 0, 1e30, -1e30),
        "fp32-max±": torch.where(rand > 0, 3.4e38, -3.4e38),
        "tiny": torch.full((6, 8), 1e-30),
        "tiny±": torch.where(rand > 0, 1e-30, -1e-30),
        "constant": torch.full((6, 8), 3.7),
        "mixed": mixed,
        "1x1": torch.tensor([[-2.5]]),
        "1x1-zero": torch.zeros(1, 1),
    }


ADVERSARIAL = _adversarial()
UNARY = [n for n, op in OPERATORS.items() if op.arity == 1]
BINARY = [n for n, op in OPERATORS.items() if op.arity == 2]
ELEMENTWISE = ["add", "sub", "mul", "div", "abs", "neg", "sqr", "sqrt", "log", "exp", "tanh", "sigmoid"]


def _assert_total(out: torch.Tensor, like: torch.Tensor, what: str) -> None:
    assert out.shape == like.shape, f"{what}: shape {tuple(out.shape)} != {tuple(like.shape)}"
    assert out.dtype == like.dtype, f"{what}: dtype {out.dtype}"
    assert torch.isfinite(out).all(), f"{what}: non-finite output {out}"
    assert out.abs().max() <= BOUND, f"{what}: exceeds BOUND"


def test_table_is_consistent():
    assert set(UNARY) | set(BINARY) == set(OPERATORS)
    assert {"abs", "neg", "sqr", "sqrt", "log", "exp", "tanh", "sigmoid", "mms", "zscore",
            "add", "sub", "mul", "div"} <= set(OPERATORS)
    for name, op in OPERATORS.items():
        assert op.name == name and op.arity in (1, 2) and op.doc


@pytest.mark.parametrize("name", UNARY)
@pytest.mark.parametrize("case", ADVERSARIAL)
def test_unary_total_on_adversarial_inputs(name, case):
    x = ADVERSARIAL[case]
    _assert_total(OPERATORS[name](x.clone()), x, f"{name}({case})")


@pytest.mark.parametrize("name", BINARY)
def test_binary_total_on_every_pair_of_adversarial_inputs(name):
    same_shape = {k: v for k, v in ADVERSARIAL.items() if v.shape == (6, 8)}
    for (ka, a), (kb, b) in itertools.product(same_shape.items(), repeat=2):
        _assert_total(OPERATORS[name](a.clone(), b.clone()), a, f"{name}({ka}, {kb})")
    one = ADVERSARIAL["1x1"]
    _assert_total(OPERATORS[name](one, ADVERSARIAL["1x1-zero"]), one, f"{name}(1x1, 0)")


def test_operators_do_not_modify_their_inputs():
    for name, op in OPERATORS.items():
        for x in ADVERSARIAL.values():
            before = x.clone()
            op(*[x] * op.arity)
            assert torch.equal(x, before), f"{name} modified its input"


@pytest.mark.parametrize("text", [
    "exp(exp(W))",
    "exp(exp(exp(W)))",
    "div(W, sub(W, W))",
    "log(sub(W, W))",
    "sub(exp(W), exp(W))",
    "mul(exp(W), exp(W))",
    "div(exp(W), log(sub(W, W)))",
    "mul(sqr(sqr(sqr(W))), sqr(sqr(sqr(W))))",
    "sub(mul(sqr(W), sqr(W)), neg(mul(sqr(W), sqr(W))))",
    "zscore(sqr(sqr(W)))",
    "mms(exp(W))",
    "rownorm(exp(W))",
    "colnorm(sub(W, W))",
    "sigmoid(neg(exp(W)))",
    "tanh(div(1.0, sub(W, W)))",
    "sqrt(neg(exp(W)))",
    "log(log(log(sub(W, W))))",
])
@pytest.mark.parametrize("case", ["zeros", "huge±", "fp32-max±", "tiny±", "constant", "mixed", "1x1"])
def test_compositions_stay_finite(text, case):
    W = ADVERSARIAL[case]
    out = compile_tree(parse(text))(terminal_env(W))
    assert torch.isfinite(out).all(), f"{text} on {case}: {out}"
    assert out.numel() in (1, W.numel())


def test_protections_keep_meaning():
    """The protected forms are the documented ones, not merely finite."""
    x = torch.tensor([[-4.0, 0.0, 2.0, 1e-12]])
    assert torch.equal(OPERATORS["sqrt"](x), x.abs().sqrt())
    assert torch.allclose(OPERATORS["log"](x), (x.abs() + 1e-8).log())
    assert OPERATORS["exp"](torch.tensor([[1e4]])).item() == pytest.approx(np.exp(60.0), rel=1e-6)
    # div keeps the sign of the denominator and pushes it away from zero
    den = torch.tensor([[-0.0, 0.0, -1e-12, 1e-12, 2.0]])
    out = OPERATORS["div"](torch.ones_like(den), den)
    assert out[0, :4].abs().tolist() == pytest.approx([1e8] * 4)
    assert out[0, 2] < 0 < out[0, 3] and out[0, 4] == 0.5


def test_layer_operators_follow_their_formulas():
    W = torch.randn(5, 7, generator=torch.Generator().manual_seed(3))
    assert torch.allclose(OPERATORS["mms"](W), (W - W.min()) / (W.max() - W.min()))
    w64 = W.double()
    assert torch.allclose(OPERATORS["zscore"](W), ((w64 - w64.mean()) / w64.std(correction=0)).float())
    assert torch.allclose(OPERATORS["rownorm"](W), W / W.abs().sum(dim=1, keepdim=True))
    assert torch.allclose(OPERATORS["colnorm"](W), W / W.abs().sum(dim=0, keepdim=True))
    for name in ("mms", "zscore"):
        assert torch.equal(OPERATORS[name](torch.full((3, 3), 5.0)), torch.zeros(3, 3))


def _numpy_face(name: str):
    """The operator's SymPy form, lambdified with numpy (sigmoid is an opaque SymPy function)."""
    syms = sympy.symbols(f"a0:{OPERATORS[name].arity}", real=True)
    expr = OPERATORS[name].sympy_fn(*syms)
    return sympy.lambdify(syms, expr, modules=[{"sigmoid": lambda a: 1 / (1 + np.exp(-a))}, "numpy"])


@pytest.mark.parametrize("name", ELEMENTWISE)
def test_sympy_face_agrees_with_torch_face(name):
    g = torch.Generator().manual_seed(7)
    op = OPERATORS[name]
    # moderate values away from zero: the torch epsilons do not matter there
    args = [(torch.rand(4, 6, generator=g, dtype=torch.float64) * 4 + 0.5)
            * torch.where(torch.rand(4, 6, generator=g) > 0.5, 1.0, -1.0).double() for _ in range(op.arity)]
    expected = _numpy_face(name)(*[a.numpy() for a in args])
    got = op(*args).numpy()
    np.testing.assert_allclose(got, np.broadcast_to(expected, got.shape), rtol=1e-6, atol=1e-7)


def test_get_operator_names_the_unknown_operator_and_the_table():
    with pytest.raises(KeyError, match="unknown operator 'cube'.*OPERATORS"):
        get_operator("cube")


def test_export_source_defines_the_named_operators():
    namespace = {"torch": torch}
    exec(export_source(["log", "div"]), namespace)  # trusted: our own module's source
    x = torch.tensor([[0.0, -3.0]])
    assert torch.equal(namespace["op_log"](x), OPERATORS["log"].torch_fn(x))
    assert torch.equal(namespace["op_div"](x, x), OPERATORS["div"].torch_fn(x, x))
    assert "op_exp" not in namespace
