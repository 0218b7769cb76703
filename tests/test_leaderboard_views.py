"""The leaderboard as people see it (issue 25, item 4): `leaderboard --mode M` runs with its own
defaults in every mode, `--show` prints one compact table per mode and setting that never folds a
word, `--plot` writes one figure per mode labelled by name or short formula."""

import struct

import pandas as pd
import pytest
from typer.testing import CliRunner

from prunerzero import cli
from prunerzero.jobs import _candidate
from prunerzero.leaderboard import append, read
from prunerzero.leaderboard_view import best_handmade, is_handmade, label, plot, show
from prunerzero.pruning.modes import MODES, get_mode

RUN = "smollm2-cpu-unstructured50-20261122-131852-2"


def row(metric, ppl, mode="unstructured", fields=None, formula=None, key=None, **kw):
    recipe = get_mode(mode)
    target = recipe.make_target(fields or {})
    return {"metric": metric, "formula": formula or metric, "key": key or metric, "model": "m", "corpus": "c",
            "protocol": "calib 4x8 seed 0, eval <= 4x8, split 0.8/0.1, stats one-shot", "protocol_id": "p",
            "split": "test", "mode": mode, "budget": target.describe(), "target": recipe.identity(target),
            "perplexity": ppl, "dense_perplexity": 10.0} | kw


def board(tmp_path):
    csv = tmp_path / "lb.csv"
    append([row("wanda", 20.0), row("magnitude", 90.0), row(RUN, 19.0, formula="mul(X, tanh(sqr(tanh(tanh(tanh(W))))))",
                                                             key="X*tanh(tanh(tanh(tanh(W)))**2)"),
            row("tanh(mul(mul(mul(G, sqr(sqr(W))), mul(X, sqr(sqrt(G)))), sqrt(mul(G, W))))", 21.0),
            row("router", 15.0, "skip", {"ratio": 0.25}, skip_ratio=0.25, flops_skip_ratio=0.2125, threshold=0.51),
            row("shortgpt", 40.0, "skip", {"ratio": 0.25}, skip_ratio=0.25, flops_skip_ratio=0.25)], csv)
    return csv


@pytest.mark.parametrize("mode", list(MODES))
def test_every_modes_default_metrics_and_targets_resolve_without_a_model(mode):
    recipe = get_mode(mode)
    targets = cli._mode_budgets(mode, "0.5", "row", None, None, "unstructured,2:4")  # the command's defaults
    assert targets and all(recipe.make_target(t) for t in targets)
    for spec in recipe.leaderboard_metrics:
        name, formula, key, thing = _candidate(recipe, spec)  # what leaderboard_rows resolves, before loading
        assert name and key, spec


@pytest.mark.parametrize("mode", list(MODES))
def test_the_leaderboard_command_runs_each_mode_with_its_defaults(tmp_path, monkeypatch, mode):
    """The command as typed (`prunerzero leaderboard --mode M`), the model-loading part replaced by
    what it does before loading: every candidate resolved in the mode, every target built."""
    def rows_without_a_model(model, corpus, metrics, mode, targets, on_row, **_):
        recipe = get_mode(mode)
        for spec in metrics:
            name, formula, key, _ = _candidate(recipe, spec)
            for target in map(recipe.make_target, targets):
                on_row(row(name, 30.0, mode, formula=formula, key=key) | {
                    "budget": target.describe(), "target": recipe.identity(target)})

    monkeypatch.setattr(cli, "leaderboard_rows", rows_without_a_model)
    csv = tmp_path / "lb.csv"
    result = CliRunner().invoke(cli.app, ["leaderboard", "--mode", mode, "--csv", str(csv)])
    assert result.exit_code == 0, result.output
    df = read(csv)
    assert sorted(set(df["metric"])) == sorted(_candidate(get_mode(mode), m)[0] for m in get_mode(mode).leaderboard_metrics)
    assert set(df["mode"]) == {mode} and f"== {mode} mode" in result.output


