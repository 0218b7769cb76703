"""MoEfication on a tiny Llama: with every expert active and a zero router the derived Qwen2-MoE
is the dense model to float tolerance; balanced k-means groups co-activated neurons in equal
experts; fitted routers beat uniform routing; the cached model is verified and rebuilt when
damaged; bad input is named."""

import json

import pytest
import torch
from transformers import AutoModelForCausalLM

from prunerzero.core.integrity import CorruptCache
from prunerzero.models import moefy, zoo
from prunerzero.models.adapter import ModelAdapter

RECIPE = moefy.Recipe(experts=4, shared=32, top_k=2, cluster_iters=4, router_steps=40)


def test_with_every_expert_active_the_moe_is_the_dense_model(tiny_llama, tiny_windows, tmp_path):
    every = moefy.Recipe(experts=4, shared=32, top_k=4, cluster_iters=4)
    moe, splits, errors = moefy.moefy(tiny_llama, tiny_windows, every)
    assert type(moe).__name__ == "Qwen2MoeForCausalLM" and errors == []  # top-k = E: no router to fit
    sizes = [len(splits[0].shared)] + [len(e) for e in splits[0].experts]
    assert sizes == [32, 24, 24, 24, 24]
    for sp in splits:  # every neuron in exactly one expert
        assert sorted(torch.cat([sp.shared, *sp.experts]).tolist()) == list(range(128))
    dense = tiny_llama(tiny_windows).logits
    assert torch.allclose(moe(tiny_windows).logits, dense, atol=1e-5)
    moe.save_pretrained(tmp_path)  # a standard transformers checkpoint
    back = AutoModelForCausalLM.from_pretrained(tmp_path)
    assert torch.allclose(back(tiny_windows).logits, dense, atol=1e-5)
    assert ModelAdapter(back).structure.expert_layers[0].n_experts == 4


def test_fitted_routers_beat_uniform_routing(tiny_llama, tiny_windows):
    mlps = ModelAdapter(tiny_llama).structure.mlps
    x = moefy.capture_mlp_inputs(tiny_llama, mlps, tiny_windows)[1]
    split = moefy.split_neurons(moefy.activations(mlps[1], x), 4, 32, 4, 0)
    outs = moefy.expert_outputs(mlps[1], x, split.experts)
    uniform = moefy.relative_error(moefy.routed(torch.zeros(len(x), 4), outs, 2), outs.sum(1))
    w = moefy.fit_router(x, outs, 2, 40, 3e-2)
    assert moefy.relative_error(moefy.routed(x @ w.T, outs, 2), outs.sum(1)) < uniform


def test_balanced_kmeans_groups_co_activated_neurons():
    g = torch.Generator().manual_seed(0)
    tokens = torch.rand(64, 2, generator=g) > 0.5  # two independent "topics"
    acts = torch.cat([tokens[:, :1].float().expand(-1, 6), tokens[:, 1:].float().expand(-1, 6)], 1)
    acts = acts + 0.01 * torch.rand(64, 12, generator=g)
    labels = moefy.balanced_kmeans(acts.T, 2, 5, seed=3)
    assert len(set(labels[:6].tolist())) == 1 and len(set(labels[6:].tolist())) == 1 and labels[0] != labels[6]


def test_bad_input_is_named(tiny_llama):
    with pytest.raises(moefy.MoefyError, match="top_k 9 must be in"):
        moefy.Recipe(experts=8, top_k=9)
    with pytest.raises(moefy.MoefyError, match="do not split into 5 equal experts"):
        moefy.split_neurons(torch.rand(4, 128), 5, 32, 1, 0)
    config = tiny_llama.config.__class__(**tiny_llama.config.to_dict())
    config.model_type = "gemma3"
    with pytest.raises(moefy.MoefyError, match="Llama-family dense model; this one is 'gemma3'"):
        moefy.moe_config(config, RECIPE)


def test_the_cached_moe_is_verified_and_rebuilt_when_damaged(tmp_path, monkeypatch):
    out = tmp_path / "smollm2-135m-moe"
    out.mkdir()
    (out / moefy.WEIGHTS).write_bytes(b"weights")
    doc = {"recipe": moefy.Recipe().describe(), "sha256": zoo.sha256_file(out / moefy.WEIGHTS), "size": 0}
    (out / moefy.MANIFEST).write_text(json.dumps(doc))
    moefy.verify(out)  # the hash matches (checked once: the stamp is recorded)
    assert json.loads((out / moefy.MANIFEST).read_text())["size"] == 7
    (out / moefy.WEIGHTS).write_bytes(b"weightz!")
    with pytest.raises(CorruptCache, match="does not match the sha256"):
        moefy.verify(out)
    built = []
    monkeypatch.setattr(zoo, "zoo_path", lambda name: out)
    monkeypatch.setattr(moefy, "build", lambda path, log: built.append(path) or path)
    assert zoo.fetch("smollm2-135m-moe", log=lambda msg: None) == out and built == [out]
    assert list(tmp_path.glob("smollm2-135m-moe.corrupt-*"))  # the damaged one set aside, for a look
