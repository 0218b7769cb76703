"""The joint problem: a metric tree and a per-block allocation in one individual, through the real
engine — variation keeps the total, the key joins the allocation to the tree's canonical key,
and a joint campaign on the toy evaluator checkpoints and resumes exactly."""

import json
import random

import pytest

from prunerzero.evolve.campaign import evaluator_factory, load_checkpoint, resume_campaign, run_campaign
from prunerzero.evolve.config import SearchConfig
from prunerzero.evolve.engine import Engine
from prunerzero.evolve.evaluation import Measured
from prunerzero.evolve.export import export_run, read_hall_of_fame
from prunerzero.evolve.joint_problem import JointProblem
from prunerzero.evolve.problems import TOY_BLOCKS, make_problem
from prunerzero.evolve.toy import toy_config
from prunerzero.fitness.evaluator import FitnessResult
from prunerzero.primitives.metric import resolve_metric
from prunerzero.pruning.candidates import CandidateError, decode
from prunerzero.pruning.modes import get_mode

from test_evolve_campaign import QUIET, Interrupt, _hof, _rows, _search_trace

JOINT = {"search": {"problem": "joint", "population": 10, "generations": 3, "hall_of_fame": 5},
         "problem": {"levels": 2, "step": 0.05}}


def problem(**options):
    return JointProblem(SearchConfig(population=8, hall_of_fame=4), {"levels": 2, "step": 0.1, **options},
                        sparsity=0.5, blocks=5)


def test_variation_keeps_the_total_sparsity_and_the_tree_limits():
    p = problem(mutate_allocation=0.5)
    tb = p.toolbox()
    random.seed(1)
    pop = [p.prepare(tb.individual()).individual for _ in range(20)]
    assert any(any(ind.genes) for ind in pop) and any(not any(ind.genes) for ind in pop)
    for _ in range(30):
        a, b = (tb.clone(ind) for ind in random.sample(pop, 2))
        a, b = tb.mate(a, b)
        (a,) = tb.mutate(a)
        for ind in (a, b):
            ready = p.prepare(ind).individual
            assert sum(ready.genes) == 0 and all(-2 <= g <= 2 for g in ready.genes)
            assert len(ready) <= p.search.max_size and ready.height <= p.search.max_depth


def test_key_candidate_and_encoding_join_the_tree_and_the_allocation():
    p = problem()
    ind = p.decode({"tree": "mul(abs(W), sqrt(X))", "genes": [1, -1, 0, 2, -2]})
    assert ind.key.startswith("allocation[0.6,0.4,0.5,0.7,0.3]:") and ind.key.endswith(resolve_metric("wanda").key)
    allocation = decode(p.candidate(ind))
    assert allocation.sparsities == (0.6, 0.4, 0.5, 0.7, 0.3) and allocation.key == ind.key
    again = p.decode(p.encode(ind))
    assert str(again) == str(ind) and again.genes == ind.genes and again.key == ind.key
    written = p.prepare(p.decode({"tree": "mul(sqrt(X), abs(W))", "genes": [3, 0, 0, 0, 0]})).individual
    assert written.genes == [0, 0, 0, 0, 0]  # clipped to 2, then moved back level by level to the total
    assert p.fields(ind)["genes"] == "1 -1 0 2 -2" and "@ [0.6 0.4 0.5 0.7 0.3]" in p.describe(ind)


@pytest.mark.parametrize("options, message", [
    ({"mutate_allocation": 1.5}, "probabilities"), ({"levels": 9}, "leaves \\[0, 1\\)"),
    ({"colour": 1}, "problem.colour: unknown key"), ({"refine": 1}, "problem.refine"),
    ({"genes": [1]}, "problem.genes: unknown key"),
])
def test_bad_joint_options_name_the_key(options, message):
    with pytest.raises(ValueError, match=message):
        problem(**options)


def test_bad_joint_checkpoint_data_is_named():
    with pytest.raises(ValueError, match="joint individual"):
        problem().decode("mul(W, X)")
    with pytest.raises(ValueError, match="genome of 5 integers"):
        problem().decode({"tree": "W", "genes": [0, 0]})


def by_size_and_spread(candidates):
    """Stub fitness: small trees and allocations near uniform are better (the allocation weighs more)."""
    return [Measured(8, FitnessResult(k, 0.1 * _nodes(c["metric"]) + 100 * sum(abs(s - 0.5) for s in c["sparsities"]),
                                      "ok")) for k, c in candidates]