def test_rows_are_labelled_by_name_or_short_formula_never_a_run_id():
    assert label(row(RUN, 1.0, formula="mul(X, tanh(sqr(tanh(tanh(tanh(W))))))",
                     key="X*tanh(tanh(tanh(tanh(W)))**2)")) == "X*tanh(tanh(tanh(tanh(W)))**2)"  # the shorter form
    alloc = row(f"allocation of {RUN}", 1.0, formula="mul(G, X) @ [0.44, 0.5]", key="allocation[0.44,0.5]:G*X")
    assert label(alloc) == "alloc. G*X"
    deep = "tanh(" * 20 + "W" + ")" * 20
    long = label(row(deep, 1.0, formula=deep, key="tree:" + deep))  # a metric given as its expression
    assert len(long) <= 38 and long.endswith("…")
    assert label(row("REAP + merge", 1.0, formula="reap", key="experts:REAP + merge")) == "REAP + merge"
    assert label(row("sparsegpt", 1.0, formula="<method sparsegpt>", key="method:sparsegpt")) == "sparsegpt"
    assert is_handmade("wanda") and is_handmade("taylor") and is_handmade("REAP (gate x output norm)")
    assert not is_handmade(RUN) and not is_handmade("EEP stage 1 (prune, from magnitude)")


def test_the_best_hand_made_row_is_the_lowest_built_in_or_method():
    df = pd.DataFrame([row(RUN, 10.0), row("magnitude", 50.0), row("wanda", 20.0), row("gradient", float("nan"))])
    assert best_handmade(df) == 2


def test_show_prints_a_table_per_mode_and_setting_that_fits_the_width_unfolded(tmp_path):
    csv = board(tmp_path)
    result = CliRunner().invoke(cli.app, ["leaderboard", "--show", "--csv", str(csv)], env={"COLUMNS": "80"})
    assert result.exit_code == 0, result.output
    lines = result.output.splitlines()
    assert max(map(len, lines)) <= 80
    assert "== unstructured mode: 4 row(s) ==" in lines and "== skip mode: 2 row(s) ==" in lines
    rows = {ln.split()[1] if ln.startswith("*") else ln.split()[0]: ln for ln in lines if ln[:3].strip() in ("", "*")
            and ln.strip()}
    assert "X*tanh(tanh(tanh(tanh(W)))**2)" in rows and RUN not in result.output  # whole label, one line
    assert rows["wanda"].startswith("*") and not rows["magnitude"].startswith("*")  # the best hand-made row
    wide = show(read(csv), width=120).splitlines()
    header = next(ln for ln in wide if ln.lstrip().startswith("metric / formula") and "skip_ratio" in ln)
    assert header.split()[-3:] == ["skip_ratio", "flops_skip_ratio", "threshold"]  # the mode's own, its recipe's order
    assert "(dense 10.000)" in result.output
    only = CliRunner().invoke(cli.app, ["leaderboard", "--show", "--mode", "skip", "--csv", str(csv)])
    assert "== skip mode" in only.output and "unstructured mode" not in only.output


def test_show_leaves_out_the_columns_a_narrow_width_has_no_room_for():
    frame = pd.DataFrame([row("wanda", 20.0), row(RUN, 19.0, formula="mul(X, W)", key="X*W")])
    frame["extra"] = ['{"a_long_value_name": 1.5, "another_long_value_name": 2}'] * 2
    narrow, wide = show(frame, width=60), show(frame, width=120)
    assert max(map(len, narrow.splitlines())) <= 60 and "a_long_value_name" not in narrow
    assert "another_long_value_name" in wide and "X*W" in narrow


def png_size(path) -> tuple[int, int]:
    return struct.unpack(">II", path.read_bytes()[16:24])


def test_plot_writes_one_reasonably_sized_figure_per_mode(tmp_path):
    csv = board(tmp_path)
    many = [row("wanda", 20.0 + s, fields={"sparsity": s}) for s in (0.1, 0.2, 0.3, 0.4, 0.6, 0.7, 0.8)]
    append(many, csv)
    written = plot(read(csv), tmp_path / "plots" / "leaderboard.png")
    assert [p.name for p in written] == ["leaderboard-unstructured.png", "leaderboard-skip.png"]
    width, height = png_size(written[0])  # 8 budgets: a grid of panels, not one strip
    assert width <= 2000 and height <= 2000
    result = CliRunner().invoke(cli.app, ["leaderboard", "--show", "--csv", str(csv), "--mode", "skip", "--plot",
                                          str(tmp_path / "{mode}.png")])
    assert result.exit_code == 0 and (tmp_path / "skip.png").is_file() and not (tmp_path / "unstructured.png").exists()
