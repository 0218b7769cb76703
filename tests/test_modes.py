"""The mode registry, candidates as plain data, and the CLI's mode options."""

import pytest
from typer.testing import CliRunner

from prunerzero.cli import app
from prunerzero.primitives.metric import Metric
from prunerzero.pruning.candidates import Allocation, CandidateError, Method, decode, encode, label
from prunerzero.pruning.modes import MODES, ModeError, get_mode
from prunerzero.pruning.unstructured.target import PruneTarget


def test_registry_names_modes_targets_and_methods():
    mode = get_mode("unstructured")
    assert mode.target is PruneTarget and "sparsegpt" in mode.methods
    assert mode.make_target({"pattern": "2:4"}) == PruneTarget(0.5, "2:4", "row")
    assert mode.make_target({"pattern": "2:4"}).describe() == "2:4"
    with pytest.raises(ModeError, match="unknown pruning mode 'nope'; modes: unstructured, structured, attention"):
        get_mode("nope")
    with pytest.raises(ModeError, match=r"target.keep: unknown key; known: allocation, group, pattern, sparsity, update \(mode 'unstructured'\)"):
        mode.make_target({"keep": 4})
    with pytest.raises(ModeError, match="target.sparsity: expected float"):
        mode.make_target({"sparsity": "half"})
    assert set(MODES) >= {"unstructured"}


def test_a_mode_resolves_its_methods_before_metrics():
    mode = get_mode("unstructured")
    assert mode.candidate("SparseGPT") == Method("sparsegpt", stats_mode="sequential")
    assert isinstance(mode.candidate("wanda"), Metric) and mode.candidate("mul(abs(W), X)").formula == "mul(abs(W), X)"


@pytest.mark.parametrize("candidate", [
    Metric.from_expression("mul(abs(W), sqrt(X))"), Method("sparsegpt"), Allocation("wanda", (0.4, 0.6)),
])
def test_candidates_travel_as_plain_data(candidate):
    data = encode(candidate)
    back = decode(data)
    assert back.key == candidate.key and label(data) == candidate.formula


@pytest.mark.parametrize("data, needle", [
    ({"kind": "genome"}, "unknown candidate kind 'genome'"), (42, "unknown candidate kind 'int'"),
    ({"kind": "allocation", "metric": "wanda", "sparsities": "0.5"}, "field 'sparsities' must be a list"),
    ({"kind": "allocation", "metric": "wanda", "sparsities": [1.5]}, r"must be in \[0, 1\)"),
    ({"kind": "method"}, "field 'name' must be a str"),
])
def test_bad_candidate_data_names_the_problem(data, needle):
    with pytest.raises(CandidateError, match=needle):
        decode(data)


def run(*args):
    result = CliRunner().invoke(app, list(args))
    return result.exit_code, result.output


@pytest.mark.parametrize("args, needle", [
    (["prune", "--out", "x", "--mode", "nope"], "unknown pruning mode 'nope'"),
    (["prune", "--out", "x", "--set", "keep=4"], "--set keep: unknown key"),
    (["prune", "--out", "x", "--set", "sparsity=abc"], "--set sparsity: expected float, got 'abc'"),
    (["prune", "--out", "x", "--set", "sparsity"], "write KEY=VALUE"),
    (["leaderboard", "--mode", "nope"], "unknown pruning mode 'nope'"),
    (["leaderboard", "--sparsity", "half"], "--sparsity: 'half' is not a number"),
    (["prune", "--out", "x", "--latency", "0.7"], "target.latency: unknown key"),
    (["prune", "--out", "x", "--mode", "structured", "--latency", "1.5"], "latency budget 1.5 must be a fraction"),
    (["prune", "--out", "x", "--mode", "structured", "--set", "solver=cplex"], "unknown solver 'cplex'"),
    (["leaderboard", "--mode", "structured", "--latency", "fast"], "--latency: 'fast' is not a number"),
])
def test_bad_mode_input_fails_before_any_work(args, needle):
    code, out = run(*args)
    assert code == 2, out
    assert needle in " ".join(out.split()) and "Traceback" not in out


def test_leaderboard_budget_options_reach_the_modes_that_have_them():
    from prunerzero.cli import _mode_budgets

    assert _mode_budgets("attention", "0.5,0.7", "row", None) == [{"group": "row", "sparsity": 0.5},
                                                                  {"group": "row", "sparsity": 0.7}]
    assert _mode_budgets("structured", "0.5", "row", "0.8,0.6") == [{"latency": 0.8}, {"latency": 0.6}]
    assert _mode_budgets("structured", "0.5", "row", None) == [{}]
