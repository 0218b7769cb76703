"""The attention mode through the real evaluator on smollm2-135m (a few steps per block)."""

import pytest
import torch

from prunerzero.fitness.evaluator import EvalSpec, Evaluator
from conftest import REAL

pytestmark = pytest.mark.real

SMALL = REAL  # conftest.REAL: one calibration draw for every real-model file


def test_attention_mode_on_smollm2_prunes_qk_exactly_and_lowers_the_attention_error():
    target = {"sparsity": 0.5, "others": "dense", "steps": 6, "windows": 2, "tokens": 64}
    ev = Evaluator(EvalSpec(model="smollm2-135m", split="valid", protocol=SMALL, mode="attention", target=target))
    dense = ev.measure().perplexity
    result = ev.evaluate(ev.candidate("wanda"))
    assert result.status == "ok", result.reason
    others = {u.name: u.weight.clone() for u in ev.units if u.role not in ("q", "k")}
    report = ev.prune(ev.candidate("wanda"))
    try:
        qk = [u for u in ev.units if u.role in ("q", "k")]
        assert len(qk) == 2 * len(ev.model.model.layers)
        for unit in qk:  # half of every row's weights, exactly
            assert torch.all((unit.weight == 0).sum(dim=1) == unit.shape[1] // 2), unit.name
        for unit in ev.units:  # others = "dense": v, o and the MLPs untouched, bit for bit
            if unit.role not in ("q", "k"):
                assert torch.equal(unit.weight, others[unit.name]), unit.name
        assert len(others) == len(ev.units) - len(qk) > 0
        assert report.extra["attention_error"] < report.extra["attention_error_init"]
    finally:
        ev.restore()
    assert dense < result.value < 2 * dense and ev.measure().perplexity == dense
