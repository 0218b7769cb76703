"""The experts mode on tiny random-init MoE families (Mixtral, Qwen2-MoE with its shared expert,
OLMoE): every candidate applies and restores bit-identically, removal is the router restricted to
the kept experts, NAEE is the brute-force optimum, merging is the aligned weighted average, the least-squares
refit brings a layer's output closer to the unpruned one, saved
models reload, and bad budgets fail naming the problem."""

import itertools

import pytest
import torch
from transformers import AutoModelForCausalLM

from prunerzero.models.adapter import ModelAdapter
from prunerzero.models import loading
from prunerzero.pruning.experts import mode as ex
from prunerzero.pruning.interventions import DenseSnapshot
from prunerzero.pruning.candidates import decode, encode
from prunerzero.pruning.experts.signals import (alignment, all_expert_outputs, expert_forward, moe_output,
                                                naee_keep, permute_neurons, route)
from prunerzero.pruning.interventions import applied
from prunerzero.pruning.modes import ModeError, get_mode
from conftest import MOE_FAMILIES, N_EXPERTS, VOCAB, build, tiny_context

MODE = get_mode("experts")


def windows():
    return torch.randint(0, VOCAB, (4, 16), generator=torch.Generator().manual_seed(1))


def context(model):
    return tiny_context(model, windows())


def params(model) -> int:
    return sum(p.numel() for p in model.parameters())


@pytest.fixture(params=MOE_FAMILIES)
def family(request):
    return request.param


@pytest.mark.parametrize("family,candidate,fields", [  # every family, method and target field at least once
    ("mixtral", "reap", {"experts": 2}), ("qwen2_moe", "frequency", {"experts": 3, "merge": "aligned"}),
    ("olmoe", "naee", {"experts": 2, "top_k": 1}), ("mixtral", "random", {"experts": 3}),
    ("qwen2_moe", "wanda", {"experts": 2, "allocation": "global"}),
    ("olmoe", "magnitude", {"per_layer": "2,3", "signal": "none", "merge": "aligned"}),
    ("mixtral", "gate", {"experts": 2, "top_k": 1, "merge": "aligned"}),
    ("qwen2_moe", "reap", {"experts": 2, "merge": "refit"}), ("mixtral", "naee", {"experts": 2, "merge": "refit"}),
])
def test_every_candidate_prunes_and_restores_bit_identically(family, candidate, fields):
    model = build(family)
    ctx = context(model)
    snapshot = DenseSnapshot(ctx.units)
    ids = windows()
    dense, dense_params = model(ids).logits, params(model)
    report = MODE.apply(ctx, MODE.candidate(candidate), MODE.make_target(fields))
    keep = report.extra["plan"]["keep"]
    expected = [int(c) for c in fields["per_layer"].split(",")] if "per_layer" in fields else None
    assert [len(k) for k in keep] == (expected or [len(keep[0])] * len(keep))
    assert sum(map(len, keep)) == (sum(expected) if expected else fields["experts"] * len(keep))
    assert params(model) < dense_params and 0 < report.sparsity < 1 and report.fingerprint
    assert not torch.equal(model(ids).logits, dense)
    ctx.edits.restore()
    snapshot.restore()
    assert params(model) == dense_params and torch.equal(model(ids).logits, dense)


def test_removal_is_the_router_restricted_to_the_kept_experts(family):
    """The pruned layer computes exactly what its router gives when only the kept rows remain
    (softmax over the kept experts), from the kept experts' outputs."""
    model = build(family)
    layer = ModelAdapter(model).structure.expert_layers[0]
    x = torch.randn(12, model.config.hidden_size, generator=torch.Generator().manual_seed(0))
    keep = [1, 3]
    expected = moe_output(*route(layer, x, keep), all_expert_outputs(layer, x)[:, keep])
    from prunerzero.pruning.slicing import remove_experts

    with applied() as edits:
        remove_experts(edits, layer, keep)
        routed = layer.module(x, *reversed(layer.router_module(x)[1:]))
    assert torch.allclose(routed, expected, atol=1e-6)


