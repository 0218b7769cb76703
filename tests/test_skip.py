"""The skip mode on tiny random-init models: real skipping (gather/scatter) gives what SkipGPT's
multiply-by-zero gives, kept tokens only reach the skipped modules, generation with a KV cache
matches recomputation, router training resumes exactly, caches and saved routers are checked,
static baselines remove the budget, and bad input is named."""

import json

import pytest
import torch
from transformers import Qwen2MoeConfig, Qwen2MoeForCausalLM

from conftest import TINY_SHAPE, tiny_context, tiny_model
from prunerzero.models.adapter import ModelAdapter
from prunerzero.pruning.context import PruneContext
from prunerzero.pruning.modes import ModeError, get_mode
from prunerzero.pruning.skip.routers import DATA, META, RouterError, TrainConfig, load_or_train
from prunerzero.pruning.skip.skipping import skip_counts

FAMILIES = ("llama", "gemma3", "qwen2")  # conftest.TINY_FAMILIES: RoPE + GQA; post-norms, q/k norms, sliding window; q/k/v biases
DATA_IDS = torch.randint(3, 64, (400, 16), generator=torch.Generator().manual_seed(1))
QUICK = {"ratio": 0.3, "steps": 12, "batch": 2, "seq_len": 16, "holdout": 0}  # the last routers, whatever they score
MODE = get_mode("skip")


def train_windows(n, seq_len, seed):
    return torch.randint(3, 64, (n, seq_len), generator=torch.Generator().manual_seed(seed))


def context(family="llama", impl="sdpa", seed=0, log=lambda msg: None):
    model = tiny_model(family, seed=seed, num_hidden_layers=4)
    model.set_attn_implementation(impl)
    return tiny_context(model, DATA_IDS[:8], log=log, train_windows=train_windows)


