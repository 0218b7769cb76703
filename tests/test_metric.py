"""Metric: the built-ins against their papers' formulas, canonical keys, export and resolution."""

import ast
import importlib.util

import pytest
import sympy
import torch

from prunerzero.primitives.expression import ExpressionError
from prunerzero.primitives.metric import (
    BUILTINS, CallableMetric, Metric, UnknownMetricError, builtin, load_metric_file, resolve_metric,
)


@pytest.fixture
def wgx():
    g = torch.Generator().manual_seed(0)
    W = torch.randn(12, 20, generator=g)
    G = torch.rand(12, 20, generator=g) * 1e-3
    X = torch.rand(20, generator=g) * 5
    return W, G, X


def _import(path):
    spec = importlib.util.spec_from_file_location(f"exported_{path.stem}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_magnitude(wgx):
    W, G, X = wgx
    assert torch.equal(builtin("magnitude")(W), W.abs())


def test_wanda_is_abs_w_times_sqrt_x_along_rows(wgx):
    W, G, X = wgx
    expected = torch.empty_like(W)
    for i in range(W.shape[0]):
        for j in range(W.shape[1]):
            expected[i, j] = abs(W[i, j]) * X[j].sqrt()
    torch.testing.assert_close(builtin("wanda")(W, G, X), expected)


def test_ria_relative_importance_times_activation(wgx):
    W, G, X = wgx
    A = W.abs()
    expected = (A / A.sum(dim=1, keepdim=True) + A / A.sum(dim=0, keepdim=True)) * X.reshape(1, -1) ** 0.25
    torch.testing.assert_close(builtin("ria")(W, G, X), expected)


def test_gradient_is_abs_w_times_g(wgx):
    W, G, X = wgx
    torch.testing.assert_close(builtin("gradient")(W, G, X), W.abs() * G)


def test_pruner_zero_is_w_squared_times_min_max_scaled_g(wgx):
    W, G, X = wgx
    expected = W**2 * (G - G.min()) / (G.max() - G.min())
    torch.testing.assert_close(builtin("pruner-zero")(W, G, X), expected)


def test_scores_have_the_weight_shape_even_for_constant_metrics(wgx):
    W, _, _ = wgx
    out = Metric.from_expression("add(1.0, 2.0)")(W)
    assert out.shape == W.shape and (out == 3).all()


def test_needs():
    assert builtin("magnitude").needs == {"W"}
    assert builtin("wanda").needs == {"W", "X"}
    assert builtin("ria").needs == {"W", "X"}
    assert builtin("gradient").needs == {"W", "G"}
    assert builtin("pruner-zero").needs == {"W", "G"}
    assert Metric.from_expression("sqrt(X)").needs == {"X"}


def test_missing_statistic_is_named(wgx):
    W, G, _ = wgx
    with pytest.raises(ValueError, match="'wanda' needs statistic.*X"):
        builtin("wanda")(W, G, None)
    with pytest.raises(ValueError, match="G"):
        builtin("gradient")(W)


def test_x_and_g_shapes_are_checked(wgx):
    W, G, X = wgx
    with pytest.raises(ValueError, match="X has shape"):
        builtin("wanda")(W, None, X[:-1])
    with pytest.raises(ValueError, match="G has shape"):
        builtin("gradient")(W, G.t(), None)


@pytest.mark.parametrize("a, b", [
    ("mul(abs(W), abs(W))", "sqr(W)"),
    ("mul(abs(W), sqrt(X))", "mul(sqrt(X), abs(W))"),
    ("add(W, G)", "add(G, W)"),
    ("sub(W, neg(G))", "add(W, G)"),
    ("sqr(sqrt(X))", "X"),
    ("abs(G)", "G"),
    ("mul(mul(abs(W), abs(W)), mms(G))", "mul(sqr(W), mms(G))"),
])
def test_equivalent_forms_share_a_key(a, b):
    assert Metric.from_expression(a).key == Metric.from_expression(b).key


@pytest.mark.parametrize("a, b", [
    ("div(W, W)", "1.0"),  # div(0, 0) is 0 where W is 0: not the constant 1
    ("mul(G, div(X, X))", "G"),
    ("div(mul(W, G), G)", "W"),
])
def test_forms_equal_in_algebra_but_not_where_statistics_are_zero_have_different_keys(a, b):
    assert Metric.from_expression(a).key != Metric.from_expression(b).key
    assert Metric.from_expression(a).key == f"tree:{a}"


def test_different_metrics_have_different_keys():
    keys = {builtin(name).key for name in BUILTINS}
    assert len(keys) == len(BUILTINS)
    assert Metric.from_expression("sqr(W)").key != Metric.from_expression("abs(W)").key


@pytest.mark.parametrize("text", [
    *BUILTINS.values(),
    "div(log(X), sub(exp(W), 0.5))",
    "sigmoid(zscore(mul(W, G)))",
    "tanh(add(-2.0, sqr(W)))",
    "add(W, 3.0)",
])
def test_exported_source_gives_identical_scores(tmp_path, wgx, text):
    W, G, X = wgx
    metric = Metric.from_expression(text, name="candidate")
    path = tmp_path / "candidate.py"
    path.write_text(metric.source({"campaign": "test", "fitness": 12.5}))
    imports = [n for n in ast.walk(ast.parse(path.read_text())) if isinstance(n, (ast.Import, ast.ImportFrom))]
    assert [a.name for n in imports for a in n.names] == ["torch"]  # standalone
    loaded = load_metric_file(path, "metric")  # through the EXPRESSION: the same tree
    assert isinstance(loaded, Metric) and loaded.tree == metric.tree
    module = _import(path)
    W0, G0, X0 = W.clone(), G.clone(), X.clone()
    assert torch.equal(module.metric(W, G, X), metric(W, G, X))
    assert torch.equal(W, W0) and torch.equal(G, G0) and torch.equal(X, X0)
    assert "campaign: test" in module.__doc__ and metric.formula in module.__doc__


def test_resolve_builtin_name_and_expression():
    assert resolve_metric("wanda") == builtin("wanda")
    assert resolve_metric(" magnitude ").name == "magnitude"
    m = resolve_metric("mul(abs(W), sqrt(X))")
    assert isinstance(m, Metric) and m.key == builtin("wanda").key
    assert resolve_metric("W").formula == "W"
    assert resolve_metric(m) is m


def test_resolve_unknown_name_is_clear():
    with pytest.raises(UnknownMetricError, match="unknown metric 'wandaa'.*magnitude"):
        resolve_metric("wandaa")


def test_resolve_malformed_expression_is_an_expression_error():
    with pytest.raises(ExpressionError, match="unknown operator 'cube'"):
        resolve_metric("cube(W)")


def test_resolve_exported_file_and_file_attr(tmp_path, wgx):
    W, G, X = wgx
    path = tmp_path / "mine.py"
    path.write_text(builtin("ria").source() + "\n\ndef other(W, G=None, X=None):\n    return W * 2\n")
    from_file = resolve_metric(str(path))
    assert isinstance(from_file, Metric) and from_file.key == builtin("ria").key and from_file.name == "mine"
    explicit = resolve_metric(f"{path}:metric")
    assert isinstance(explicit, Metric) and explicit.key == from_file.key
    other = resolve_metric(f"{path}:other")
    assert isinstance(other, CallableMetric)
    assert torch.equal(other(W, G, X), W * 2)
    assert other.key.startswith("python:") and other.key.endswith(":other")


def test_resolve_python_file_without_expression_is_a_callable_metric(tmp_path, wgx):
    W, G, X = wgx
    path = tmp_path / "handmade.py"
    path.write_text("def metric(W, G, X):\n    return W.abs() * X.reshape(1, -1)\n")
    m = resolve_metric(str(path))
    assert isinstance(m, CallableMetric)
    assert m.needs == {"W", "G", "X"} and m.formula == "<python handmade:metric>"
    assert torch.equal(m(W, G, X), W.abs() * X)
    path.write_text("def metric(W, G, X):\n    return W.sum()\n")
    changed = resolve_metric(str(path))
    assert changed.key != m.key  # the key follows the file's content
    with pytest.raises(ValueError, match=r"returned \(\), expected scores of shape \(12, 20\)"):
        changed(W, G, X)


def test_resolve_missing_file_and_missing_function(tmp_path):
    with pytest.raises(UnknownMetricError, match="nowhere.py' does not exist"):
        resolve_metric(str(tmp_path / "nowhere.py"))
    path = tmp_path / "empty.py"
    path.write_text("x = 1\n")
    with pytest.raises(UnknownMetricError, match="has no function 'metric'"):
        resolve_metric(str(path))
    with pytest.raises(UnknownMetricError, match="has no function 'score'"):
        resolve_metric(f"{path}:score")


def test_file_with_invalid_expression_names_the_file(tmp_path):
    path = tmp_path / "bad.py"
    path.write_text("EXPRESSION = 'cube(W)'\n\ndef metric(W, G, X):\n    return W\n")
    with pytest.raises(ExpressionError, match="bad.py: EXPRESSION is not a valid metric.*cube"):
        resolve_metric(str(path))


def test_metrics_whose_sympy_form_is_not_finite_are_keyed_by_their_tree(wgx):
    """SymPy reads div(W, 0) as zoo*W and log(0) as zoo, dropping the epsilons the scores depend
    on: two metrics ranking weights in opposite orders must not share a key."""
    W, G, X = wgx
    a = Metric.from_expression("div(W, sub(X, X))")
    b = Metric.from_expression("mul(W, log(sub(G, G)))")
    assert sympy.sstr(a.sympy) == sympy.sstr(b.sympy) == "zoo*W"
    assert a.key == "tree:div(W, sub(X, X))" and b.key != a.key
    assert torch.equal(a(W, G, X).argsort(), b(W, G, X).argsort().flip(-1))
    assert Metric.from_expression("exp(log(sub(W, W)))").key.startswith("tree:")
