"""Removal losses (structured mode's `scale = "removal"`) start each removal's forward after the
blocks it cannot change: the numbers are exactly those of whole forwards, and the model is left
as it was."""

import numpy as np
import torch

from prunerzero.pruning import influence
from conftest import tiny_context
from prunerzero.pruning.interventions import applied
from prunerzero.pruning.removal import remove_sublayer


def test_replayed_prefixes_give_the_whole_forwards_losses_bit_for_bit(tiny_llama, tiny_windows):
    ctx = tiny_context(tiny_llama, tiny_windows, stats=None)
    adapter = ctx.adapter
    ids = tiny_windows[:2, :16]
    dense = tiny_llama(ids).logits.clone()
    base = influence._loss(tiny_llama, ids)
    whole = np.zeros((len(ctx.structure.blocks), 2))
    for block in ctx.structure.blocks:
        for k, sublayer in enumerate(block.sublayers[:2]):
            with applied() as edits:
                remove_sublayer(edits, sublayer)
                whole[block.index, k] = influence._loss(tiny_llama, ids) - base
    replayed = influence._removal_losses(ctx, 2, 16)
    assert np.array_equal(replayed, whole) and np.abs(whole).sum() > 0
    assert torch.equal(tiny_llama(ids).logits, dense)  # every block back in place
    assert all(type(b).__name__ == "LlamaDecoderLayer" for b in adapter.blocks)