@pytest.fixture(autouse=True)
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("PRUNERZERO_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


@pytest.mark.parametrize("impl", ["eager", "sdpa"])
@pytest.mark.parametrize("family", FAMILIES)
def test_gather_gives_what_multiplying_by_zero_gives_and_restores(family, impl):
    ctx = context(family, impl)
    test = DATA_IDS[100:104]
    dense = ctx.model(test).logits
    logits, counts = {}, {}
    for execution in ("multiply", "gather"):
        report = MODE.apply(ctx, MODE.candidate("router"), MODE.make_target(QUICK | {"execution": execution}))
        assert report.extra["skip_ratio"] == pytest.approx(0.3, abs=0.02)  # the calibration tokens
        skip_counts(ctx.model, reset=True)
        logits[execution] = ctx.model(test).logits
        counts[execution] = skip_counts(ctx.model)
        ctx.edits.restore()
    assert counts["gather"] == counts["multiply"] and 0.1 < counts["gather"]["skip_ratio"] < 0.5
    torch.testing.assert_close(logits["gather"], logits["multiply"], rtol=1e-5, atol=1e-5)
    assert not torch.allclose(logits["gather"], dense)
    assert torch.equal(ctx.model(test).logits, dense)  # restored bit for bit


def test_skipped_tokens_never_reach_the_module():
    ctx = context()
    MODE.apply(ctx, MODE.candidate("router"), MODE.make_target(QUICK))
    rows = {}
    hooks = [m.register_forward_pre_hook(lambda mod, args, name=name: rows.setdefault(name, []).append(
        args[0].reshape(-1, args[0].shape[-1]).shape[0]))
        for name, m in ctx.model.named_modules() if name.endswith(("mlp.inner.down_proj", "self_attn.inner.o_proj.linear",
                                                                    "self_attn.inner.q_proj.linear"))]
    skip_counts(ctx.model, reset=True)
    ctx.model(DATA_IDS[100:104])
    for h in hooks:
        h.remove()
    seen = 4 * 16 * 4  # tokens x blocks per module kind
    mlp = sum(n for k, v in rows.items() if "mlp" in k for n in v)
    attention = sum(n for k, v in rows.items() if "o_proj" in k for n in v)
    counts = skip_counts(ctx.model)
    assert mlp == round(seen * (1 - counts["mlp_skip_ratio"])) and mlp < seen
    assert attention == round(seen * (1 - counts["attention_skip_ratio"])) and attention < seen


@pytest.mark.parametrize("family", ["llama", "gemma3"])
def test_generation_with_the_kv_cache_matches_recomputation(family):
    ctx = context(family)
    MODE.apply(ctx, MODE.candidate("router"), MODE.make_target(QUICK))
    prompt = DATA_IDS[200:202, :6]
    kw = dict(max_new_tokens=8, do_sample=False, pad_token_id=0)
    cached = ctx.model.generate(prompt, use_cache=True, **kw)
    recomputed = ctx.model.generate(prompt, use_cache=False, **kw)
    assert torch.equal(cached, recomputed)
    ctx.edits.restore()
    MODE.apply(ctx, MODE.candidate("router"), MODE.make_target(QUICK | {"execution": "multiply"}))
    assert torch.equal(ctx.model.generate(prompt, use_cache=True, **kw), cached)


def test_router_training_resumes_to_the_same_routers(cache):
    cfg = TrainConfig(0.3, steps=20, batch=2, seq_len=16, checkpoint_every=5, eval_every=5, holdout=2, lr=0.2)
    whole = load_or_train(context(), cfg, "model-a", log=lambda m: None)

    class Killed(Exception):
        pass

    def die_at_step_10(msg):
        if "step 10/" in msg:
            raise Killed

    with pytest.raises(Killed):
        load_or_train(context(), cfg, "model-b", log=die_at_step_10)
    messages = []
    resumed = load_or_train(context(), cfg, "model-b", log=messages.append)
    assert any("resuming from step 5" in m for m in messages)
    assert resumed.meta["resumed_at"] == 5 and resumed.meta["history"] == whole.meta["history"]
    assert resumed.meta["best"] == whole.meta["best"]
    assert resumed.meta["untimed_steps"] == 0 and resumed.meta["train_seconds"] > 0  # the checkpoint kept its time
    for a, b in zip(whole.routers, resumed.routers):
        assert torch.equal(a.proj.weight, b.proj.weight) and torch.equal(a.proj.bias, b.proj.bias)
    assert len({h[0] for h in whole.meta["history"]}) > 1  # it trained (the best may still be the start)


def held_out_losses(messages) -> dict[int, float]:
    return {int(m.split("at step ")[1].split()[0]): float(m.split("loss ")[1].split()[0])
            for m in messages if "held-out loss" in m and "at step" in m}


def test_training_keeps_the_best_routers_seen_on_held_out_tokens_the_start_included(cache):
    messages = []
    start = tuple(-2.0 if i in (1, 6) else 1.0 for i in range(8))  # a static plan: 2 of 8 sublayers skipped
    cfg = TrainConfig(0.25, steps=12, batch=2, seq_len=16, eval_every=4, lr=0.5, init=start)
    found = load_or_train(context(), cfg, "model-a", log=messages.append)
    seen = held_out_losses(messages)
    assert sorted(seen) == [0, 4, 8, 12]
    best = min(seen, key=seen.get)
    assert found.meta["best"]["step"] == best
    assert found.meta["best"]["holdout_loss"] == pytest.approx(seen[best], abs=1e-4) and seen[best] <= seen[0]


def test_routers_that_cannot_skip_the_budget_are_never_kept(cache):
    messages = []
    cfg = TrainConfig(0.3, steps=8, batch=2, seq_len=16, eval_every=4, lr=0.5)  # one bias for all: tied at the start
    found = load_or_train(context(), cfg, "model-a", log=messages.append)
    assert any("at step 0 no threshold skips 0.3 of the budget (nearest 0.000): not kept" in m for m in messages)
    assert sorted(held_out_losses(messages)) == [4, 8] and found.meta["best"]["step"] in (4, 8)


def test_noise_is_annealed_to_deterministic_gates():
    from prunerzero.pruning.skip.skipping import hard_concrete

    logits = torch.linspace(-3, 3, 101)
    gen = torch.Generator().manual_seed(0)
    torch.testing.assert_close(hard_concrete(logits, 0.5, gen, noise=0.0), (logits > 0).float(), rtol=0, atol=1e-6)
    noisy = hard_concrete(logits.repeat(50, 1), 1.0, gen, noise=1.0)
    assert 0.0 < noisy[:, 40].mean() < 1.0  # logit -0.6: kept sometimes


def test_a_flops_budget_weighs_each_sublayer_by_what_it_saves():
    from prunerzero.pruning.skip.routers import sublayer_costs
    from prunerzero.pruning.skip.skipping import weighted_quantile

    assert weighted_quantile([torch.tensor([1.0, 2.0]), torch.tensor([3.0])], [1.0, 2.0], 0.25) == 1.0
    assert weighted_quantile([torch.tensor([1.0, 2.0]), torch.tensor([3.0])], [1.0, 2.0], 0.5) == 2.0
    assert weighted_quantile([torch.tensor([5.0, 5.0, 5.0, 1.0])], [1.0], 0.3) == 1.0  # never inside a tie
    assert weighted_quantile([torch.tensor([5.0, 5.0, 5.0, 1.0])], [1.0], 0.1) < 1.0
    ctx = context()
    subs = [s for b in ctx.structure.blocks for s in b.sublayers]
    costs = sublayer_costs(ctx.structure, subs, "flops")
    # an attention skips q and o (32x32 each), an MLP its three 48x32 matrices
    assert costs[0] / costs[1] == pytest.approx(2 * 32 * 32 / (3 * 48 * 32)) and sum(costs) == pytest.approx(len(subs))
    report = MODE.apply(ctx, MODE.candidate("router"), MODE.make_target(QUICK | {"budget": "flops"}))
    assert report.extra["flops_skip_ratio"] == pytest.approx(0.3, abs=0.03)
    ctx.edits.restore()
    static = MODE.apply(ctx, MODE.candidate("removal"), MODE.make_target({"ratio": 0.3, "budget": "flops"}))
    assert static.extra["flops_skip_ratio"] == pytest.approx(0.3, abs=0.1)
    ctx.edits.restore()
    modules = MODE.apply(ctx, MODE.candidate("router"), MODE.make_target(QUICK))
    assert modules.extra["skip_ratio"] == pytest.approx(0.3, abs=0.03) and modules.extra["flops_skip_ratio"] > 0
    with pytest.raises(ModeError, match="unknown skip budget 'tokens'"):
        MODE.make_target({"budget": "tokens"})


def test_a_corrupt_router_cache_is_named_set_aside_and_retrained(cache):
    cfg = TrainConfig(0.3, steps=4, batch=2, seq_len=16)
    first = load_or_train(context(), cfg, "model-a", log=lambda m: None)
    folder = next(cache.rglob(META)).parent
    data = bytearray((folder / DATA).read_bytes())
    data[-3] ^= 0xFF
    (folder / DATA).write_bytes(bytes(data))
    messages = []
    again = load_or_train(context(), cfg, "model-a", log=messages.append)
    assert any("checksum mismatch" in m and "retraining" in m for m in messages)
    assert torch.equal(again.routers[0].proj.weight, first.routers[0].proj.weight)
    assert list(folder.glob("*.corrupt*")) or list(folder.parent.glob("*corrupt*"))


def test_routers_for_another_model_are_refused(tmp_path):
    ctx = context()
    report = MODE.apply(ctx, MODE.candidate("router"), MODE.make_target(QUICK))
    MODE.save(ctx, report, tmp_path / "saved")
    ctx.edits.restore()
    trained = next((tmp_path / "cache").rglob(META)).parent
    ok = MODE.apply(ctx, MODE.candidate("router"), MODE.make_target(QUICK | {"routers": str(trained)}))
    assert ok.extra["router_key"] == report.extra["router_key"]
    ctx.edits.restore()
    other = context(seed=1)
    with pytest.raises(RouterError, match="routers trained for model"):
        MODE.check(other, MODE.make_target(QUICK | {"routers": str(trained)}))
    with pytest.raises(RouterError, match="routes 8 sublayers"):
        MODE.check(ctx, MODE.make_target(QUICK | {"routers": str(trained), "modules": "mlp"}))
    with pytest.raises(RouterError, match="no usable routers"):
        MODE.check(ctx, MODE.make_target(QUICK | {"routers": str(tmp_path)}))


def test_a_saved_skipping_model_reloads_and_skips_the_same(tmp_path):
    from prunerzero.models.loading import RESHAPED
    from prunerzero.pruning.skip.mode import MARKER

    ctx = context("qwen2")
    report = MODE.apply(ctx, MODE.candidate("router"), MODE.make_target(QUICK))
    test = DATA_IDS[100:104]
    skip_counts(ctx.model, reset=True)
    pruned = ctx.model(test).logits
    counts = skip_counts(ctx.model)
    MODE.save(ctx, report, tmp_path)
    back = RESHAPED[MARKER](tmp_path, torch.float32)  # what every prunerzero command loads it with
    back.set_attn_implementation("sdpa")
    skip_counts(back, reset=True)
    torch.testing.assert_close(back(test).logits, pruned, rtol=1e-5, atol=1e-5)
    assert skip_counts(back) == counts
    plan = json.loads((tmp_path / "prunerzero_skip.json").read_text())
    assert plan["plan"]["threshold"] == report.extra["threshold"]
    units = ModelAdapter(back).prunable()  # routers are not weights to prune; q/o keep their roles
    assert [u.role for u in units] == [u.role for u in ctx.units]


@pytest.mark.parametrize("method", ["shortgpt", "removal", "wanda"])
def test_static_baselines_remove_the_budget_of_least_important_sublayers(method):
    from prunerzero.pruning.skip.mode import importance

    ctx = context()
    test = DATA_IDS[100:104]
    dense = ctx.model(test).logits
    target = MODE.make_target({"ratio": 0.25})
    report = MODE.apply(ctx, MODE.candidate(method), target)
    assert len(report.extra["removed"]) == 2 and report.extra["skip_ratio"] == 0.25
    imp = importance(ctx, MODE.candidate(method), target)
    flat = sorted(imp.flatten())
    removed = [imp[b, 0 if k == "attention" else 1] for b, k in report.extra["removed"]]
    assert sorted(removed) == flat[:2]
    assert not torch.allclose(ctx.model(test).logits, dense)
    ctx.edits.restore()
    only_mlp = MODE.apply(ctx, MODE.candidate(method), MODE.make_target({"ratio": 0.5, "modules": "mlp"}))
    assert [k for _, k in only_mlp.extra["removed"]] == ["mlp", "mlp"]
    ctx.edits.restore()
    assert torch.equal(ctx.model(test).logits, dense)


def test_routers_start_from_a_static_ranking():
    ctx = context()
    report = MODE.apply(ctx, MODE.candidate("router"),
                        MODE.make_target(QUICK | {"router_init": "shortgpt", "steps": 1}))
    shortgpt = MODE.apply(PruneContext(ctx.model, ctx.adapter, ctx.calibration, ctx.stats),
                          MODE.candidate("shortgpt"), MODE.make_target({"ratio": 0.25}))
    assert report.extra["skip_ratio"] == pytest.approx(0.3, abs=0.02)
    assert shortgpt.extra["removed"]


def test_lora_after_the_routers_changes_the_weights_and_restores():
    ctx = context()
    test = DATA_IDS[100:104]
    dense = ctx.model(test).logits
    weights = {u.name: u.weight.clone() for u in ctx.units}
    plain = MODE.apply(ctx, MODE.candidate("router"), MODE.make_target(QUICK))
    without = ctx.model(test).logits
    ctx.edits.restore()
    report = MODE.apply(ctx, MODE.candidate("router"), MODE.make_target(QUICK | {"lora_steps": 3, "lora_lr": 1e-2}))
    changed = [u.name for u in ctx.units if not torch.equal(u.weight, weights[u.name])]
    assert changed and report.extra["router_key"] != plain.extra["router_key"]
    assert not torch.allclose(ctx.model(test).logits, without)
    assert not any(type(m).__name__.startswith("Lora") for m in ctx.model.modules())  # peft taken out
    ctx.edits.restore()
    assert all(torch.equal(u.weight, weights[u.name]) for u in ctx.units)
    assert torch.equal(ctx.model(test).logits, dense)


@pytest.mark.parametrize("ratio", [1.0, -0.1, 1.5])
def test_a_skip_ratio_outside_zero_one_is_named(ratio):
    with pytest.raises(ModeError, match=f"skip ratio {ratio} must be in \\[0, 1\\)"):
        MODE.make_target({"ratio": ratio})


def test_bad_target_fields_are_named():
    with pytest.raises(ModeError, match="unknown modules 'heads'"):
        MODE.make_target({"modules": "heads"})
    with pytest.raises(ModeError, match="use gather or multiply"):
        MODE.make_target({"execution": "train"})
    with pytest.raises(ModeError, match="cannot apply a Method"):
        MODE.apply(context(), get_mode("unstructured").method("sparsegpt"), MODE.make_target({}))


def test_an_moe_model_is_refused():
    cfg = Qwen2MoeConfig(**TINY_SHAPE, num_experts=4, num_experts_per_tok=2,
                         moe_intermediate_size=16, shared_expert_intermediate_size=16)
    model = Qwen2MoeForCausalLM(cfg).eval()
    ctx = tiny_context(model, DATA_IDS[:2], stats=None)
    with pytest.raises(ValueError, match="takes dense models; this one has experts"):
        MODE.check(ctx, MODE.make_target({}))


def test_the_cli_names_a_bad_ratio(tmp_path):
    from typer.testing import CliRunner

    from prunerzero.cli import app

    result = CliRunner().invoke(app, ["prune", "--mode", "skip", "--ratio", "1.2", "--out", str(tmp_path / "o")])
    assert result.exit_code != 0 and "skip ratio 1.2 must be in [0, 1)" in result.output


def test_removal_losses_are_cached_on_disk_and_a_damaged_entry_is_named_and_recomputed(cache, monkeypatch):
    from prunerzero.pruning import influence

    first = influence.removal_losses(context())
    (path,) = cache.rglob("removal-*.json")
    real = influence._removal_losses
    monkeypatch.setattr(influence, "_removal_losses", lambda *a: pytest.fail("recomputed a valid cache entry"))
    assert (influence.removal_losses(context()) == first).all()
    doc = json.loads(path.read_text())
    doc["body"][0][0] += 0.5
    path.write_text(json.dumps(doc))
    monkeypatch.setattr(influence, "_removal_losses", real)
    messages = []
    again = influence.removal_losses(context(log=messages.append))
    assert (again == first).all() and any("removal losses: checksum mismatch" in m for m in messages)
    assert len(list(path.parent.glob("*.corrupt-*"))) == 1
