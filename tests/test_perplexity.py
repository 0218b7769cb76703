"""Perplexity per the protocol, against a direct computation from the model's logits."""

import math

import pytest
import torch

from prunerzero.fitness import perplexity as perplexity_module
from prunerzero.fitness.perplexity import perplexity


def _reference(model, windows: torch.Tensor) -> float:
    """Each window predicts tokens 2..L from the preceding ones; mean NLL over all of them."""
    with torch.no_grad():
        logits = model(windows).logits.double()
    logp = torch.log_softmax(logits[:, :-1], dim=-1)
    nll = -logp.gather(-1, windows[:, 1:, None]).squeeze(-1)
    return math.exp(float(nll.mean()))


@pytest.mark.parametrize("batch_size", [1, 3, 4, 8])
@pytest.mark.parametrize("chunk_positions", [1, 5, 1000])  # the loss a position, 5, or a window at a time
def test_perplexity_equals_the_direct_computation_for_any_batching(tiny_llama, tiny_windows, batch_size,
                                                                   chunk_positions, monkeypatch):
    monkeypatch.setitem(perplexity_module.LOSS_CHUNK_BYTES, "cpu", 4 * tiny_llama.config.vocab_size * chunk_positions)
    got = perplexity(tiny_llama, tiny_windows, batch_size=batch_size)
    assert got.tokens == tiny_windows.shape[0] * (tiny_windows.shape[1] - 1)
    assert got.perplexity == pytest.approx(_reference(tiny_llama, tiny_windows), rel=1e-5)


def test_perplexity_differs_when_the_model_changes(tiny_llama, tiny_windows):
    before = perplexity(tiny_llama, tiny_windows).perplexity
    weight = tiny_llama.model.layers[0].mlp.down_proj.weight
    dense = weight.detach().clone()
    with torch.no_grad():
        weight.zero_()
    try:
        assert perplexity(tiny_llama, tiny_windows).perplexity != pytest.approx(before, rel=1e-4)
    finally:
        with torch.no_grad():
            weight.copy_(dense)
