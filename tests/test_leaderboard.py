"""Leaderboard CSV rules without a model: identity-based replacement, fixed columns, plotting."""

import pandas as pd
import pytest

from prunerzero.leaderboard import COLUMNS, LeaderboardError, append, best, plot, read


def row(metric, ppl, pattern="unstructured", **kw):
    base = {c: "" for c in COLUMNS}
    base |= {"metric": metric, "key": metric, "model": "m", "corpus": "c", "protocol_id": "p", "split": "test",
             "sparsity": 0.5, "pattern": pattern, "group": "row", "perplexity": ppl, "dense_perplexity": 10.0}
    return base | kw


def test_rerun_replaces_the_row_with_the_same_identity(tmp_path):
    csv = tmp_path / "lb.csv"
    append([row("a", 20.0), row("b", 30.0)], csv)
    df = append([row("a", 19.0), row("a", 25.0, pattern="2:4")], csv)
    assert len(df) == 3
    assert df.set_index(["metric", "pattern"]).loc[("a", "unstructured"), "perplexity"] == 19.0
    assert list(read(csv).columns) == COLUMNS
    assert list(best(read(csv))["metric"]) == ["a", "a"]  # best per (pattern, ...) setting


def test_rows_without_identity_and_foreign_columns_are_refused(tmp_path):
    with pytest.raises(LeaderboardError, match="identity"):
        append([{"metric": "a", "perplexity": 1.0}], tmp_path / "lb.csv")
    bad = tmp_path / "bad.csv"
    pd.DataFrame([{"metric": "a", "colour": "red"}]).to_csv(bad, index=False)
    with pytest.raises(LeaderboardError, match="colour"):
        read(bad)


def test_plot_writes_a_png(tmp_path):
    df = pd.DataFrame([row("a", 20.0), row("b" * 60, 30.0), row("a", 40.0, pattern="2:4")])
    plot(df, tmp_path / "lb.png")
    assert (tmp_path / "lb.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
