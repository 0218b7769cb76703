"""EEP as a GA problem through the real engine: repaired genomes keep each layer's budget, the
seed is the metric-driven choice, crossover is row-wise, and a search on a tiny MoE (the real
experts mode applying each plan) never ends worse than its seed; a campaign config names it."""

import random

import pytest
import torch

from prunerzero.evolve.config import SearchConfig
from prunerzero.evolve.engine import Engine
from prunerzero.evolve.evaluation import Measured
from prunerzero.evolve.experts_problem import ExpertsProblem
from prunerzero.evolve.problems import make_problem
from prunerzero.fitness.evaluator import FitnessResult
from prunerzero.pruning.interventions import DenseSnapshot
from prunerzero.pruning.candidates import decode
from prunerzero.pruning.modes import get_mode
from conftest import build
from test_experts import context, windows

SEARCH = SearchConfig(population=6, generations=3, hall_of_fame=3, elites=1, seed=1)


def test_repair_keeps_each_layers_budget_and_the_seed_is_the_metric_choice():
    p = ExpertsProblem(SEARCH, {"order": "reap", "moves": 3}, counts=[2, 3, 2], experts=4)
    assert p.plan(p.seeds()[0]).keep == ((0, 1), (0, 1, 2), (0, 1))
    random.seed(0)
    for _ in range(200):
        a, b = p.random_individual(), p.random_individual()
        a, b = p.cross_rows(a, b)
        (a,) = p.mutate(a)
        genes = p.prepare(a).individual
        assert [sum(row) for row in p.rows(genes)] == [2, 3, 2]
    assert p.repair([1, 1, 1, 1, 0, 0, 0, 0, 1, 0, 0, 0]) == [1, 1, 0, 0, 1, 1, 1, 0, 1, 1, 0, 0]
    plan = decode(p.candidate(p.decode([0, 1, 1, 0, 1, 0, 1, 1, 0, 0, 1, 1])))
    assert plan.keep == ((1, 2), (0, 2, 3), (2, 3)) and plan.key == p.key([0, 1, 1, 0, 1, 0, 1, 1, 0, 0, 1, 1])


def test_the_merge_stage_evolves_levels_of_removed_experts_only():
    p = ExpertsProblem(SEARCH, {"stage": "merge", "keep": "0,2;1,3", "levels": 3}, counts=[2, 2], experts=4)
    assert p.seeds()[0] == [0] * 8
    assert p.repair([3, 3, 3, 3, 3, 3, 3, 3]) == [0, 3, 0, 3, 3, 0, 3, 0]
    plan = p.plan([0, 2, 0, 1, 0, 0, 3, 0])
    assert plan.keep == ((0, 2), (1, 3)) and plan.merge == ((0, 2, 0, 1), (0, 0, 3, 0))


@pytest.mark.parametrize("options,needle", [
    ({"stage": "both"}, "unknown stage"), ({"keep": "0,1;0"}, "each layer must keep its budget"),
    ({"order": "no-such-metric"}, "unknown metric"), ({"colour": 1}, "problem.colour: unknown key"),
])
def test_bad_options_name_the_key(options, needle):
    with pytest.raises((ValueError, KeyError), match=needle):
        ExpertsProblem(SEARCH, {"stage": "merge", **options} if "keep" in options else options, [2, 2], 4)


def test_an_eep_search_on_a_tiny_moe_is_never_worse_than_its_seed():
    """The real experts mode applies every plan; fitness is the logits' error against the dense MoE."""
    model = build("mixtral")
    ctx = context(model)
    mode, snapshot, ids = get_mode("experts"), DenseSnapshot(ctx.units), windows()
    dense = model(ids).logits
    target = mode.make_target({"experts": 2})

    def fitness(batch):
        out = []
        for key, data in batch:
            mode.apply(ctx, decode(data), target)
            err = float((model(ids).logits - dense).square().mean())
            ctx.edits.restore()
            snapshot.restore()
            out.append(Measured(4, FitnessResult(key, err, "ok")))
        return out

    for stage in ("prune", "merge"):
        p = ExpertsProblem(SEARCH, {"stage": stage, "order": "frequency"}, [2, 2], 4)
        engine = Engine(SEARCH, fitness, problem=p)
        seed = fitness([(p.key(p.seeds()[0]), p.candidate(p.seeds()[0]))])[0].result.fitness
        while not engine.done:
            engine.step()
        assert engine.hof[0].fitness.values[1] <= seed
    assert torch.equal(model(ids).logits, dense)


def test_a_campaign_config_builds_the_problem_for_the_real_moe_shape():
    from prunerzero.evolve.config import load_config

    config = load_config("experiments/smollm2-experts-eep.toml")
    assert config.eval.mode == "experts" and config.search.problem == "experts"
    problem = make_problem(config)
    assert problem.counts == [4] * 30 and problem.E == 8