def test_naee_finds_the_subset_with_the_least_output_error():
    model = build("mixtral").requires_grad_(False)
    layer = ModelAdapter(model).structure.expert_layers[1]
    x = torch.randn(32, model.config.hidden_size, generator=torch.Generator().manual_seed(2))
    outputs = all_expert_outputs(layer, x)
    full = moe_output(*route(layer, x), outputs)
    losses = {s: float((moe_output(*route(layer, x, list(s)), outputs[:, list(s)]) - full).square().sum())
              for s in itertools.combinations(range(N_EXPERTS), 2)}
    keep, loss = naee_keep(layer, x, 2)
    assert tuple(keep) == min(losses, key=losses.get) and loss == pytest.approx(min(losses.values()), rel=1e-4)
    greedy, _ = naee_keep(layer, x, 2, max_subsets=1)  # the fallback for large layers: still a valid subset
    assert len(set(greedy)) == 2


def test_aligned_merging_is_the_weighted_average_of_permuted_experts():
    model = build("mixtral")
    ctx = context(model)
    layer = ctx.structure.expert_layers[0]
    x = torch.randn(8, model.config.hidden_size)
    before = layer.module(x, torch.tensor([[0, 1]] * 8), torch.full((8, 2), 0.5))
    perm = torch.randperm(layer.module.gate_up_proj.shape[1] // 2, generator=torch.Generator().manual_seed(0))
    with applied() as edits:  # permuting an expert's neurons is the same function
        permute_neurons(edits, layer, {1: perm})
        after = layer.module(x, torch.tensor([[0, 1]] * 8), torch.full((8, 2), 0.5))
    assert torch.allclose(before, after, atol=1e-6)
    original = layer.module.gate_up_proj.detach().clone()
    report = MODE.apply(ctx, MODE.candidate("reap"), MODE.make_target({"experts": 3, "merge": "aligned"}))
    (j, (i, c)), = report.extra["plan"]["merge"][0].items()
    j, kept = int(j), report.extra["plan"]["keep"][0]
    merged = layer.module.gate_up_proj[kept.index(i)].detach().clone()  # the module holds the new parameters
    ctx.edits.restore()
    p = alignment(layer, i, j)
    mass = ex.routing(ctx, MODE.make_target({"experts": 3}))[0].gate
    wi, wj = mass[i] / (mass[i] + c * mass[j]), c * mass[j] / (mass[i] + c * mass[j])
    expected = wi * original[i] + wj * original[j][torch.cat([p, p + len(p)])]
    assert torch.allclose(merged, expected, atol=1e-6) and not torch.allclose(merged, original[i])


@pytest.mark.parametrize("family", MOE_FAMILIES)
def test_refit_merge_brings_the_routed_output_closer_to_the_unpruned_layers(family):
    model = build(family)
    ctx = context(model)
    layer = ctx.structure.expert_layers[0]
    x = ex.routing(ctx, MODE.make_target({}))[0].inputs
    full = moe_output(*route(layer, x), all_expert_outputs(layer, x))

    def error(fields) -> float:
        MODE.apply(ctx, MODE.candidate("reap"), MODE.make_target({"experts": 2, "top_k": 1, **fields}))
        kept = torch.stack([expert_forward(layer.module, r, x) for r in range(2)], 1)  # the two kept experts now
        out = moe_output(*route(layer, x, [0, 1]), kept)
        ctx.edits.restore()
        return float((out - full).square().sum() / full.square().sum())

    pruned, refit = error({}), error({"merge": "refit"})
    assert refit < 0.9 * pruned, (pruned, refit)


@pytest.mark.parametrize("family", ["qwen2_moe", "olmoe"])
def test_kept_experts_are_rescaled_by_their_mass_where_the_router_does_not_renormalise(family):
    model = build(family)
    ctx = context(model)
    layer = ctx.structure.expert_layers[0]
    original = layer.module.down_proj.detach().clone()
    report = MODE.apply(ctx, MODE.candidate("frequency"), MODE.make_target({"experts": 2}))
    kept = report.extra["plan"]["keep"][0]
    mass = ex.routing(ctx, MODE.make_target({}))[0].kept_mass(kept)
    assert 0 < mass < 1 and torch.allclose(layer.module.down_proj, original[kept] * mass)
    ctx.edits.restore()
    MODE.apply(ctx, MODE.candidate("frequency"), MODE.make_target({"experts": 2, "rescale": False}))
    assert torch.equal(layer.module.down_proj, original[kept])
    ctx.edits.restore()


def test_routing_statistics_are_consistent():
    model = build("mixtral")
    ctx = context(model)
    stats = ex.routing(ctx, MODE.make_target({}))
    for s in stats:
        assert float(s.frequency.sum()) == pytest.approx(2.0)  # each token routed to top-2
        assert float(s.gate.sum()) == pytest.approx(1.0, abs=1e-5)  # Mixtral renormalises the top-k weights
        assert float(s.prob.sum()) == pytest.approx(1.0, abs=1e-5) and s.kept_mass(range(N_EXPERTS)) == pytest.approx(1)
        assert (s.reap >= 0).all() and s.inputs.shape == (windows().numel(), model.config.hidden_size)


def test_an_expert_plan_travels_as_data_and_rank_zero_up_is_the_metric_choice():
    model = build("olmoe")
    ctx = context(model)
    target = MODE.make_target({"experts": 2})
    plan = ex.ExpertPlan("reap", ((0, 1), (0, 1)), ((0, 0, 0, 0), (0, 0, 0, 0)))
    assert decode(encode(plan)) == plan and decode(encode(plan)).key == plan.key
    by_metric = MODE.apply(ctx, MODE.candidate("reap"), target)
    ctx.edits.restore()
    by_plan = MODE.apply(ctx, plan, target)
    assert by_plan.fingerprint == by_metric.fingerprint
    ctx.edits.restore()
    naee = MODE.apply(ctx, MODE.candidate("naee"), target)
    ctx.edits.restore()
    assert MODE.apply(ctx, ex.ExpertPlan("naee", ((0, 1), (0, 1))), target).fingerprint == naee.fingerprint
    ctx.edits.restore()
    merged = MODE.apply(ctx, ex.ExpertPlan("reap", ((0, 1), (0, 1)), ((0, 0, 4, 2), (0, 0, 0, 1))), target)
    assert merged.extra["merged"] == 3 and merged.fingerprint != by_plan.fingerprint
    ctx.edits.restore()


def test_global_allocation_keeps_the_total_with_a_floor_of_top_k():
    scores = torch.tensor([[9.0, 8, 7, 6], [1.0, 0, 0, 0]])
    target = MODE.make_target({"experts": 3, "allocation": "global"})
    counts = ex.allocate(scores, target, floor=[2, 2])
    assert sum(counts) == 6 and min(counts) >= 2 and counts[0] > counts[1]


@pytest.mark.parametrize("fields", [{"experts": 2}, {"per_layer": "3,2", "top_k": 1}])
def test_a_saved_pruned_moe_reloads_smaller(tmp_path, fields):
    model = build("mixtral")
    ctx = context(model)
    report = MODE.apply(ctx, MODE.candidate("reap"), MODE.make_target(fields))
    ids = windows()
    pruned, n = model(ids).logits, params(model)
    MODE.save(ctx, report, tmp_path)
    if "per_layer" in fields:
        back = loading._from_pretrained(str(tmp_path), torch.float32)  # prunerzero's loader reads the marker
    else:
        back = AutoModelForCausalLM.from_pretrained(tmp_path)  # a plain transformers checkpoint
        assert back.config.num_local_experts == 2
    assert params(back) == n and torch.allclose(back(ids).logits, pruned, atol=1e-5)


@pytest.mark.parametrize("fields,needle", [
    ({"experts": 5}, "larger than the 4 experts"),
    ({"experts": 1}, "below the 2 experts each token is routed to"),
    ({"experts": 2, "top_k": 5}, "top_k 5 is larger"),
    ({"per_layer": "2,2,2"}, "per_layer gives 3 counts"),
])
def test_bad_budgets_fail_naming_the_problem(fields, needle):
    ctx = context(build("mixtral"))
    with pytest.raises(ex.ExpertsError, match=needle):
        MODE.check(ctx, MODE.make_target(fields))


def test_a_dense_model_and_bad_fields_are_refused(tiny_llama, tiny_windows):
    ctx = tiny_context(tiny_llama, tiny_windows, stats=None)
    with pytest.raises(ex.ExpertsError, match="takes a Mixture-of-Experts model; LlamaForCausalLM"):
        MODE.check(ctx, MODE.make_target({}))
    for fields, needle in [({"merge": "zip"}, "unknown merge 'zip'"), ({"experts": 0}, "at least one expert"),
                           ({"per_layer": "4,x"}, "integers separated by commas"),
                           ({"signal": "loud"}, "unknown routing signal")]:
        with pytest.raises(ModeError, match=needle):
            MODE.make_target(fields)
