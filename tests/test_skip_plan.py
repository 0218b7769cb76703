"""The skip mode's removal sets (SkipPlan) and their GA (skip_plan) on tiny random-init models: a
plan removes exactly its sublayers and restores bit-identically, travels as data and as a key,
refuses plans off the model, the scope or the budget; the GA keeps the count, starts from the
hand-made plans, and a search through the real engine and mode never ends worse than its seeds."""

import json
import random

import pytest
import torch

from prunerzero.evolve.config import SearchConfig, from_dict
from prunerzero.evolve.engine import Engine
from prunerzero.evolve.evaluation import Measured
from prunerzero.evolve.export import ExportError, export_run
from prunerzero.evolve.skip_problem import SkipPlanOptions, SkipPlanProblem
from prunerzero.fitness.evaluator import FitnessResult
from prunerzero.pruning.candidates import CandidateError, Method, decode, read_candidate_file
from prunerzero.pruning.interventions import DenseSnapshot
from prunerzero.pruning.skip.mode import ranked, removed_count
from prunerzero.pruning.skip.plan import SkipPlan
from test_skip import DATA_IDS, MODE, context

SEARCH = SearchConfig(population=6, generations=3, hall_of_fame=3, elites=1, seed=1)


@pytest.fixture(autouse=True)
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("PRUNERZERO_CACHE", str(tmp_path / "cache"))


def test_a_plan_removes_exactly_its_sublayers_and_restores():
    ctx = context("llama")
    ids = DATA_IDS[100:102]
    dense = ctx.model(ids).logits
    plan = decode({"kind": "skip_plan", "removed": [[3, "mlp"], [0, "attention"]]})
    report = MODE.apply(ctx, plan, MODE.make_target({"ratio": 0.25}))
    assert report.extra["removed"] == [[0, "attention"], [3, "mlp"]]
    assert report.extra["skip_ratio"] == 0.25
    changed = ctx.model(ids).logits
    assert not torch.equal(changed, dense)
    ctx.edits.restore()
    assert torch.equal(ctx.model(ids).logits, dense)
    # the same removal named by a ranking gives the same fingerprint (plans compare by phenotype)
    order, chosen = ranked(ctx, Method("removal"), MODE.make_target({"ratio": 0.25}))
    same = MODE.apply(ctx, SkipPlan(tuple(chosen)), MODE.make_target({"ratio": 0.25})).fingerprint
    ctx.edits.restore()
    by_method = MODE.apply(ctx, Method("removal"), MODE.make_target({"ratio": 0.25})).fingerprint
    ctx.edits.restore()
    assert same == by_method and len(order) == 8


def test_a_plan_travels_as_data_and_as_its_key():
    plan = SkipPlan(((12, "mlp"), (3, "attention")))
    assert plan.key == "skip[3a,12m]"
    assert SkipPlan.from_key(plan.key) == plan == decode(plan.to_data())
    assert SkipPlan.from_key("skip[]").removed == ()


@pytest.mark.parametrize("data,needle", [
    ({"removed": [[0, "attn"]]}, "distinct"), ({"removed": [[0, "mlp"], [0, "mlp"]]}, "distinct"),
    ({"removed": [[True, "mlp"]]}, "distinct"), ({"removed": "0m"}, "must be a list"),
    ({"removed": [[1, "mlp", 2]]}, "pairs"),
])
def test_bad_plan_data_is_named(data, needle):
    with pytest.raises(CandidateError, match=needle):
        decode({"kind": "skip_plan", **data})


@pytest.mark.parametrize("key", ["skip[3x]", "skip[3a,]", "skip[../a]", "skip[1a]; rm", "skip[-1a]"])
def test_a_bad_key_is_refused(key):
    with pytest.raises(CandidateError, match="not a skip plan key"):
        SkipPlan.from_key(key)


@pytest.mark.parametrize("removed,target,needle", [
    ([[9, "mlp"], [0, "mlp"]], {"ratio": 0.25}, "not both sublayers"),
    ([[0, "mlp"]], {"ratio": 0.25}, "removes 1 sublayers; ratio 0.25 of 8 removes 2"),
    ([[0, "mlp"], [1, "attention"]], {"ratio": 0.25, "modules": "mlp"}, "not mlp sublayers"),
])
def test_a_plan_off_the_model_scope_or_budget_is_refused_and_nothing_changes(removed, target, needle):
    ctx = context("llama")
    ids = DATA_IDS[100:102]
    dense = ctx.model(ids).logits
    with pytest.raises(ValueError, match=needle):
        MODE.apply(ctx, SkipPlan.from_data({"removed": removed}), MODE.make_target(target))
    assert torch.equal(ctx.model(ids).logits, dense)


