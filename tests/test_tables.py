"""The reports' markdown tables: a missing or NaN value is an empty cell, numbers take their format."""

from prunerzero.core.tables import markdown_table


def test_a_table_formats_numbers_and_leaves_missing_values_empty():
    rows = [{"name": "wanda", "ppl": 56.123, "n": 3}, {"name": "broken", "ppl": float("nan")}]
    lines = markdown_table(rows, [("metric", "name", ""), ("perplexity", "ppl", ".2f"), ("runs", "n", "d")])
    assert lines == ["| metric | perplexity | runs |", "|---|---|---|", "| wanda | 56.12 | 3 |", "| broken |  |  |"]
