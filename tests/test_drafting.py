"""Self-speculative decoding on tiny random models (prunerzero/drafting.py, prunerzero/generate.py):
greedy output identical to the dense model's with any draft, sampling from the dense distribution
(the rejection rule, tested statistically), and a layer view that owns no weight of its own."""

import pytest
import torch
from scipy.stats import chisquare

from prunerzero.generate import generate
from prunerzero.drafting import (DraftError, SubsetHead, format_layers, frequent_tokens, layer_view,
                                        parse_layers, parse_spec, shares_weights, with_subset_head)
from conftest import tiny_model

_SHAPE = dict(hidden_size=64, intermediate_size=128, max_position_embeddings=256)  # over conftest.TINY_SHAPE


def _llama(layers=4, vocab=128, seed=0):
    return tiny_model("llama", seed=seed, **_SHAPE, num_hidden_layers=layers, vocab_size=vocab)


def _qwen2_sliding(layers=4, vocab=128):
    """A family with per-layer attention types (sliding and full): the view keeps each kept
    block's type."""
    return tiny_model("qwen2", seed=0, **_SHAPE, num_hidden_layers=layers, vocab_size=vocab, use_sliding_window=True,
                      sliding_window=8, max_window_layers=2)


def _prompt(n=12, vocab=128, seed=1):
    return torch.randint(3, vocab, (1, n), generator=torch.Generator().manual_seed(seed))


def test_view_shares_every_weight():
    model = _llama()
    view = layer_view(model, [0, 2, 3])
    assert shares_weights(view, model)
    own = {id(p) for p in model.parameters()}
    assert all(id(p) in own for p in view.parameters())
    assert sum(p.numel() for p in view.parameters()) < sum(p.numel() for p in model.parameters())
    assert view.config.num_hidden_layers == 3 and model.config.num_hidden_layers == 4


def test_view_computes_the_kept_blocks_and_leaves_the_dense_model_alone():
    model = _llama()
    ids = _prompt()
    dense = model(ids).logits
    view = layer_view(model, [0, 1, 2, 3])
    assert torch.equal(view(ids).logits, dense)  # all blocks kept: the same function
    skipped = layer_view(model, [0, 3])
    assert not torch.allclose(skipped(ids).logits, dense)
    assert torch.equal(model(ids).logits, dense)
    assert [m.self_attn.layer_idx for m in model.model.layers] == [0, 1, 2, 3]


@pytest.mark.parametrize("make,keep,confidence,schedule", [
    (_llama, [0, 1, 3], 0.4, "heuristic_transient"), (_llama, [1, 2], None, "constant"),
    (_qwen2_sliding, [0, 3], None, "heuristic_transient"), (_qwen2_sliding, [1], 0.4, "constant")])
def test_greedy_is_identical_to_dense(make, keep, confidence, schedule):
    model = make()
    ids = _prompt()
    plain = generate(model, ids, 24, stop_at_eos=False)
    got = generate(model, ids, 24, layer_view(model, keep), confidence=confidence, schedule=schedule,
                   draft_tokens=3, stop_at_eos=False)
    assert got.tokens == plain.tokens
    assert got.drafted > 0 and 0 <= got.accepted <= got.drafted
    assert got.rounds + got.accepted == len(got.tokens) == 24


def test_greedy_identical_with_a_separate_pruned_draft_and_a_subset_head():
    model = _llama()
    other = _llama()
    with torch.no_grad():  # a magnitude-pruned copy: a saved unstructured model in miniature
        for layer in other.model.layers:
            w = layer.mlp.down_proj.weight
            w.mul_(w.abs() > w.abs().median())
    ids = _prompt()
    plain = generate(model, ids, 20, stop_at_eos=False)
    assert generate(model, ids, 20, other, stop_at_eos=False).tokens == plain.tokens
    view = with_subset_head(layer_view(model, [0, 1, 3]), torch.arange(0, 128, 2))
    got = generate(model, ids, 20, view, stop_at_eos=False)
    assert got.tokens == plain.tokens and got.drafted > 0


def test_subset_head_logits():
    model = _llama()
    head = model.lm_head
    ids = torch.tensor([3, 5, 90])
    sub = SubsetHead(head, ids)
    h = torch.randn(2, 4, 64)
    out = sub(h)
    assert out.shape == (2, 4, 128)
    assert torch.allclose(out[..., ids], head(h)[..., ids])
    rest = torch.ones(128, dtype=torch.bool)
    rest[ids] = False
    assert torch.isinf(out[..., rest]).all()
    assert frequent_tokens(torch.tensor([[5, 5, 7, 9, 9, 9]]), 2, 16).tolist() == [5, 9]


