"""Bad input found by trying the tool as an adversary would: each gets a clear, short error, and
nothing read from disk runs code."""

import os
import stat

import pytest
from typer.testing import CliRunner

from prunerzero.cli import app
from prunerzero.core.paths import atomic_write_text
from prunerzero.primitives.expression import ExpressionError, parse
from prunerzero.primitives.metric import Metric, resolve_metric


@pytest.mark.parametrize("spec, needle", [
    ("add(1, 2)", "reads no statistic"), ("sub(W, W)", "same score"), ("mul(0, G)", "same score"),
])
def test_metrics_that_cannot_rank_weights_are_refused(spec, needle):
    with pytest.raises(ExpressionError, match=needle):
        resolve_metric(spec)
    result = CliRunner().invoke(app, ["prune", "--out", "x", "--metric", spec])
    assert result.exit_code == 2 and needle in result.output


def test_a_huge_or_deep_expression_gives_a_short_error():
    deep = "abs(" * 10_000 + "W" + ")" * 10_000
    with pytest.raises(ExpressionError, match="nested deeper than 200") as e:
        parse(deep)
    assert len(str(e.value)) < 300
    long = "add(" + ", ".join(["W"] * 5000) + ")"
    with pytest.raises(ExpressionError) as e:
        parse(long)
    assert len(str(e.value)) < 300 and "characters" in str(e.value)
    result = CliRunner().invoke(app, ["prune", "--out", "x", "--metric", deep])
    assert result.exit_code == 2 and len(result.output) < 600 and "Traceback" not in result.output


def test_an_exported_metric_file_is_read_not_run(tmp_path):
    marker = tmp_path / "ran"
    path = tmp_path / "shared.py"
    path.write_text(f"import pathlib\npathlib.Path({str(marker)!r}).write_text('x')\n"
                    "EXPRESSION = 'mul(abs(W), sqrt(X))'\n\ndef metric(W, G=None, X=None):\n    return W\n\n"
                    "def mine(W, G=None, X=None):\n    return W.abs()\n")
    metric = resolve_metric(str(path))
    assert isinstance(metric, Metric) and metric.key == resolve_metric("wanda").key
    assert not marker.exists()
    assert resolve_metric(f"{path}:metric").key == metric.key and not marker.exists()
    own = resolve_metric(f"{path}:mine")  # another function asked for by name is the user's own code: imported
    assert marker.exists() and own.name == "shared:mine"


def test_atomic_writes_keep_the_umask_mode_and_an_existing_files_mode(tmp_path):
    old = os.umask(0o022)
    try:
        atomic_write_text(tmp_path / "board.csv", "a\n")
        assert stat.S_IMODE((tmp_path / "board.csv").stat().st_mode) == 0o644
        os.chmod(tmp_path / "board.csv", 0o664)
        atomic_write_text(tmp_path / "board.csv", "b\n")
        assert stat.S_IMODE((tmp_path / "board.csv").stat().st_mode) == 0o664
    finally:
        os.umask(old)
