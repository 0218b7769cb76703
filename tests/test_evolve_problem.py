"""The GP problem: primitive sets, DEAP tree ⇄ Node conversions, toolbox limits."""

import random

import pytest
from deap import gp

from prunerzero.evolve.config import SearchConfig
from prunerzero.evolve.problem import (OPERATOR_SETS, Individual, MetricProblem, from_node, from_string, primitive_set,
                                       to_node)
from prunerzero.primitives.expression import parse
from prunerzero.primitives.operators import OPERATORS


def test_operator_sets_use_table_operators_and_extended_adds_normalisations():
    assert set(OPERATOR_SETS["pruner-zero"]) <= set(OPERATORS)
    assert set(OPERATOR_SETS["extended"]) - set(OPERATOR_SETS["pruner-zero"]) == {"rownorm", "colnorm"}
    assert set(primitive_set("extended").mapping) == set(OPERATOR_SETS["extended"]) | {"W", "G", "X"}
    with pytest.raises(ValueError, match="unknown operator set 'nope'"):
        primitive_set("nope")


def test_random_deap_trees_round_trip_through_node():
    pset = primitive_set("extended")
    random.seed(1)
    for _ in range(50):
        ind = Individual(gp.genHalfAndHalf(pset, 1, 5))
        node = to_node(ind)
        back = from_node(node, pset)
        assert str(back) == str(ind) == str(node)
        assert back.height == node.depth() - 1 and len(back) == node.size()


def test_constants_become_plain_terminals_that_print_like_nodes():
    pset = primitive_set()
    ind = from_string("mul(-0.5, add(W, 2.0))", pset)
    assert str(ind) == "mul(-0.5, add(W, 2.0))"
    assert str(to_node(ind)) == str(parse("mul(-0.5, add(W, 2.0))"))
    # a point mutation may replace the constant with a terminal, never fail on it
    random.seed(0)
    for _ in range(20):
        (mutant,) = gp.mutNodeReplacement(from_string("mul(-0.5, W)", pset), pset)
        parse(str(mutant))


def test_operator_outside_the_set_is_an_error_naming_it():
    with pytest.raises(ValueError, match="rownorm"):
        from_string("rownorm(W)", primitive_set("pruner-zero"))


def test_variation_respects_static_depth_and_size_limits():
    search = SearchConfig(max_depth=5, max_size=12, init_max_depth=4)
    tb = MetricProblem(search).toolbox()
    random.seed(2)
    pop = [ind for ind in tb.population(n=60) if len(ind) <= 12]  # parents within the limits
    grew = 0
    for _ in range(40):
        a, b = random.sample(pop, 2)
        for child in tb.mate(tb.clone(a), tb.clone(b)) + tb.mutate(tb.clone(a)):
            assert child.height <= 5 and len(child) <= 12
            grew += len(child) > max(len(a), len(b))
    assert grew > 0  # variation does change sizes: the limit is what held them
