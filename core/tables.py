"""Markdown tables for the reports under results/: one way to write a table of rows, so every bench
script formats missing values and numbers alike."""

from __future__ import annotations

from collections.abc import Mapping, Sequence


def markdown_table(rows: Sequence[Mapping], cols: Sequence[tuple[str, str, str]]) -> list[str]:
    """The lines of a table: `cols` is (header, key, format spec); a missing or NaN value is an
    empty cell, a value with a format spec is formatted with it, anything else is `str`."""
    lines = ["| " + " | ".join(h for h, _, _ in cols) + " |", "|" + "---|" * len(cols)]
    for r in rows:
        cells = []
        for _, key, fmt in cols:
            v = r.get(key)
            cells.append("" if v is None or v != v else format(v, fmt) if fmt else str(v))
        lines.append("| " + " | ".join(cells) + " |")
    return lines
