"""A mode is one recipe: a tiny mode defined here and registered the way pruning/modes.py registers
the five is accepted by the CLI, the candidates, the campaign config and the problems registry —
adding a mode takes its package (here: this file), one registry line and its tests."""

from __future__ import annotations

from dataclasses import asdict, dataclass

import pytest
import torch
from typer.testing import CliRunner

from prunerzero.cli import _mode_budgets, app
from prunerzero.evolve.config import ConfigError, from_dict
from prunerzero.jobs import _check_applies
from prunerzero.pruning import candidates, modes
from prunerzero.pruning.candidates import CandidateError, Method, decode, encode
from conftest import tiny_context
from prunerzero.pruning.interventions import DenseSnapshot
from prunerzero.pruning.modes import MODES, ModeError, get_mode, register
from prunerzero.pruning.recipe import Recipe, unsupported
from prunerzero.pruning.report import PruneReport


# ------------------------------------------------------------------ the tiny mode's "package"
@dataclass(frozen=True)
class RowsTarget:
    """Zero the first `rows` output rows of every unit of block `block`."""

    rows: int = 1
    block: int = 0
    sparsity: float = 0.0  # only here to be swept by a leaderboard (`--sparsity`)

    def __post_init__(self) -> None:
        if self.rows < 0:
            raise ValueError(f"rows must be >= 0, got {self.rows}")

    def describe(self) -> str:
        return f"{self.rows} rows of block {self.block}"


@dataclass(frozen=True)
class Rows:
    """The tiny mode's own candidate kind: how many rows, whatever the target says."""

    rows: int

    @property
    def key(self) -> str:
        return f"rows:{self.rows}"

    name = "rows"
    needs = frozenset()

    @property
    def formula(self) -> str:
        return f"<{self.rows} rows>"

    def to_data(self) -> dict:
        return {"kind": "tiny_rows", "rows": self.rows}

    @classmethod
    def from_data(cls, data: dict) -> Rows:
        if not isinstance(data.get("rows"), int):
            raise CandidateError("tiny_rows candidate: field 'rows' must be an int")
        return cls(data["rows"])


def _zero_rows(ctx, rows: int, target: RowsTarget, report: PruneReport) -> None:
    with torch.no_grad():
        for unit in ctx.adapter.block_units(target.block):
            unit.weight[:rows] = 0
            report.add_mask(unit.name, torch.arange(unit.shape[0]) < rows)
    report.add_units(ctx.units)


def _first(ctx, target, report):
    _zero_rows(ctx, target.rows, target, report)


METHODS = {"first": _first}


def apply_rows(ctx, candidate, target: RowsTarget) -> PruneReport:
    report = PruneReport(target, getattr(candidate, "name", "metric"))
    if isinstance(candidate, Method) and candidate.name in METHODS:
        METHODS[candidate.name](ctx, target, report)
    elif isinstance(candidate, Rows):
        _zero_rows(ctx, candidate.rows, target, report)
    else:
        raise unsupported("tiny", candidate)
    return report


RECIPE = Recipe("tiny", "the first rows of one block zeroed (a test mode)", RowsTarget, apply_rows,
                methods=METHODS, default="first", options=("sparsity",), sweep="sparsity",
                leaderboard_metrics=("first",), columns=(), kinds={"tiny_rows": Rows}, problems=("metric",))


@pytest.fixture
def tiny_mode():
    """The tiny mode registered (one line, as in pruning/modes.py), then taken out again."""
    register(RECIPE)
    yield RECIPE
    del MODES["tiny"]
    del candidates.KINDS["tiny_rows"]


# ------------------------------------------------------------------ what accepts it
def test_the_registry_and_the_cli_accept_the_tiny_mode(tiny_mode):
    assert get_mode("tiny") is RECIPE and "tiny" in MODES
    assert RECIPE.candidate("first") == Method("first") and RECIPE.make_target({"rows": 2}) == RowsTarget(2)
    assert _mode_budgets("tiny", "0.1,0.2", "row", None) == [{"sparsity": 0.1}, {"sparsity": 0.2}]
    result = CliRunner().invoke(app, ["prune", "--out", "x", "--mode", "tiny", "--set", "rows=-1"])
    assert result.exit_code == 2 and "rows must be >= 0" in " ".join(result.output.split())
    result = CliRunner().invoke(app, ["prune", "--out", "x", "--mode", "tiny", "--set", "keep=1"])
    assert result.exit_code == 2 and "--set keep: unknown key" in " ".join(result.output.split())


def test_its_candidate_kind_travels_as_data_and_applies_only_in_it(tiny_mode):
    data = encode(Rows(3))
    assert decode(data) == Rows(3) and modes.only_in(Rows(3)) == "tiny"
    _check_applies(RECIPE, "rows.json", Rows(3))
    with pytest.raises(ModeError, match="a Rows candidate applies in mode 'tiny', not 'unstructured'"):
        _check_applies(get_mode("unstructured"), "rows.json", Rows(3))


def test_the_campaign_config_and_the_problems_registry_read_its_problems(tiny_mode):
    config = from_dict({"eval": {"model": "toy", "mode": "tiny"}, "target": {"rows": 2}, "search": {}})
    assert config.target == asdict(RowsTarget(2))
    with pytest.raises(ConfigError, match="search.problem: 'allocation' does not apply in mode 'tiny'; its problems: metric"):
        from_dict({"eval": {"model": "toy", "mode": "tiny"}, "search": {"problem": "allocation"}})


def test_it_prunes_and_restores_like_every_mode(tiny_mode, tiny_llama, tiny_windows):
    ctx = tiny_context(tiny_llama, tiny_windows, stats=None)
    adapter = ctx.adapter
    snapshot = DenseSnapshot(adapter.prunable())
    dense = tiny_llama(tiny_windows).logits
    report = RECIPE.apply(ctx, RECIPE.candidate("first"), RECIPE.make_target({"rows": 2}))
    assert report.sparsity > 0 and report.fingerprint
    assert RECIPE.apply(ctx, Rows(2), RECIPE.make_target({"rows": 5})).fingerprint == report.fingerprint
    ctx.edits.restore()
    snapshot.restore()
    assert torch.equal(tiny_llama(tiny_windows).logits, dense)


def test_every_mode_is_one_recipe():
    """What every outer part reads is there for each of the five."""
    for name, recipe in MODES.items():
        assert recipe.name == name and all(callable(f) for f in recipe.methods.values())
        assert recipe.default in recipe.methods or recipe.default == "wanda"
        assert all(m in recipe.methods or m in ("magnitude", "wanda", "ria", "pruner-zero")
                   for m in recipe.leaderboard_metrics), name
        assert "metric" in recipe.problems and (not recipe.sweep or recipe.sweep in recipe.options)
        target = recipe.make_target({})
        assert recipe.identity(target).startswith('{"mode": "%s"' % name)
    assert get_mode("experts").leaderboard_targets({"sparsity": "0.5", "group": "row"}) == [{}]
    assert get_mode("structured").leaderboard_targets({"latency": "0.8,0.6"}) == [{"latency": 0.8}, {"latency": 0.6}]


def test_the_identity_is_the_whole_target():
    """Two budgets that describe() alike are different rows when any field differs."""
    skip = get_mode("skip")
    a, b = skip.make_target({"ratio": 0.25}), skip.make_target({"ratio": 0.25, "steps": 7})
    assert a.describe() == b.describe() and skip.identity(a) != skip.identity(b)
    assert skip.identity(a) == skip.identity(skip.make_target({"ratio": 0.25}))
