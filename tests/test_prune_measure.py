"""`prunerzero prune` reports each mode's own budget measure (issue 25, item 4): the recipe's
`measure(report)`, not a weight sparsity for every mode (a skip model has no zero weights, an
experts share is not a sparsity)."""

import pytest

from prunerzero.pruning.modes import MODES, get_mode
from prunerzero.pruning.recipe import weight_sparsity
from prunerzero.pruning.report import PruneReport


def report(mode: str, extra: dict, zeros: int = 30, numel: int = 100, **fields) -> PruneReport:
    rep = PruneReport(get_mode(mode).make_target(fields), "x", extra=dict(extra))
    rep.rows = [{"name": "u", "block": 0, "role": "q", "expert": None, "numel": numel, "zeros": zeros}]
    return rep


@pytest.mark.parametrize("mode, extra, fields, says", [
    ("unstructured", {}, {}, "weight sparsity 0.3000"),
    ("attention", {"attention_error": 0.12, "attention_error_init": 0.5}, {},
     "weight sparsity 0.3000, median attention error 0.12 (masks alone 0.5)"),
    ("structured", {"predicted_ratio": 0.7912}, {"latency": 0.8},
     "predicted prefill latency 0.791x dense, 2.1M of 3.0M prunable weights kept"),
    ("skip", {"skip_ratio": 0.25, "flops_skip_ratio": 0.2125, "attention_skip_ratio": 0.1, "mlp_skip_ratio": 0.4},
     {"ratio": 0.25}, "skip ratio 0.2500 of attention and MLP sublayers (0.2125 of their FLOPs; attention 0.100, MLP 0.400)"),
    ("experts", {"experts_kept": 4.0, "active_experts": 2.0, "merged": 3}, {},
     "4 experts kept per MoE layer, 2 active per token, 3 merged into kept ones"),
])
def test_each_mode_reports_its_budget_in_its_own_unit(mode, extra, fields, says):
    zeros, numel = (900_000, 3_000_000) if mode == "structured" else (30, 100)
    assert get_mode(mode).measure(report(mode, extra, zeros, numel, **fields)) == says


def test_a_report_without_the_modes_values_falls_back_to_weight_sparsity():
    """A method that records nothing of its own still says what it did, not a KeyError after saving."""
    for mode in MODES:
        assert get_mode(mode).measure(report(mode, {})).startswith("weight sparsity 0.3000"), mode


def test_the_default_measure_is_the_weight_sparsity():
    assert weight_sparsity(report("unstructured", {}, zeros=1, numel=4)) == "weight sparsity 0.2500"
    assert all(callable(r.measure) for r in MODES.values())
