"""The experts mode on the real-weight derived MoE (smollm2-135m-moe, built by the install command
or on first use): its experts are the dense model's neurons (down projections refitted by recipe
version 2; with the dense weights, every expert active and a zero router it is the dense model), and pruning half its experts gives a smaller model whose
perplexity the evaluator measures, saved and reloaded as a plain transformers checkpoint."""

import json

import pytest
import torch

from prunerzero.core.protocol import Protocol
from prunerzero.fitness.evaluator import EvalSpec, Evaluator
from prunerzero.fitness.perplexity import perplexity
from prunerzero.models import moefy, zoo
from prunerzero.models.loading import load_model

pytestmark = pytest.mark.real

SMALL = Protocol(seq_len=128, calib_windows=4, eval_windows=2)


def test_the_derived_moe_is_the_dense_model_split_into_experts():
    dense = load_model("smollm2-135m", device="cpu").model
    moe = load_model("smollm2-135m-moe", device="cpu").model
    doc = json.loads((zoo.zoo_path("smollm2-135m-moe") / moefy.MANIFEST).read_text())
    recipe = moefy.Recipe(**doc["recipe"])
    splits = [moefy.Split.from_data(s) for s in doc["splits"]]
    every = moefy.moe_from_dense(dense, splits, recipe, top_k=recipe.experts)  # zero routers, all 8 active
    # version 1 fitted the routers alone; version 2 the routers and the experts' down projections
    fitted = ("mlp.gate.weight",) + (("down_proj", "down_proj.weight") if recipe.version >= 2 else ())
    shipped = {k: v for k, v in moe.state_dict().items() if not k.endswith(fitted)}
    assert all(torch.equal(v, every.state_dict()[k]) for k, v in shipped.items())  # the rest: the dense weights
    ids = torch.randint(0, 49152, (1, 64), generator=torch.Generator().manual_seed(0))
    assert torch.allclose(every(ids).logits, dense(ids).logits, atol=1e-3)
    assert moe.config.num_experts == 8 and moe.config.num_experts_per_tok == recipe.top_k == 2


def test_half_the_experts_pruned_from_the_real_moe_save_and_reload(tmp_path):
    ev = Evaluator(EvalSpec(model="smollm2-135m-moe", split="valid", protocol=SMALL, mode="experts",
                            target={"experts": 4}))
    moe = ev.measure().perplexity
    params = sum(p.numel() for p in ev.model.parameters())
    report = ev.prune("reap")
    pruned = ev.measure().perplexity
    kept = sum(p.numel() for p in ev.model.parameters())
    assert moe < pruned < 20 * moe and kept < params and report.sparsity == pytest.approx(0.5)
    ev.mode.save(ev.ctx, report, tmp_path)
    ev.lm.tokenizer.save_pretrained(tmp_path)
    ev.restore()
    assert ev.measure().perplexity == pytest.approx(moe, rel=1e-6)
    back = load_model(str(tmp_path), device="cpu")
    assert back.model.config.num_experts == 4 and sum(p.numel() for p in back.model.parameters()) == kept
    assert perplexity(back.model, ev.windows).perplexity == pytest.approx(pruned, rel=1e-5)
    fewer = ev.evaluate(ev.candidate("naee"))  # NAEE on the real model: memory-bounded, finishes
    assert fewer.status == "ok" and moe < fewer.value
