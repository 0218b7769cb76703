"""Interventions: every kind changes the model and restores it bit-identically — weights written,
parameters replaced (experts removed or merged, router rows), modules wrapped, attributes set,
physical slicing — and slicing computes what masking computes."""

import pytest
import torch
from torch import nn

from prunerzero.models.adapter import ModelAdapter
from prunerzero.pruning.interventions import DenseSnapshot
from prunerzero.pruning.interventions import Edits, applied
from prunerzero.pruning.slicing import remove_experts, set_top_k, slice_attention, slice_mlp

from conftest import TINY_FAMILIES, MOE_FAMILIES, build, tokens


def logits(model):
    with torch.no_grad():
        return model(tokens()).logits


def params(model):
    return {n: p for n, p in model.named_parameters()}


def check_round_trip(model, change):
    """Apply `change(edits)`; the output moves; restore; the output and parameter objects are back."""
    before, objects = logits(model), params(model)
    edits = Edits()
    change(edits)
    assert not torch.equal(logits(model), before)
    edits.restore()
    assert torch.equal(logits(model), before)
    assert all(p is objects[n] for n, p in params(model).items()) and params(model).keys() == objects.keys()


@pytest.mark.parametrize("family", TINY_FAMILIES)
def test_weight_writes_restore_bit_identically(family):
    model = build(family)
    units = ModelAdapter(model).prunable()
    check_round_trip(model, lambda e: [e.write(u.weight[:, :3], torch.zeros_like(u.weight[:, :3])) for u in units])
    snapshot, before = DenseSnapshot(units), logits(model)
    for u in units:
        u.weight.mul_(0.5)
    snapshot.restore()
    assert torch.equal(logits(model), before)


@pytest.mark.parametrize("family", TINY_FAMILIES)
def test_physical_slicing_restores_bit_identically(family):
    model = build(family)
    st = ModelAdapter(model).structure
    dense_params = sum(p.numel() for p in model.parameters())

    def change(edits):
        for a in st.attentions:
            slice_attention(edits, a, [[0], []])  # one query head of KV head 0, KV head 1 removed
        for m in st.mlps:
            slice_mlp(edits, m, range(0, m.width, 2))
        assert sum(p.numel() for p in model.parameters()) < dense_params
        assert st.attentions[0].module.num_key_value_groups == 1

    check_round_trip(model, change)
    assert st.attentions[0].module.num_key_value_groups == 2


@pytest.mark.parametrize("family", MOE_FAMILIES)
def test_expert_removal_merging_and_top_k_restore_bit_identically(family):
    model = build(family)
    st = ModelAdapter(model).structure
    merge = torch.tensor([[0.5, 0.5, 0.0, 0.0], [0.0, 0.0, 1.0, 0.0]])

    def change(edits):
        for layer in st.expert_layers:
            remove_experts(edits, layer, [0, 2], merge=merge)
            assert layer.module.gate_up_proj.shape[0] == 2 and layer.router_module.weight.shape[0] == 2
            set_top_k(edits, layer, 1)

    check_round_trip(model, change)
    layer = st.expert_layers[0]
    assert layer.module.gate_up_proj.shape[0] == 4 and layer.top_k == 2


def test_merged_experts_are_the_weighted_sums():
    model = build("mixtral")
    layer = ModelAdapter(model).structure.expert_layers[0]
    w = layer.module.gate_up_proj.detach().clone()
    merge = torch.tensor([[0.25, 0.75, 0.0, 0.0], [0.0, 0.0, 0.0, 1.0]])
    with applied() as edits:
        remove_experts(edits, layer, [1, 3], merge=merge)
        assert torch.allclose(layer.module.gate_up_proj[0], 0.25 * w[0] + 0.75 * w[1])
        assert torch.equal(layer.module.gate_up_proj[1], w[3])
    assert torch.equal(layer.module.gate_up_proj, w)
    with pytest.raises(ValueError, match="keep"):
        remove_experts(Edits(), layer, [1, 1])


@pytest.mark.parametrize("family", TINY_FAMILIES)
def test_wrapped_modules_and_attributes_restore_bit_identically(family):
    model = build(family)
    st = ModelAdapter(model).structure
    mlp = st.blocks[0].sublayers[1]

    def change(edits):
        edits.set_module(mlp.parent, mlp.attr, Zero())
        edits.set_attr(st.attentions[1].module, "scaling", 0.0)

    check_round_trip(model, change)
    assert getattr(mlp.parent, mlp.attr) is mlp.module


class Zero(nn.Module):
    def forward(self, hidden_states, *args, **kwargs):
        return torch.zeros_like(hidden_states)


def test_slicing_computes_what_masking_computes():
    """Removing heads and channels equals zeroing their o columns and down columns."""
    model = build("llama")
    st = ModelAdapter(model).structure
    units = ModelAdapter(model).prunable()
    keep_channels = list(range(1, 48, 3))
    with applied() as edits:
        for a in st.attentions:
            slice_attention(edits, a, [[1], [3]])  # heads 0 and 2 removed
        for m in st.mlps:
            slice_mlp(edits, m, keep_channels)
        sliced = logits(model)
    snapshot = DenseSnapshot(units)
    with torch.no_grad():
        for a in st.attentions:
            for h in (0, 2):
                a.o.weight[:, h * 8:(h + 1) * 8] = 0
        for m in st.mlps:
            dropped = [c for c in range(m.width) if c not in keep_channels]
            m.down.weight[:, dropped] = 0
    masked = logits(model)
    snapshot.restore()
    assert torch.allclose(sliced, masked, atol=1e-5)


def test_slicing_refuses_unequal_query_groups():
    st = ModelAdapter(build("llama")).structure
    with pytest.raises(ValueError, match="equally many"):
        slice_attention(Edits(), st.attentions[0], [[0, 1], [2]])
    with pytest.raises(ValueError, match="do not read KV head 0"):
        slice_attention(Edits(), st.attentions[0], [[2], [3]])
