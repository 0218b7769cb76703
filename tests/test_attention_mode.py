"""The attention mode on tiny random-init models: the model's own attention probabilities, exact
sparsity, never worse than the metric's masks on calibration tokens, bad input named."""

import pytest
import torch
from transformers import Phi3Config, Phi3ForCausalLM
from typer.testing import CliRunner

from prunerzero.cli import app
from conftest import TINY_SHAPE, tiny_context, tiny_model
from prunerzero.models.adapter import ModelAdapter
from prunerzero.primitives.metric import resolve_metric
from prunerzero.pruning.interventions import DenseSnapshot
from prunerzero.pruning.attention.mode import AttentionTarget, _Grab, optimise_qk
from prunerzero.pruning.attention.loss import BlockAttention, Objective
from prunerzero.pruning.modes import ModeError, get_mode
from prunerzero.pruning.unstructured.target import PruneTarget

FAMILIES = ("llama", "gemma3", "qwen3")  # conftest.TINY_FAMILIES: RoPE + GQA; q/k norms and a sliding window; q/k norms


def grab_inputs(model, adapter, windows):
    grabs = [_Grab(windows.shape[0], 0) for _ in adapter.structure.attentions]
    handles = [a.module.register_forward_pre_hook(g, with_kwargs=True)
               for a, g in zip(adapter.structure.attentions, grabs)]
    try:
        out = model(windows, output_attentions=True)
    finally:
        for h in handles:
            h.remove()
    return [g.inputs() for g in grabs], out.attentions


def context(model, windows, stats_mode="one-shot"):
    return tiny_context(model, windows, stats_mode=stats_mode)


@pytest.mark.parametrize("family", FAMILIES)
def test_probabilities_are_the_models_own(family):
    torch.manual_seed(0)
    model = tiny_model(family)
    model.set_attn_implementation("eager")
    adapter = ModelAdapter(model)
    windows = torch.randint(0, 64, (2, 12), generator=torch.Generator().manual_seed(1))
    inputs, reference = grab_inputs(model, adapter, windows)
    for a, x, ref in zip(adapter.structure.attentions, inputs, reference):
        block = BlockAttention(a, x, chunk=5)  # chunks of 5, 5, 2 queries
        q, k = block.qk(a.q.weight, a.k.weight)
        rows = [torch.softmax(block.logits(q, k, s, e, block.allowed(s, e, q.device)), -1) for s, e in block.chunks()]
        probs = torch.cat([torch.nn.functional.pad(p, (0, 12 - p.shape[-1])) for p in rows], dim=2)
        torch.testing.assert_close(probs, ref, atol=1e-6, rtol=0)
        assert Objective(block, a.q.weight, a.k.weight).error(a.q.weight, a.k.weight) == 0.0


@pytest.mark.parametrize("objective", ["frobenius", "kl", "output"])
@pytest.mark.parametrize("group", ["row", "layer"])
def test_optimised_masks_are_exact_and_never_worse_than_the_metrics(tiny_llama, tiny_windows, objective, group):
    adapter = ModelAdapter(tiny_llama)
    inputs, _ = grab_inputs(tiny_llama, adapter, tiny_windows)
    a = adapter.structure.attentions[1]
    obj = Objective(BlockAttention(a, inputs[1], chunk=6), a.q.weight, a.k.weight, objective)
    target = AttentionTarget(sparsity=0.7, group=group, objective=objective, steps=30, windows=4)
    result = optimise_qk(obj, a.q.weight, a.k.weight, a.q.weight.abs(), a.k.weight.abs(), target)
    for mask, unit in zip(result.masks, (a.q, a.k)):
        k = int(unit.shape[1] * 0.7)
        counts = mask.sum(dim=1) if group == "row" else mask.sum()
        assert torch.all(counts == (k if group == "row" else int(unit.weight.numel() * 0.7)))
    assert result.error <= result.init_error
    assert result.error == obj.error(a.q.weight * ~result.masks[0], a.k.weight * ~result.masks[1])
    assert result.error < 0.9 * result.init_error  # it does move, on this layer
    initial = optimise_qk(obj, a.q.weight, a.k.weight, a.q.weight.abs(), a.k.weight.abs(),
                          AttentionTarget(sparsity=0.7, group=group, steps=0))
    assert initial.best_step == -1 and initial.error == result.init_error


