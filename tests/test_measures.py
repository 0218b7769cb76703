"""Fitness measures: KL divergence to the dense model's next-token distributions."""

import pytest
import torch

import prunerzero.fitness.measures as measures
from prunerzero.fitness.measures import KLDivergence, Perplexity, make_measure
from prunerzero.fitness.perplexity import perplexity
from prunerzero.models.adapter import ModelAdapter
from prunerzero.pruning.interventions import applied


def reference_kl(dense_logits, logits) -> float:
    p = torch.log_softmax(dense_logits.double(), -1)
    q = torch.log_softmax(logits.double(), -1)
    return float((p.exp() * (p - q)).sum(-1).mean())


def test_kl_is_zero_on_the_dense_model_and_matches_float64_after_a_change(tiny_llama, tiny_windows):
    kl = KLDivergence(batch_size=3)
    kl.prepare(tiny_llama, tiny_windows)
    assert kl.dense.dtype == torch.float16 and kl.dense.shape == (4, 15, 128)
    dense = kl(tiny_llama, tiny_windows)
    assert abs(dense.value) < 2e-3 and dense.tokens == 4 * 15  # float16 storage: a rounding's worth
    with torch.no_grad():
        dense_logits = tiny_llama(tiny_windows).logits[:, :-1]
    with applied() as edits:
        for unit in ModelAdapter(tiny_llama).prunable():
            edits.write(unit.weight, unit.weight * 8.0)
        changed = kl(tiny_llama, tiny_windows[:2])
        with torch.no_grad():
            want = reference_kl(dense_logits[:2], tiny_llama(tiny_windows[:2]).logits[:, :-1])
    assert changed.value > 0.01 and changed.value == pytest.approx(want, rel=0.02, abs=2e-3)
    assert changed.tokens == 2 * 15


def test_perplexity_measure_is_the_protocol_perplexity(tiny_llama, tiny_windows):
    assert Perplexity()(tiny_llama, tiny_windows).value == perplexity(tiny_llama, tiny_windows).perplexity


def test_kl_refuses_a_budget_over_its_memory_limit_and_unknown_measures(tiny_llama, tiny_windows, monkeypatch):
    monkeypatch.setattr(measures, "KL_MAX_BYTES", 1000)
    with pytest.raises(ValueError, match="dense log-probabilities for 4x16 tokens"):
        KLDivergence().prepare(tiny_llama, tiny_windows)
    with pytest.raises(RuntimeError, match="prepare"):
        KLDivergence()(tiny_llama, tiny_windows)
    with pytest.raises(ValueError, match="unknown fitness 'bleu'"):
        make_measure("bleu")
