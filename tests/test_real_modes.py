"""Any candidate through the real evaluator on smollm2-135m: an allocation, a mask set and a metric
that prune the same weights are one phenotype; KL fitness ranks like perplexity."""

import pytest

from prunerzero.fitness.evaluator import EvalSpec, Evaluator
from prunerzero.pruning.candidates import Allocation, MaskSet
from prunerzero.pruning.masks import select_mask
from prunerzero.pruning.reduce import unit_scores
from conftest import REAL

pytestmark = pytest.mark.real

SMALL = REAL  # conftest.REAL: one calibration draw for every real-model file


@pytest.fixture(scope="module")
def evaluator():
    return Evaluator(EvalSpec(model="smollm2-135m", split="valid", protocol=SMALL), needs=frozenset({"X"}))


def test_allocation_masks_and_metric_are_one_phenotype(evaluator):
    wanda = evaluator.candidate("wanda")
    by_metric = evaluator.evaluate(wanda)
    uniform = evaluator.evaluate(Allocation("wanda", (0.5,) * 30))
    stats = evaluator.stats(wanda.needs)
    masks = MaskSet({u.name: select_mask(unit_scores(wanda, u, stats), 0.5) for u in evaluator.units})
    given = evaluator.evaluate(masks)
    assert by_metric.status == uniform.status == given.status == "ok"
    assert by_metric.phenotype == uniform.phenotype == given.phenotype != ""
    assert by_metric.value == uniform.value == given.value
    skewed = evaluator.evaluate(Allocation("wanda", (0.3,) * 15 + (0.7,) * 15))
    assert skewed.phenotype != by_metric.phenotype and abs(skewed.sparsity - 0.5) < 1e-3
    assert skewed.value > by_metric.value  # the last blocks at 70%: worse than uniform on this model
    assert evaluator.measure().perplexity < by_metric.value  # restored dense afterwards


def test_bad_candidates_fail_as_data(evaluator):
    result = evaluator.evaluate(Allocation("wanda", (0.5,) * 29))
    assert result.status == "failed" and "29 sparsities for 30 blocks" in result.reason


def test_kl_fitness_is_zero_dense_and_ranks_wanda_above_magnitude():
    ev = Evaluator(EvalSpec(model="smollm2-135m", split="valid", protocol=SMALL, fitness="kl"))
    dense = ev.fitness_measure(ev.model, ev.windows)
    assert abs(dense.value) < 1e-2
    wanda, magnitude = ev.evaluate(ev.candidate("wanda")), ev.evaluate(ev.candidate("magnitude"))
    assert 0 < wanda.value < magnitude.value