def test_mode_prunes_every_block_and_restores_exactly(tiny_llama, tiny_windows):
    ctx = context(tiny_llama, tiny_windows)
    snapshot = DenseSnapshot(ctx.units)
    dense_logits = tiny_llama(tiny_windows).logits
    inputs, _ = grab_inputs(tiny_llama, ctx.adapter, tiny_windows)
    dense_qk = [(a.q.weight.clone(), a.k.weight.clone()) for a in ctx.structure.attentions]
    messages = []
    ctx.log = messages.append
    mode = get_mode("attention")
    report = mode.apply(ctx, resolve_metric("wanda"), mode.make_target({"steps": 20, "windows": 4}))
    for unit in ctx.units:  # every unit at exactly 50% per row: q/k optimised, the rest by the metric
        assert torch.all((unit.weight == 0).sum(dim=1) == unit.shape[1] // 2), unit.name
    for a, x, (wq, wk) in zip(ctx.structure.attentions, inputs, dense_qk):
        obj = Objective(BlockAttention(a, x), wq, wk)
        init = optimise_qk(obj, wq, wk, *_wanda_scores(ctx, a), AttentionTarget(steps=0)).error
        assert obj.error(a.q.weight, a.k.weight) <= init
    assert len(messages) == 2 and "block 2/2" in messages[1] and " s" in messages[1]
    assert report.extra["attention_error"] <= report.extra["attention_error_init"]
    assert report.sparsity == pytest.approx(0.5) and report.fingerprint
    snapshot.restore()
    assert torch.equal(tiny_llama(tiny_windows).logits, dense_logits)


def _wanda_scores(ctx, a):
    from prunerzero.pruning.reduce import unit_scores

    stats = ctx.stats(frozenset({"X"}))
    return unit_scores(resolve_metric("wanda"), a.q, stats), unit_scores(resolve_metric("wanda"), a.k, stats)


def test_no_steps_is_the_unstructured_modes_masks(tiny_llama, tiny_windows):
    ctx = context(tiny_llama, tiny_windows)
    snapshot = DenseSnapshot(ctx.units)
    wanda = resolve_metric("wanda")
    mine = get_mode("attention").apply(ctx, wanda, AttentionTarget(steps=0, windows=4))
    snapshot.restore()
    theirs = get_mode("unstructured").apply(ctx, wanda, PruneTarget(0.5))
    assert mine.fingerprint == theirs.fingerprint


def test_sequential_and_dense_others(tiny_llama, tiny_windows):
    ctx = context(tiny_llama, tiny_windows, "sequential")
    report = get_mode("attention").apply(ctx, resolve_metric("wanda"),
                                         AttentionTarget(sparsity=0.6, others="dense", steps=10, windows=2, tokens=8))
    for unit in ctx.units:
        zeros = int((unit.weight == 0).sum(dim=1)[0])
        assert zeros == (int(unit.shape[1] * 0.6) if unit.role in ("q", "k") else 0), unit.name
    assert 0 < report.sparsity < 0.6


@pytest.mark.parametrize("fields, needle", [
    ({"sparsity": 1.0}, "sparsity 1.0 is out of range"),
    ({"sparsity": -0.2}, "sparsity -0.2 is out of range"),
    ({"objective": "l1"}, "unknown objective 'l1'"),
    ({"others": "magnitude"}, "unknown others 'magnitude'"),
    ({"windows": 0}, "windows must be >= 1"),
])
def test_bad_targets_name_the_problem(fields, needle):
    with pytest.raises(ModeError, match=needle):
        get_mode("attention").make_target(fields)


def test_calibration_too_small_and_fused_qkv_are_refused(tiny_llama, tiny_windows):
    mode = get_mode("attention")
    ctx = context(tiny_llama, tiny_windows)
    with pytest.raises(ModeError, match=r"calibration too small — 4 window\(s\) of 16 tokens.*windows=8"):
        mode.check(ctx, AttentionTarget())
    with pytest.raises(ModeError, match="calibration too small .* of 4 tokens"):
        mode.check(ctx, AttentionTarget(windows=4, tokens=4))
    torch.manual_seed(0)
    phi = Phi3ForCausalLM(Phi3Config(**TINY_SHAPE)).eval().requires_grad_(False)
    ctx = context(phi, tiny_windows % 64)
    with pytest.raises(ModeError, match="separate q and k projections .* model.layers.0 has none"):
        mode.check(ctx, AttentionTarget(windows=4))


def test_cli_names_bad_attention_input():
    result = CliRunner().invoke(app, ["prune", "--out", "x", "--mode", "attention", "--set", "objective=l2"])
    assert result.exit_code == 2 and "unknown objective 'l2'" in result.output
    result = CliRunner().invoke(app, ["prune", "--out", "x", "--mode", "attention", "--sparsity", "1.5"])
    assert result.exit_code == 2 and "sparsity 1.5 is out of range" in result.output
