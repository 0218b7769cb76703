"""The leaderboard keeps what each mode measured (issue 25, item 4): a row is identified by its whole
target, a mode's own values survive in `extra`, and files of earlier versions read and are upgraded
in place with every row and value kept."""

import json
import math
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from prunerzero.leaderboard import COLUMNS, IDENTITY, NUMERIC, LeaderboardError, append, extras, legacy_target, read
from prunerzero.pruning.modes import get_mode

ROOT = Path(__file__).resolve().parents[1]


def row(metric, ppl, mode="unstructured", fields=None, **kw):
    """A row as `jobs.leaderboard_rows` writes one: budget and whole target from the mode's recipe."""
    recipe = get_mode(mode)
    target = recipe.make_target(fields or {})
    base = {"metric": metric, "formula": metric, "key": metric, "model": "m", "corpus": "c", "protocol": "p",
            "protocol_id": "p", "stats_mode": "one-shot", "split": "test", "mode": mode, "budget": target.describe(),
            "target": recipe.identity(target), "perplexity": ppl, "dense_perplexity": 10.0}
    return base | kw


@pytest.mark.parametrize("mode, a, b", [
    ("skip", {"ratio": 0.25}, {"ratio": 0.25, "steps": 7}),
    ("skip", {"ratio": 0.25}, {"ratio": 0.25, "router_init": "shortgpt"}),
    ("structured", {"latency": 0.8}, {"latency": 0.8, "width": 32}),
    ("structured", {"latency": 0.8}, {"latency": 0.8, "reducer": "max"}),
    ("experts", {"experts": 4}, {"experts": 4, "signal": "frequency"}),
])
def test_runs_that_differ_in_any_target_field_keep_their_own_rows(tmp_path, mode, a, b):
    csv = tmp_path / "lb.csv"
    first, second = row("wanda", 20.0, mode, a), row("wanda", 30.0, mode, b)
    assert first["budget"] == second["budget"]  # the words alone would have merged them
    append([first], csv)
    append([second], csv)
    assert sorted(read(csv)["perplexity"]) == [20.0, 30.0]
    append([row("wanda", 25.0, mode, b)], csv)  # a re-run of the second replaces it, nothing else
    df = read(csv)
    assert sorted(df["perplexity"]) == [20.0, 25.0] and not df.duplicated(subset=IDENTITY).any()


def test_a_modes_own_values_are_kept_in_one_json_column_and_read_back_as_columns(tmp_path):
    csv = tmp_path / "lb.csv"
    skip = row("router", 50.0, "skip", {"ratio": 0.25}, skip_ratio=np.float32(0.25), flops_skip_ratio=0.2125,
               attention_skip_ratio=0.1, mlp_skip_ratio=0.4, threshold=0.5, router_key="abc", steps_run=np.int64(300),
               removed=[[3, "mlp"]], plan={"keep": [[0, 1]]})  # structures: the plan, not a measurement
    structured = row("wanda", 80.0, "structured", {"latency": 0.8}, predicted_ratio=0.79, solver="highs",
                     heads_kept=270)
    append([skip, structured, row("wanda", 60.0)], csv)
    text = pd.read_csv(csv, dtype=str, keep_default_na=False)
    assert list(text.columns) == COLUMNS
    stored = json.loads(text.loc[0, "extra"])
    assert list(stored) == sorted(stored) and "plan" not in stored and "removed" not in stored
    assert stored["skip_ratio"] == 0.25 and stored["steps_run"] == 300 and isinstance(stored["steps_run"], int)
    assert text.loc[2, "extra"] == "{}"  # a mode without values of its own
    spread = extras(read(csv), "skip")
    assert list(spread.columns[-7:]) == ["skip_ratio", "flops_skip_ratio", "attention_skip_ratio", "mlp_skip_ratio",
                                         "threshold", "router_key", "steps_run"]  # the recipe's order, then others
    assert spread["skip_ratio"].iloc[0] == 0.25 and spread["router_key"].iloc[0] == "abc"
    both = extras(read(csv))
    assert both.loc[1, "solver"] == "highs" and both.loc[1, "heads_kept"] == 270 and pd.isna(both.loc[0, "solver"])
    again = append([read(csv).iloc[0].to_dict()], csv)  # a row read back and written again keeps its values
    assert len(again) == 3 and json.loads(again.loc[0, "extra"]) == stored


# the columns of the version before targets (HEAD before this change): no `target`, no `extra`
BEFORE_TARGETS = [c for c in COLUMNS if c not in ("target", "extra")]
LEGACY = [  # (mode, budget, sparsity, pattern, metric, perplexity, extra cells)
    ("unstructured", "0.5 unstructured per row", "0.5", "unstructured", "wanda", "60.7", {"params": "134515008"}),
    ("unstructured", "2:4", "0.5", "2:4", "wanda", "150.3", {}),
    ("unstructured", "0.5 unstructured per row + LSQ refit", "0.5", "unstructured", "wanda", "45.6", {}),
    ("unstructured", "0.6 unstructured per row, OWL allocation", "0.6", "unstructured", "wanda", "134.7", {}),
    ("skip", "0.25 of modules skipped", "nan", "", "router", "50.4", {"params": "134549628"}),
    ("experts", "4 of 8 experts per layer, top-2", "nan", "", "reap", "113.7", {}),
]


