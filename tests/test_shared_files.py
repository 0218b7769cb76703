"""Files the project reads and writes for the user (issue 29, item 8): a leaderboard with a NaN
perplexity stays readable, a row pruned at another sparsity than its budget is refused, and a
campaign file without a [search] table is refused rather than run with defaults."""

import math

import pytest

from prunerzero.evolve.config import ConfigError, load_config
from prunerzero.leaderboard import COLUMNS, LeaderboardError, append, best, read


def row(metric, ppl, **kw):
    base = {c: "" for c in COLUMNS}
    base |= {"metric": metric, "key": metric, "model": "m", "corpus": "c", "protocol_id": "p", "split": "test",
             "mode": "unstructured", "budget": "0.5 unstructured per row", "sparsity": 0.5, "pattern": "unstructured",
             "group": "row", "perplexity": ppl, "dense_perplexity": 10.0}
    return base | kw


@pytest.mark.parametrize("value", [math.nan, math.inf])
def test_a_non_finite_perplexity_row_leaves_the_leaderboard_readable_and_appendable(tmp_path, value):
    csv = tmp_path / "lb.csv"
    append([row("broken", value)], csv)
    append([row("fine", 20.0)], csv)  # the next append reads the file back
    df = read(csv)
    assert list(df["metric"]) == ["broken", "fine"] and df["perplexity"].iloc[1] == 20.0
    got = df["perplexity"].iloc[0]
    assert math.isnan(got) if math.isnan(value) else got == value
    assert list(best(df)["metric"]) == ["fine"]


def test_a_row_pruned_at_another_sparsity_than_its_budget_is_refused(tmp_path):
    csv = tmp_path / "lb.csv"
    allocation = row("allocation of x", 30.0, sparsity=0.7, budget="0.7 unstructured per row", achieved_sparsity=0.499)
    with pytest.raises(LeaderboardError, match=r"pruned at sparsity 0.499, not the budget's 0.7"):
        append([allocation], csv)
    assert not csv.exists()
    append([row("wanda", 60.0, achieved_sparsity=0.49926), row("experts", 9.0, sparsity=math.nan, achieved_sparsity=0.3)],
           csv)  # per-row rounding, and a mode without a weight-sparsity budget
    assert len(read(csv)) == 2


@pytest.mark.parametrize("text, needle", [("", r"no \[search\] table \(the file is empty\)"),
                                          ('name = "x"\n[eval]\nmodel = "toy"\n', r"no \[search\] table"),
                                          ('[protocol]\ncalib_windows = 4\n', r"no \[search\] table")])
def test_a_campaign_file_without_a_search_table_is_refused_naming_the_file(tmp_path, text, needle):
    path = tmp_path / "campaign.toml"
    path.write_text(text)
    with pytest.raises(ConfigError, match=f"campaign.toml: {needle}"):
        load_config(path)


def test_a_campaign_file_with_an_empty_search_table_takes_the_defaults(tmp_path):
    path = tmp_path / "campaign.toml"
    path.write_text('[eval]\nmodel = "toy"\n[search]\n')
    assert load_config(path).search.generations >= 0


def test_top_k_zero_written_by_hand_is_refused_naming_the_field():
    """0 is the experts target's sentinel for "the model's top-k": written with --set it used to
    be accepted silently, and the saved model kept top-2."""
    from prunerzero.core.fields import parse_assignments
    from prunerzero.pruning.experts.mode import ExpertsTarget

    assert parse_assignments(ExpertsTarget, ["top_k=1"]) == {"top_k": 1}
    with pytest.raises(ValueError, match=r"--set top_k: 0 is not allowed .*the model's own top-k"):
        parse_assignments(ExpertsTarget, ["top_k=0"])