def test_specs():
    assert parse_layers("0-2,5,7-8") == [0, 1, 2, 5, 7, 8]
    assert format_layers([0, 1, 2, 5, 7, 8]) == "0-2,5,7-8"
    assert parse_spec("shortgpt:8").kind == "shortgpt" and parse_spec("shortgpt:8+head:4096").head == 4096
    assert parse_spec("layers:0-3,9").value == "0-3,9"
    assert parse_spec("some/dir") is None
    with pytest.raises(DraftError, match="shortgpt:N"):
        parse_spec("shortgpt:x")
    with pytest.raises(DraftError, match="increasing"):
        layer_view(_llama(), [3, 1])


def _exact_two_token_distribution(model, ids, vocab):
    """P(t1, t2 | prompt) of the dense model over every pair, computed exactly."""
    with torch.no_grad():
        p1 = model(ids).logits[0, -1].softmax(-1)
        pairs = torch.cat([ids.repeat(vocab, 1), torch.arange(vocab)[:, None]], dim=1)
        p2 = model(pairs).logits[:, -1].softmax(-1)
    return (p1[:, None] * p2).flatten()


def test_sampling_keeps_the_dense_distribution():
    """Two sampled tokens, the first drafted and verified by the rejection rule: their joint
    frequencies fit the dense model's exact distribution (chi-square), and the draft's own
    distribution, which differs from it, would fail the same test (the test can tell)."""
    vocab = 8
    model = _llama(layers=3, vocab=vocab)
    with torch.no_grad():
        model.lm_head.weight.mul_(30.0)  # peaked distributions, so the draft's differ from the dense one's
    draft = layer_view(model, [0])
    ids = torch.tensor([[3, 5, 1, 6]])
    dense_p = _exact_two_token_distribution(model, ids, vocab)
    draft_p = _exact_two_token_distribution(draft, ids, vocab)
    assert 0.5 * (dense_p - draft_p).abs().sum() > 0.1
    n = 400
    torch.manual_seed(0)
    counts = torch.zeros(vocab * vocab)
    accepted = 0
    for _ in range(n):
        g = generate(model, ids, 2, draft, sample=True, draft_tokens=1, confidence=None, schedule="constant",
                     stop_at_eos=False)
        counts[g.tokens[0] * vocab + g.tokens[1]] += 1
        accepted += g.accepted
    assert 0 < accepted < n  # the rule both accepted and rejected drafted tokens

    def p_value(probs):
        big = probs * n >= 5  # cells expected at least 5 times; the rest pooled
        obs = torch.cat([counts[big], counts[~big].sum()[None]])
        exp = torch.cat([probs[big], probs[~big].sum()[None]]) * n
        keep = exp > 0
        return chisquare(obs[keep].numpy(), exp[keep].numpy() * obs[keep].sum().item() / exp[keep].sum().item()).pvalue
    assert p_value(dense_p) > 1e-3
    assert p_value(draft_p) < 1e-4


@pytest.fixture
def isolated_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("PRUNERZERO_CACHE", str(tmp_path / "cache"))


@pytest.mark.parametrize("mode", ["skip", "structured", "experts"])
def test_saved_pruned_models_of_every_reshaping_mode_are_lossless_drafts(mode, tiny_llama, tmp_path, isolated_cache):
    """A directory the skip (static removal), structured (sliced) or experts (fewer experts) mode
    saved, loaded by prunerzero's loader, drafts for the dense model it came from: the greedy
    output stays the dense model's."""
    import copy

    from prunerzero.models import loading
    from conftest import build
    from test_untrusted_saved import saved

    dense = (build("mixtral") if mode == "experts" else tiny_llama).requires_grad_(False)
    reference = copy.deepcopy(dense)  # saved() prunes the model it is given in place (experts: its own build)
    out, *_ = saved(mode, copy.deepcopy(dense) if mode != "experts" else None, tmp_path / mode)
    draft = loading._from_pretrained(str(out), torch.float32).eval()
    ids = torch.randint(3, 64, (1, 10), generator=torch.Generator().manual_seed(2))
    plain = generate(reference, ids, 16, stop_at_eos=False)
    got = generate(reference, ids, 16, draft, confidence=None, stop_at_eos=False)
    assert got.tokens == plain.tokens and got.drafted > 0
