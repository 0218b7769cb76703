"""Evolvable constants: trees draw numbers from a grid, and the best offspring's numbers are refined
by deterministic moves measured like any candidate — through the real engine, resumable."""

import re

import pytest

from prunerzero.evolve.campaign import evaluator_factory, resume_campaign, run_campaign
from prunerzero.evolve.config import SearchConfig
from prunerzero.evolve.engine import Engine
from prunerzero.evolve.evaluation import Measured
from prunerzero.evolve.problem import MetricProblem, from_string
from prunerzero.evolve.toy import toy_config
from prunerzero.fitness.evaluator import FitnessResult

from test_evolve_campaign import QUIET, Interrupt, _hof, _rows, _search_trace

CONSTANTS = {"search": {"operators": "constants", "population": 10, "generations": 3, "hall_of_fame": 5},
             "problem": {"constants": True, "refine": 2}}


def near_07(candidates):
    """Stub fitness: the closer a formula's constants are to 0.7, the better."""
    out = []
    for key, formula in candidates:
        numbers = [float(x) for x in re.findall(r"-?\d+\.\d+", formula)] or [10.0]
        out.append(Measured(8, FitnessResult(key, 10.0 + min(abs(x - 0.7) for x in numbers), "ok")))
    return out


def test_refinement_moves_a_constant_where_it_measures_better():
    search = SearchConfig(operators="constants", population=4, generations=1)
    problem = MetricProblem(search, {"constants": True, "refine": 1})
    engine = Engine(search, near_07, problem=problem)
    parent = engine._prepare(from_string("mul(abs(W), pow(X, 0.5))", problem.pset))
    engine._evaluate([parent])
    (refined,) = engine._refine([parent])
    assert str(refined) == "mul(pow(X, 0.75), abs(W))" and refined.fitness.values[1] == pytest.approx(10.05)
    assert engine._refined == 4  # x0.5, x2, -0.25, +0.25


def test_options_are_checked():
    with pytest.raises(ValueError, match="problem.refine: refines constants"):
        MetricProblem(SearchConfig(), {"refine": 2})
    with pytest.raises(ValueError, match="problem.colour: unknown key"):
        MetricProblem(SearchConfig(), {"colour": 1})


def test_a_campaign_with_constants_refines_and_resumes_identically(tmp_path):
    reference = run_campaign(toy_config(tmp_path / "a", **CONSTANTS), console=QUIET)
    history = _rows(reference / "history.csv")
    assert sum(int(r["refined"]) for r in history) > 0
    assert any(re.search(r"\d\.\d", r["formula"]) for r in _rows(reference / "evaluations.csv"))
    cfg = toy_config(tmp_path / "b", **CONSTANTS)
    with pytest.raises(KeyboardInterrupt):
        run_campaign(cfg, run_dir=tmp_path / "b" / "run", console=QUIET,
                     backend=Interrupt(evaluator_factory(cfg.eval_spec()), at=3))
    resume_campaign(tmp_path / "b" / "run", console=QUIET)
    assert _hof(tmp_path / "b" / "run") == _hof(reference)
    assert _search_trace(tmp_path / "b" / "run") == _search_trace(reference)