def test_removed_count_is_what_the_static_rankings_remove():
    ctx = context("llama")
    for ratio in (0.1, 0.2, 0.25, 0.3, 0.4, 0.5):
        _, plan = ranked(ctx, Method("shortgpt"), MODE.make_target({"ratio": ratio}))
        assert len(plan) == removed_count(8, ratio)
    assert [removed_count(60, r) for r in (0.1, 0.25, 0.3)] == [6, 15, 18]


NAMES = [(b, k) for b in range(4) for k in ("attention", "mlp")]
ORDER = [(3, "attention"), (2, "attention"), (1, "mlp"), (0, "mlp"), (3, "mlp"), (1, "attention"),
         (2, "mlp"), (0, "attention")]


def problem(**options):
    seeds = [[(3, "attention"), (2, "attention")], [(1, "mlp"), (3, "attention")]]
    return SkipPlanProblem(SEARCH, SkipPlanOptions(**options), NAMES, 2, ORDER, seeds)


def test_the_ga_keeps_the_count_starts_from_the_seeds_and_moves_within_its_span():
    p = problem(span=2)
    assert [p.plan(s).key for s in p.seeds()] == ["skip[2a,3a]", "skip[1m,3a]"]
    # too many removed: the most important come back; too few: the least important go
    assert p.plan(p.repair([1] * 8)).key == "skip[2a,3a]"
    assert p.plan(p.repair([0, 0, 0, 0, 0, 0, 0, 1])).key == "skip[3a,3m]"
    random.seed(0)
    reached = set()
    for _ in range(300):
        a, b = p.random_individual(), p.random_individual()
        a, b = p.toolbox().mate(a, b)
        (a,) = p.mutate(a)
        genes = p.prepare(a).individual
        assert sum(genes) == 2 and p.plan(genes).key == genes.key
        reached |= set(p.plan(genes).removed)
    # every move draws among the two least important kept: with two removed, only the order's four
    # least important are ever reached — and all of them are
    assert reached == set(ORDER[:4])
    with pytest.raises(ValueError, match="every seed plan must remove 2"):
        SkipPlanProblem(SEARCH, SkipPlanOptions(), NAMES, 2, ORDER, [[(0, "mlp")]])
    with pytest.raises(ValueError, match="problem.colour: unknown key"):
        SkipPlanProblem.parse({"colour": 1})


def test_a_search_on_a_tiny_model_is_never_worse_than_its_seeds():
    """The real skip mode applies every plan; fitness is the logits' error against the dense model."""
    ctx = context("llama")
    target = MODE.make_target({"ratio": 0.25})
    snapshot, ids = DenseSnapshot(ctx.units), DATA_IDS[100:104]
    dense = ctx.model(ids).logits

    def fitness(batch):
        out = []
        for key, data in batch:
            MODE.apply(ctx, decode(data), target)
            err = float((ctx.model(ids).logits - dense).square().mean())
            ctx.edits.restore()
            snapshot.restore()
            out.append(Measured(4, FitnessResult(key, err, "ok")))
        return out

    order, _ = ranked(ctx, Method("removal"), target)
    seeds = [ranked(ctx, Method(m), target)[1] for m in ("removal", "shortgpt")]
    p = SkipPlanProblem(SEARCH, SkipPlanOptions(), sorted(order), 2, order, seeds)
    engine = Engine(SEARCH, fitness, problem=p)
    best_seed = min(fitness([(p.key(s), p.candidate(s))])[0].result.fitness for s in p.seeds())
    while not engine.done:
        engine.step()
    best = engine.hof[0]
    assert best.fitness.values[1] <= best_seed and sum(best) == 2


def test_a_skip_plan_campaigns_winner_exports_as_a_candidate_file_and_a_bad_key_writes_nothing(tmp_path):
    config = from_dict({"name": "s", "eval": {"model": "smollm2-135m", "mode": "skip"}, "target": {"ratio": 0.25},
                        "protocol": {"seq_len": 64, "calib_windows": 1, "eval_windows": 1},
                        "search": {"problem": "skip_plan"}})
    run = tmp_path / "s-run"
    run.mkdir()
    (run / "config.json").write_text(json.dumps(config.to_dict()))
    header = "rank,fitness,windows,formula,key,generation,removed\n"
    (run / "hall_of_fame.csv").write_text(header + '1,1.5,4,"skip[3a,12m]","skip[3a,12m]",2,x\n')
    (path,) = export_run(run, top=1, out_dir=tmp_path / "out")
    plan = read_candidate_file(path)
    assert plan == SkipPlan(((3, "attention"), (12, "mlp"))) and path.name == "s-run-1.json"
    assert "skip" in json.loads(path.read_text())["provenance"]["target"]
    (run / "hall_of_fame.csv").write_text(header + '1,1.5,4,"x","skip[3a,../m]",2,x\n')
    with pytest.raises(ExportError, match="not a skip plan key"):
        export_run(run, top=1, out_dir=tmp_path / "bad")
    assert not (tmp_path / "bad").exists() or not any((tmp_path / "bad").iterdir())
