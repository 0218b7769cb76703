"""Leaderboard CSV rules without a model: identity-based replacement, fixed columns, plotting.
(The whole-target identity, mode values and upgrades: test_leaderboard_identity.py; the views and
the command: test_leaderboard_views.py.)"""

import csv
import io

import pandas as pd
import pytest

from prunerzero.leaderboard import COLUMNS, LeaderboardError, append, best, read
from prunerzero.leaderboard_view import plot


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


def test_plot_writes_one_png_per_mode(tmp_path):
    csv = tmp_path / "lb.csv"
    df = append([row("a", 20.0), row("b" * 60, 30.0), row("a", 40.0, pattern="2:4"),
                 row("router", 25.0, mode="skip", budget="0.25 of modules skipped", sparsity="", pattern="")], csv)
    written = plot(read(csv), tmp_path / "lb.png")
    assert written == [tmp_path / "lb-unstructured.png", tmp_path / "lb-skip.png"]
    assert all(p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" for p in written)
    assert plot(df, tmp_path / "{mode}" / "board.png", "skip") == [tmp_path / "skip" / "board.png"]


OLD_COLUMNS = ["metric", "formula", "key", "model", "corpus", "protocol", "protocol_id", "stats_mode", "split",
               "sparsity", "pattern", "group", "perplexity", "dense_perplexity", "achieved_sparsity",
               "calib_tokens", "eval_tokens", "seed", "version", "device", "seconds", "timestamp"]


def test_a_csv_of_the_version_before_modes_is_upgraded_in_place_nothing_lost(tmp_path):
    csv = tmp_path / "lb.csv"
    old = [{c: "" for c in OLD_COLUMNS} | {"metric": m, "key": m, "model": "m", "corpus": "c", "protocol_id": "p",
                                           "split": "test", "sparsity": 0.5, "pattern": pat, "group": "row",
                                           "perplexity": ppl, "dense_perplexity": 10.0, "eval_tokens": 100}
           for m, pat, ppl in [("a", "unstructured", 20.0), ("a", "2:4", 40.0), ("b", "unstructured", 30.0)]]
    pd.DataFrame(old, columns=OLD_COLUMNS).to_csv(csv, index=False)
    df = read(csv)
    assert list(df["mode"]) == ["unstructured"] * 3
    assert list(df["budget"]) == ["0.5 unstructured per row", "2:4", "0.5 unstructured per row"]
    new = row("a", 19.0, mode="unstructured", budget="0.5 unstructured per row")  # same identity as an old row
    merged = append([new, row("c", 50.0, mode="experts", budget="4 of 8 experts", pattern="")], csv)
    assert len(merged) == 4 and list(pd.read_csv(csv).columns) == COLUMNS
    again = read(csv).set_index(["metric", "mode", "budget"])
    assert again.loc[("a", "unstructured", "0.5 unstructured per row"), "perplexity"] == 19.0
    assert again.loc[("a", "unstructured", "2:4"), "perplexity"] == 40.0 and again.loc[("b", "unstructured", "0.5 unstructured per row"), "eval_tokens"] == 100


def torn(text: str, fields: int) -> str:
    """The last row cut after its first `fields` fields (a write torn at a field boundary)."""
    *lines, last = text.rstrip("\n").split("\n")
    buf = io.StringIO()
    csv.writer(buf, lineterminator="\n").writerow(next(csv.reader([last]))[:fields])
    return "\n".join(lines) + "\n" + buf.getvalue()


@pytest.mark.parametrize("damage, needle", [
    (lambda text: text.replace("20.0", "twenty", 1), "line 2: column 'perplexity' holds 'twenty'"),
    (lambda text: torn(text, 12), "line 3: row without"),
    (lambda text: text + "a,b,c" + ",x" * 40 + "\n", "not a readable leaderboard CSV"),
])
def test_a_damaged_file_is_an_error_naming_the_line_and_nothing_is_written(tmp_path, damage, needle):
    csv = tmp_path / "lb.csv"
    append([row("a", 20.0), row("b", 30.0)], csv)
    csv.write_text(damage(csv.read_text()))
    before = csv.read_bytes()
    with pytest.raises(LeaderboardError, match=needle):
        read(csv)
    with pytest.raises(LeaderboardError):
        append([row("c", 10.0)], csv)
    assert csv.read_bytes() == before