def _nodes(expression: str) -> int:
    return len(expression.replace("(", " ").replace(",", " ").replace(")", " ").split())


def test_the_engine_improves_both_halves():
    search = SearchConfig(population=16, generations=6, hall_of_fame=4, elites=2, seed=3)
    p = JointProblem(search, {"levels": 2, "start_uniform": 0.0}, 0.5, 4)
    engine = Engine(search, by_size_and_spread, problem=p)
    engine.step()
    first = engine.hof[0]
    assert sum(any(ind.genes) for ind in engine.population) > len(engine.population) // 2  # random allocations
    while not engine.done:
        engine.step()
    best = engine.hof[0]
    assert best.genes == [0, 0, 0, 0] and len(best) <= len(first)
    assert best.fitness.values[1] == pytest.approx(0.1 * len(best))


@pytest.fixture(scope="module")
def joint_straight(tmp_path_factory):
    cfg = toy_config(tmp_path_factory.mktemp("joint"), **JOINT)
    return cfg, run_campaign(cfg, console=QUIET)


def test_joint_campaign_writes_trees_and_genes(joint_straight):
    _, run_dir = joint_straight
    hof = _rows(run_dir / "hall_of_fame.csv")
    assert list(hof[0])[-3:] == ["size", "depth", "genes"]
    for row in hof:
        genes = [int(g) for g in row["genes"].split()]
        assert len(genes) == TOY_BLOCKS and sum(genes) == 0 and row["key"].startswith("allocation[")
    state = load_checkpoint(run_dir)
    assert state["engine"]["problem"] == "joint" and set(state["engine"]["population"][0][0]) == {"tree", "genes"}


def test_joint_campaign_killed_and_resumed_ends_identical(joint_straight, tmp_path):
    _, reference = joint_straight
    cfg = toy_config(tmp_path, **JOINT)
    run_dir = tmp_path / "run"
    with pytest.raises(KeyboardInterrupt):
        run_campaign(cfg, run_dir=run_dir, backend=Interrupt(evaluator_factory(cfg.eval_spec()), 2), console=QUIET)
    resume_campaign(run_dir, console=QUIET)
    assert _hof(run_dir) == _hof(reference)
    assert _search_trace(run_dir) == _search_trace(reference)


def test_joint_needs_an_unstructured_target(tmp_path):
    with pytest.raises(ValueError, match="'joint' sets a sparsity per block"):
        make_problem(toy_config(tmp_path, **JOINT, target={"pattern": "2:4"}))


def test_joint_export_writes_the_tree_and_the_allocation_a_mode_reads_back(joint_straight, tmp_path):
    _, run_dir = joint_straight
    paths = export_run(run_dir, top=2, out_dir=tmp_path)
    rows = read_hall_of_fame(run_dir)[:2]
    assert [p.name for p in paths] == [f"{run_dir.name}-{r['rank']}{ext}" for r in rows for ext in (".py", ".json")]
    for (module, saved), row in zip(zip(paths[::2], paths[1::2]), rows):
        allocation = get_mode("unstructured").candidate(str(saved))
        assert allocation.key == row["key"]  # the same candidate the campaign measured
        assert resolve_metric(f"{module}:metric").key == allocation.resolved.key
        assert json.loads(saved.read_text())["provenance"]["hall of fame rank"] == row["rank"]


def test_allocation_export_names_the_campaigns_metric(tmp_path):
    cfg = toy_config(tmp_path, search={"problem": "allocation", "population": 6, "generations": 1, "hall_of_fame": 3},
                     problem={"metric": "wanda", "levels": 2, "step": 0.05})
    run_dir = run_campaign(cfg, console=QUIET)
    (saved,) = export_run(run_dir, top=1, out_dir=tmp_path / "m")
    allocation = get_mode("unstructured").candidate(str(saved))
    assert allocation.metric == "wanda" and allocation.key == read_hall_of_fame(run_dir)[0]["key"]


@pytest.mark.parametrize("text, message", [("{not json", "not a readable candidate file"),
                                           ('{"kind": "allocation", "metric": "wanda"}', "field 'sparsities'"),
                                           ('{"kind": "pickle"}', "unknown candidate kind")])
def test_a_bad_candidate_file_is_named(tmp_path, text, message):
    path = tmp_path / "bad.json"
    path.write_text(text)
    with pytest.raises(CandidateError, match=f"bad.json: .*{message}"):
        get_mode("unstructured").candidate(str(path))
