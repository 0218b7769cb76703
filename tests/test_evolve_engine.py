"""The engine on a stub fitness function: OOS rejection and redraws, elitism, key-based hall of fame."""

from prunerzero.evolve.config import SearchConfig
from prunerzero.evolve.engine import Engine
from prunerzero.evolve.evaluation import Measured
from prunerzero.evolve.problem import from_string, primitive_set
from prunerzero.evolve.simplify import simplify
from prunerzero.fitness.evaluator import WORST_FITNESS, FitnessResult
from prunerzero.primitives.expression import parse
from prunerzero.primitives.metric import BUILTINS, Metric


def by_length(candidates):
    """Stub fitness: shorter formulas are better."""
    return [Measured(8, FitnessResult(k, 10.0 + len(f), "ok")) for k, f in candidates]


def test_rejected_individual_is_redrawn_or_gets_the_worst_fitness_unevaluated():
    seen = []
    engine = Engine(SearchConfig(max_redraws=0), lambda c: seen.extend(c) or by_length(c))
    ind = engine._oos(from_string("sub(W, W)", primitive_set()))
    engine._evaluate([ind])
    assert ind.fitness.values == (0, WORST_FITNESS) and seen == [] and engine._rejected == 1

    engine = Engine(SearchConfig(max_redraws=10), by_length)
    ind = engine._oos(from_string("div(G, G)", primitive_set()))
    assert not ind.fitness.valid and simplify(parse(str(ind))).ok and engine._rejected >= 1


def test_offspring_are_replaced_by_their_simplified_trees():
    engine = Engine(SearchConfig(), by_length)
    ind = engine._oos(from_string("sqrt(sqr(neg(neg(W))))", primitive_set()))
    assert str(ind) == "abs(W)" and ind.key == Metric.from_expression("abs(W)").key


def test_generations_keep_elites_and_a_hall_of_fame_without_duplicate_keys():
    search = SearchConfig(population=10, generations=3, hall_of_fame=6, elites=2, seed=4)
    engine = Engine(search, by_length)
    while not engine.done:
        record = engine.step()
        assert len(engine.population) == search.population
        for elite in engine.hof[: search.elites]:
            assert any(ind.key == elite.key for ind in engine.population)
    keys = [ind.key for ind in engine.hof]
    assert len(keys) == len(set(keys)) == search.hall_of_fame
    assert record["best_fitness"] == min(i.fitness.values[1] for i in engine.hof)
    assert len(engine.logbook) == search.generations + 1


def same_masks(candidates):
    """Stub fitness of a rank-based pruner: every metric monotone in |W| measures the same."""
    return [Measured(8, FitnessResult(k, 50.0 if "X" in f else 300.0, "ok")) for k, f in candidates]


def test_phenotypic_clones_lose_their_fitness_for_selection():
    pset = primitive_set()
    for penalty in (True, False):
        engine = Engine(SearchConfig(clone_penalty=penalty), same_masks)
        offspring = [engine._oos(from_string(f, pset)) for f in
                     ("sqrt(W)", "abs(W)", "tanh(abs(W))", "mul(abs(W), sqrt(X))", "mul(W, X)")]
        engine._evaluate(offspring)
        engine._penalise_clones(offspring) if penalty else None
        fitness = [i.fitness.values[1] for i in offspring]
        if penalty:  # the smallest (then first) of each group of equals keeps its fitness
            assert fitness == [300.0, WORST_FITNESS, WORST_FITNESS, WORST_FITNESS, 50.0]
            assert engine._clones == 3
        else:
            assert fitness == [300.0, 300.0, 300.0, 50.0, 50.0]


def test_seeded_metrics_are_in_generation_zero_and_a_bad_seed_is_named():
    import pytest

    from prunerzero.evolve.problem import MetricProblem

    search = SearchConfig(population=6, generations=0, operators="extended", seed=1)
    seen = []
    engine = Engine(search, lambda c: seen.extend(k for k, _ in c) or by_length(c),
                    problem=MetricProblem(search, {"seeds": "wanda; ria; mul(abs(W), G)"}))
    engine.step()
    seeded = {Metric.from_expression(BUILTINS[n]).key for n in ("wanda", "ria")} | {Metric.from_expression("mul(abs(W), G)").key}
    assert seeded <= set(seen) and len(engine.population) == 6  # measured like any candidate
    with pytest.raises(ValueError, match=r"problem.seeds: 'ria'.*rownorm"):
        MetricProblem(SearchConfig(), {"seeds": "ria"})  # its operators are not in the pruner-zero set