def same(a: str, b: str) -> bool:
    x, y = (float(v) if v else math.nan for v in (a, b))
    return x == y or math.isnan(x) and math.isnan(y)


def write_legacy(path: Path) -> pd.DataFrame:
    rows = [{c: "" for c in BEFORE_TARGETS} | {
        "metric": metric, "formula": metric, "key": metric, "model": "m", "corpus": "c", "protocol": "p",
        "protocol_id": "p", "split": "test", "mode": mode, "budget": budget, "sparsity": sparsity, "pattern": pattern,
        "group": "row" if pattern else "", "perplexity": ppl, "dense_perplexity": "33.7", "seed": "0",
        "timestamp": "2026-11-22T11:25:47+00:00"} | cells
        for mode, budget, sparsity, pattern, metric, ppl, cells in LEGACY]
    old = pd.DataFrame(rows, columns=BEFORE_TARGETS)
    old.to_csv(path, index=False)
    return old


def test_legacy_rows_get_the_identity_a_rerun_writes_or_one_of_their_own():
    unstructured = get_mode("unstructured")
    old = pd.DataFrame([{"mode": m, "budget": b, "sparsity": s, "pattern": p, "group": "row"}
                        for m, b, s, p, *_ in LEGACY])
    got = [legacy_target(r) for _, r in old.iterrows()]
    built = [unstructured.make_target(t) for t in unstructured.leaderboard_targets(
        {"sparsity": "0.5", "pattern": "unstructured,2:4", "group": "row"})]  # what `leaderboard` runs
    assert got[:2] == [unstructured.identity(t) for t in built]
    assert got[2] == unstructured.identity(unstructured.make_target({"sparsity": 0.5, "update": "lsq"}))
    assert got[3] == unstructured.identity(unstructured.make_target({"sparsity": 0.6, "allocation": "owl"}))
    assert json.loads(got[4]) == {"budget": "0.25 of modules skipped", "mode": "skip"}  # fields unknown: not guessed
    assert got[4] != get_mode("skip").identity(get_mode("skip").make_target({"ratio": 0.25}))


def test_a_csv_before_targets_reads_and_one_append_upgrades_it_every_row_kept(tmp_path):
    csv = tmp_path / "lb.csv"
    old = write_legacy(csv)
    df = read(csv)
    assert list(df.columns) == COLUMNS and df["target"].str.len().gt(0).all() and len(df) == len(LEGACY)
    assert pd.read_csv(csv).columns.tolist() == BEFORE_TARGETS  # reading writes nothing
    rerun = row("wanda", 59.0, fields={"sparsity": 0.5})  # the same measurement as the first old row
    fresh = row("router", 49.0, "skip", {"ratio": 0.25}, skip_ratio=0.25)  # a whole target: beside the old row
    append([rerun, fresh], csv)
    text = pd.read_csv(csv, dtype=str, keep_default_na=False)
    assert list(text.columns) == COLUMNS and len(text) == len(LEGACY) + 1
    assert text.loc[0, "perplexity"] == "59.0" and text.loc[len(LEGACY), "metric"] == "router"
    for i in range(1, len(LEGACY)):  # every other old row, every value it had (numbers as numbers: 0 is 0.0)
        for c in BEFORE_TARGETS:
            assert same(text.loc[i, c], old.loc[i, c]) if c in NUMERIC else text.loc[i, c] == old.loc[i, c], (i, c)
    assert text.loc[4, "target"] == legacy_target(read(csv).loc[4]) and text.loc[4, "extra"] == ""
    assert read(csv).loc[4, "params"] == 134549628


@pytest.mark.parametrize("column, value", [("target", "{not json"), ("extra", "[1, 2]")])
def test_a_damaged_json_cell_is_an_error_naming_the_line_and_nothing_is_written(tmp_path, column, value):
    csv = tmp_path / "lb.csv"
    append([row("a", 20.0), row("b", 30.0)], csv)
    df = pd.read_csv(csv, dtype=str, keep_default_na=False)
    df.loc[1, column] = value
    df.to_csv(csv, index=False)
    before = csv.read_bytes()
    with pytest.raises(LeaderboardError, match=f"line 3: column '{column}' holds .* not a JSON object"):
        read(csv)
    with pytest.raises(LeaderboardError):
        append([row("c", 10.0)], csv)
    assert csv.read_bytes() == before
    with pytest.raises(LeaderboardError, match="target .* is not a JSON object"):
        append([row("d", 10.0, target="0.5 unstructured")], tmp_path / "other.csv")


def test_the_committed_leaderboard_has_whole_targets_and_one_row_per_identity():
    text = pd.read_csv(ROOT / "results" / "leaderboard.csv", dtype=str, keep_default_na=False)
    assert list(text.columns) == COLUMNS  # upgraded in place
    df = read(ROOT / "results" / "leaderboard.csv")
    assert not df.duplicated(subset=IDENTITY).any()
    unstructured = df[df["mode"] == "unstructured"]
    assert unstructured["target"].map(lambda t: "target" in json.loads(t)).all()  # every one rebuilt in full
