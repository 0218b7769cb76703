"""Families that expect a BOS token on every sequence (Gemma-3) get it first in every window;
others (SmolLM2, Llama-style tokenizers that do not add one) are unchanged."""

import pytest
import torch
from tokenizers import Tokenizer, models, pre_tokenizers, processors
from transformers import Gemma3ForCausalLM, Gemma3TextConfig, PreTrainedTokenizerFast

from prunerzero.core.protocol import Protocol
from prunerzero.fitness.perplexity import perplexity
from prunerzero.models.corpora import CorpusError, TokenizedCorpus, bos_token, split_by_position

VOCAB = {"<pad>": 0, "<bos>": 2, "<eos>": 1, **{c: 3 + i for i, c in enumerate("abcdefghijklmnopqrstuvwxyz .")}}


def char_tokenizer(adds_bos: bool) -> PreTrainedTokenizerFast:
    tok = Tokenizer(models.WordLevel(VOCAB, unk_token="<pad>"))
    tok.pre_tokenizer = pre_tokenizers.Split("", "isolated")
    if adds_bos:  # as Gemma-3's tokenizer: BOS on every encoded sequence
        tok.post_processor = processors.TemplateProcessing(single="<bos> $A", special_tokens=[("<bos>", 2)])
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<bos>", eos_token="<eos>", pad_token="<pad>")


def corpus(tokenizer) -> TokenizedCorpus:
    text = "it is a truth universally acknowledged. " * 40
    ids = torch.tensor(tokenizer(text, add_special_tokens=False)["input_ids"])
    return TokenizedCorpus("t", ids, split_by_position(ids))


def test_windows_start_with_bos_where_the_tokenizer_adds_one():
    gemma_like, plain = char_tokenizer(True), char_tokenizer(False)
    assert bos_token(gemma_like) == 2 and bos_token(plain) is None
    assert bos_token(plain, "always") == 2 and bos_token(gemma_like, "never") is None
    c = corpus(gemma_like)
    windows = c.evaluation("test", 16, 3, bos=2)
    assert windows.shape == (3, 16) and (windows[:, 0] == 2).all()
    assert torch.equal(windows[:, 1:].reshape(-1), c.splits["test"][: 3 * 15])  # text flows on, 15 a window
    calib = c.calibration(4, 16, seed=0, bos=2)
    assert calib.shape == (4, 16) and (calib[:, 0] == 2).all() and not (calib[:, 1:] == 2).any()
    assert torch.equal(c.evaluation("test", 16, 3), c.splits["test"][:48].view(3, 16))  # no BOS: as before
    with pytest.raises(CorpusError, match="unknown bos mode"):
        bos_token(plain, "sometimes")


def test_a_tiny_gemma3_is_scored_on_text_after_its_bos():
    torch.manual_seed(0)
    model = Gemma3ForCausalLM(Gemma3TextConfig(
        vocab_size=len(VOCAB) + 3, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, head_dim=8, max_position_embeddings=64, bos_token_id=2, eos_token_id=1,
        pad_token_id=0)).eval()
    c = corpus(char_tokenizer(True))
    with_bos, without = c.evaluation("test", 16, 2, bos=2), c.evaluation("test", 16, 2)
    r = perplexity(model, with_bos)
    assert r.tokens == 2 * 15  # the BOS is context, never a predicted token
    assert r.perplexity != perplexity(model, without).perplexity


def test_protocol_keys_of_earlier_versions_are_unchanged_and_bos_is_recorded():
    p = Protocol(seq_len=512, calib_windows=32, eval_windows=32)
    assert p.fingerprint() == "8ea5b756ff65"  # the committed leaderboard rows' protocol_id
    assert Protocol(bos="never").fingerprint() != Protocol().fingerprint()
    assert "bos never" in Protocol(bos="never").describe() and "bos" not in Protocol().describe()
    with pytest.raises(ValueError, match="unknown bos"):
        Protocol(bos="maybe")
