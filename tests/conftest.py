"""Shared fixtures: a tiny random-init Llama and random calibration windows."""

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

TINY_VOCAB = 128


@pytest.fixture
def tiny_llama():
    """A seeded LlamaForCausalLM (hidden 64, 2 layers, 4 heads, 2 kv heads, intermediate 128),
    in eval mode and frozen, as models.loading.load_model returns models."""
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=TINY_VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
        bos_token_id=1, eos_token_id=2, pad_token_id=0,
    )
    return LlamaForCausalLM(config).eval().requires_grad_(False)


@pytest.fixture
def tiny_windows():
    """Random token ids (4 windows x 16 tokens) for the tiny models' vocabulary."""
    return torch.randint(0, TINY_VOCAB, (4, 16), generator=torch.Generator().manual_seed(1))
