"""Bad input through the CLI: a clear error naming the problem, exit code 2, no traceback."""

import pytest
from typer.testing import CliRunner

from prunerzero.cli import app

runner = CliRunner()


def run(*args):
    result = runner.invoke(app, list(args))
    return result.exit_code, result.output


@pytest.mark.parametrize(
    "args, needle",
    [
        (["prune", "--out", "x", "--model", "no-such-model"], "unknown model 'no-such-model'"),
        (["prune", "--out", "x", "--metric", "no-such-metric"], "unknown metric 'no-such-metric'"),
        (["prune", "--out", "x", "--metric", "mul(abs(W), sqrt(X)"], "malformed expression"),
        (["prune", "--out", "x", "--metric", "mul(W, frob(X))"], "unknown operator 'frob'"),
        (["prune", "--out", "x", "--sparsity", "1.0"], "sparsity 1.0 is out of range"),
        (["prune", "--out", "x", "--sparsity", "-0.1"], "sparsity -0.1 is out of range"),
        (["prune", "--out", "x", "--pattern", "4:2"], "unknown pattern '4:2'"),
        (["prune", "--out", "x", "--group", "column"], "unknown comparison group 'column'"),
        (["prune", "--out", "x", "--stats-mode", "lazy"], "unknown stats_mode 'lazy'"),
        (["models", "fetch", "gpt-5"], "unknown zoo model 'gpt-5'"),
        (["data", "fetch", "pile"], "cannot fetch 'pile'"),
    ],
)
def test_bad_input_fails_before_any_work(args, needle):
    code, out = run(*args)
    assert code == 2, out
    assert needle in out
    assert "Traceback" not in out


@pytest.mark.real
def test_unknown_corpus_and_too_short_corpus(tmp_path):
    code, out = run("eval", "--corpus", "no-such-corpus", "--eval-windows", "1", "--seq-len", "32")
    assert code == 2 and "unknown corpus 'no-such-corpus'" in out
    short = tmp_path / "short.txt"
    short.write_text("It is a truth universally acknowledged. " * 20)
    code, out = run("eval", "--corpus", str(short), "--seq-len", "1024", "--eval-windows", "1")
    assert code == 2 and "short" in out and "tokens" in out


@pytest.mark.real
def test_nm_pattern_that_does_not_divide_the_width(tmp_path):
    code, out = run("prune", "--out", str(tmp_path / "x"), "--pattern", "5:7", "--seq-len", "32",
                    "--calib-windows", "1", "--eval-windows", "1", "--no-measure")
    assert code == 2
    assert "5:7 does not divide the input width" in out and "576" in out
    assert not (tmp_path / "x").exists()
