"""The GA through the real engine: the allocation problem's genomes keep the total sparsity, and a
GA campaign on the toy evaluator is seeded, checkpointed and resumed exactly like the GP's."""

import random

import pytest

from prunerzero.evolve.campaign import evaluator_factory, load_checkpoint, resume_campaign, run_campaign
from prunerzero.evolve.config import ConfigError, SearchConfig
from prunerzero.evolve.engine import Engine
from prunerzero.evolve.evaluation import Measured
from prunerzero.evolve.genome import AllocationProblem
from prunerzero.evolve.problems import TOY_BLOCKS, make_problem
from prunerzero.evolve.toy import toy_config
from prunerzero.fitness.evaluator import FitnessResult
from prunerzero.pruning.candidates import decode

from test_evolve_campaign import QUIET, Interrupt, _hof, _rows, _search_trace

GA = {"search": {"problem": "allocation", "population": 10, "generations": 4, "hall_of_fame": 5},
      "problem": {"metric": "wanda", "levels": 3, "step": 0.05}}


def problem(**options):
    return AllocationProblem(SearchConfig(), {"metric": "wanda", **options}, sparsity=0.5, blocks=6)


def test_allocation_genomes_keep_the_total_and_decode_to_sparsities():
    p = problem(levels=2, step=0.1)
    random.seed(0)
    for _ in range(200):
        ind = p.random_individual()
        (ind,) = p.mutate(ind)
        assert sum(ind) == 0 and all(-2 <= g <= 2 for g in ind)
    prepared = p.prepare(p.decode([2, 2, 2, -1, 0, 0]))  # off total: repaired towards uniform
    genes = list(prepared.individual)
    assert sum(genes) == 0 and all(-2 <= g <= 2 for g in genes) and prepared.ok
    data = p.candidate(p.decode([1, -1, 0, 0, 2, -2]))
    allocation = decode(data)
    assert allocation.sparsities == (0.6, 0.4, 0.5, 0.5, 0.7, 0.3)
    assert allocation.key == p.key([1, -1, 0, 0, 2, -2]) and allocation.key.endswith(allocation.resolved.key)
    assert p.seeds()[0] == [0] * 6  # the uniform allocation starts every campaign


@pytest.mark.parametrize("options, message", [
    ({"metric": ""}, "problem.metric"), ({"levels": 30}, "leaves \\[0, 1\\)"), ({"step": "big"}, "problem.step: expected float"),
    ({"colour": 1}, "problem.colour: unknown key"), ({"metric": "no-such-metric"}, "unknown metric"),
])
def test_bad_allocation_options_name_the_key(options, message):
    with pytest.raises((ValueError, KeyError), match=message):
        problem(**options)


def by_spread(candidates):
    """Stub fitness: allocations far from uniform are worse."""
    return [Measured(8, FitnessResult(k, 10.0 + sum(abs(s - 0.5) for s in c["sparsities"]), "ok"))
            for k, c in candidates]


def test_the_engine_runs_a_genome_problem():
    search = SearchConfig(population=8, generations=3, hall_of_fame=4, elites=1, seed=2)
    engine = Engine(search, by_spread, problem=AllocationProblem(search, {"metric": "wanda"}, 0.5, 4))
    while not engine.done:
        engine.step()
    assert list(engine.hof[0]) == [0, 0, 0, 0] and engine.hof[0].fitness.values[1] == 10.0
    assert len({ind.key for ind in engine.hof}) == len(engine.hof)


@pytest.fixture(scope="module")
def ga_straight(tmp_path_factory):
    cfg = toy_config(tmp_path_factory.mktemp("ga"), **GA)
    return cfg, run_campaign(cfg, console=QUIET)


def test_ga_campaign_runs_through_the_real_engine(ga_straight):
    cfg, run_dir = ga_straight
    history = _rows(run_dir / "history.csv")
    assert len(history) == 5 and sum(int(r["evaluations"]) for r in history) > 10
    best = [float(r["best_fitness"]) for r in history]
    assert best == sorted(best, reverse=True)
    hof = _rows(run_dir / "hall_of_fame.csv")
    assert list(hof[0]) == ["rank", "fitness", "windows", "formula", "key", "generation", "genes"]
    for row in hof:
        genes = [int(g) for g in row["genes"].split()]
        assert len(genes) == TOY_BLOCKS and sum(genes) == 0 and row["key"].startswith("allocation[")
    state = load_checkpoint(run_dir)
    assert state["engine"]["problem"] == "allocation" and isinstance(state["engine"]["population"][0][0], list)


@pytest.mark.parametrize("kill_at", [1, 3])
def test_ga_campaign_killed_and_resumed_ends_identical(ga_straight, tmp_path, kill_at):
    _, reference = ga_straight
    cfg = toy_config(tmp_path, **GA)
    run_dir = tmp_path / "run"
    with pytest.raises(KeyboardInterrupt):
        run_campaign(cfg, run_dir=run_dir, backend=Interrupt(evaluator_factory(cfg.eval_spec()), kill_at),
                     console=QUIET)
    resume_campaign(run_dir, console=QUIET)
    assert _hof(run_dir) == _hof(reference)
    assert _search_trace(run_dir) == _search_trace(reference)


def test_allocation_needs_an_unstructured_target(tmp_path):
    cfg = toy_config(tmp_path, **GA, target={"pattern": "2:4"})
    with pytest.raises(ValueError, match="unstructured pattern"):
        make_problem(cfg)
    with pytest.raises(ConfigError, match="search.problem"):
        toy_config(tmp_path, search={"problem": "tsp"})
