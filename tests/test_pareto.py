"""experiments/pareto.py's pure parts: the Pareto front and the latency target (no model)."""

import importlib.util
import sys
from pathlib import Path

import pytest

_spec = importlib.util.spec_from_file_location("pareto", Path(__file__).parents[1] / "experiments" / "pareto.py")


@pytest.fixture(scope="module")
def pareto():
    module = importlib.util.module_from_spec(_spec)
    sys.modules[_spec.name] = module  # dataclasses look their module up there
    try:
        _spec.loader.exec_module(module)
    except BaseException:
        sys.modules.pop(_spec.name, None)
        raise
    return module


def test_front_keeps_only_undominated_points(pareto):
    pts = [(1.0, 30.0), (0.8, 70.0), (0.9, 80.0), (0.7, 300.0), (0.8, 70.0), (1.1, 29.0), (None, 10.0), (0.5, float("nan"))]
    assert pareto.pareto_front(pts) == [True, True, False, True, True, True, False, False]


def test_fronts_marked_for_prefill_and_decode(pareto):
    rows = [{"latency_ratio": 1.0, "decode_ratio": 1.0, "perplexity": 30.0},
            {"latency_ratio": 0.8, "decode_ratio": 0.9, "perplexity": 70.0},
            {"latency_ratio": None, "decode_ratio": 1.2, "perplexity": 30.0}]
    pareto.mark_fronts(rows)
    assert [r["front_prefill"] for r in rows] == [True, True, False]
    assert [r["front_decode"] for r in rows] == [False, False, True]


def test_target(pareto):
    rows = [{"latency_ratio": 0.79, "perplexity": 50.0}, {"latency_ratio": 0.8, "perplexity": 45.0},
            {"latency_ratio": 0.81, "perplexity": 31.0}, {"latency_ratio": None, "perplexity": 30.0}]
    best, met = pareto.target_met(rows, dense_ppl=30.0)
    assert best["perplexity"] == 45.0 and met
    best, met = pareto.target_met(rows[:1], dense_ppl=30.0)
    assert not met
    assert pareto.target_met([], 30.0) == (None, False)
