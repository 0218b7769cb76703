"""ModelAdapter on tiny random-init models of every supported family."""

from collections import Counter
from types import SimpleNamespace

import pytest
import torch
from torch import nn
from transformers import GPT2Config, GPT2LMHeadModel

from prunerzero.models.adapter import ModelAdapter, UnsupportedModelError, expert_tap_names
from prunerzero.models.units import DEFAULT_PRUNED_ROLES, ROLES
from conftest import MOE_FAMILIES, N_EXPERTS, TINY_FAMILIES, TINY_SHAPE, VOCAB, build, tokens

ATTN = dict(q=1, k=1, v=1, o=1)
MLP = Counter(**ATTN, gate=1, up=1, down=1)
MOE = Counter(**ATTN, gate=N_EXPERTS, up=N_EXPERTS, down=N_EXPERTS, router=1)
ROLES_PER_BLOCK = {  # family (conftest.TINY_FAMILIES) -> the roles the adapter finds in each block
    "llama": MLP, "mistral": MLP, "qwen2": MLP, "qwen3": MLP, "gemma3": MLP, "mixtral": MOE, "olmoe": MOE,
    "qwen2_moe": MOE + Counter(gate=1, up=1, down=1, shared_gate=1),  # + the shared expert and its gate
}
FAMILIES = tuple(TINY_FAMILIES)
COMMON = TINY_SHAPE


def experts_names(adapter) -> list[str]:
    """Names of the fused-experts modules, read back from the expert taps ("...experts[e].in")."""
    return sorted({unit.tap.rpartition("[")[0] for unit in adapter.units if unit.expert is not None})


def expert_units(adapter, experts_name, e):
    """gate, up, down units of expert e of one fused-experts module."""
    units = {u.role: u for u in adapter.units if u.expert == e and u.name.startswith(experts_name + ".")}
    return units["gate"], units["up"], units["down"]


def hook_count(model) -> int:
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules())


@pytest.mark.parametrize("family", FAMILIES)
def test_roles_per_block_and_default_pruned_set(family):
    adapter = ModelAdapter(build(family))
    expected = ROLES_PER_BLOCK[family]
    assert len(adapter.blocks) == COMMON["num_hidden_layers"]
    for block in range(len(adapter.blocks)):
        assert Counter(u.role for u in adapter.units if u.block == block) == expected
        pruned = adapter.block_units(block)
        pruned_roles = {role: n for role, n in expected.items() if role in DEFAULT_PRUNED_ROLES}
        assert Counter(u.role for u in pruned) == Counter(pruned_roles)
    assert all(u.role not in ("router", "shared_gate") for u in adapter.prunable())
    assert adapter.prunable(ROLES) == adapter.units
    assert len({u.name for u in adapter.units}) == len(adapter.units)


@pytest.mark.parametrize("family", FAMILIES)
def test_shapes_match_parameters_and_taps_exist(family):
    model = build(family)
    adapter = ModelAdapter(model)
    tap_names = {name for tap in adapter.taps() for name in tap.names}
    for unit in adapter.units:
        assert unit.tap in tap_names
        if unit.expert is None:
            weight = model.get_submodule(unit.name).weight
            assert unit.param is weight and unit.shape == weight.shape
            assert unit.tap == unit.name
        else:
            experts = model.get_submodule(unit.tap.rpartition("[")[0])
            _, hidden, inter = experts.down_proj.shape
            if unit.role == "down":
                assert unit.param is experts.down_proj and tuple(unit.shape) == (hidden, inter)
            else:
                assert unit.param is experts.gate_up_proj and tuple(unit.shape) == (inter, hidden)
    for name in experts_names(adapter):
        per_expert = Counter(u.expert for u in adapter.units if u.name.startswith(name + "."))
        assert per_expert == Counter({e: 3 for e in range(N_EXPERTS)})
    assert len(experts_names(adapter)) == (COMMON["num_hidden_layers"] if family in MOE_FAMILIES else 0)


@pytest.mark.parametrize("family", FAMILIES)
def test_unit_weight_is_a_view_into_the_model(family):
    model = build(family)
    adapter = ModelAdapter(model)
    for role in sorted({u.role for u in adapter.units}):
        unit = next(u for u in adapter.units if u.role == role)
        zeros_before = sum(int((p == 0).sum()) for p in model.parameters())
        unit.weight.zero_()
        if unit.expert is None:
            written = model.get_submodule(unit.name).weight
        else:
            inter = unit.param.shape[1] // 2  # gate_up_proj rows are [gate; up]
            rows = {"gate": slice(0, inter), "up": slice(inter, None), "down": slice(None)}[role]
            written = unit.param[unit.expert, rows]
        assert bool((written == 0).all()), role
        assert sum(int((p == 0).sum()) for p in model.parameters()) == zeros_before + unit.weight.numel()


@pytest.mark.parametrize("family", FAMILIES)
def test_capture_delivers_each_linear_input(family):
    model = build(family)
    adapter = ModelAdapter(model)
    reference = {}

    def record(name):
        def hook(module, args, output):
            reference[name] = args[0].reshape(-1, args[0].shape[-1]).clone()

        return hook

    own = [model.get_submodule(u.name).register_forward_hook(record(u.name)) for u in adapter.units if u.expert is None]
    captured = {}
    with adapter.capture(lambda name, rows: captured.setdefault(name, []).append(rows)):
        model(tokens())
    for handle in own:
        handle.remove()
    for unit in adapter.units:
        if unit.expert is None:
            (rows,) = captured[unit.tap]
            torch.testing.assert_close(rows, reference[unit.name], rtol=0, atol=0)
        for rows in captured.get(unit.tap, []):
            assert rows.dim() == 2 and rows.shape[1] == unit.shape[1]
            assert not rows.requires_grad


@pytest.mark.parametrize("family", MOE_FAMILIES)
def test_capture_expert_rows_match_routing_and_reconstruct_the_output(family):
    model = build(family)
    adapter = ModelAdapter(model)
    calls = {}

    def record(name):
        def hook(module, args, output):
            calls[name] = (args, output)

        return hook

    for name in experts_names(adapter):
        model.get_submodule(name).register_forward_hook(record(name))
    captured = {}
    with adapter.capture(lambda name, rows: captured.setdefault(name, []).append(rows)):
        model(tokens())
    for name, ((hidden, top_k_index, top_k_weights), output) in calls.items():
        act = model.get_submodule(name).act_fn
        rebuilt = torch.zeros_like(output)
        for e in range(N_EXPERTS):
            routed = (top_k_index == e).any(dim=-1)
            tap_in, tap_mid = expert_tap_names(name, e)
            if not routed.any():
                assert tap_in not in captured and tap_mid not in captured
                continue
            gate, up, down = expert_units(adapter, name, e)
            (x,), (mid,) = captured[tap_in], captured[tap_mid]
            torch.testing.assert_close(x, hidden[routed])
            torch.testing.assert_close(mid, act(x @ gate.weight.T) * (x @ up.weight.T))
            weight = (top_k_weights * (top_k_index == e)).sum(dim=-1)[routed, None]
            rebuilt[routed] += weight * (mid @ down.weight.T)
        torch.testing.assert_close(rebuilt, output, rtol=1e-4, atol=1e-6)


def test_expert_without_tokens_yields_nothing_and_kwargs_calls_are_seen():
    model = build("mixtral")
    adapter = ModelAdapter(model)
    name = experts_names(adapter)[0]
    experts = model.get_submodule(name)
    hidden = torch.randn(5, COMMON["hidden_size"])
    top_k_index = torch.tensor([[0, 1], [1, 0], [0, 2], [2, 1], [0, 1]])  # expert 3 gets no token
    captured = {}
    with adapter.capture(lambda tap, rows: captured.setdefault(tap, rows), blocks=[0]):
        experts(hidden_states=hidden, top_k_index=top_k_index, top_k_weights=torch.full((5, 2), 0.5))
    assert set(captured) == {tap for e in range(3) for tap in expert_tap_names(name, e)}
    torch.testing.assert_close(captured[expert_tap_names(name, 2)[0]], hidden[[2, 3]])


@pytest.mark.parametrize("family", ["llama", "qwen2_moe"])
def test_hooks_are_removed_after_capture_and_on_error(family):
    model = build(family)
    adapter = ModelAdapter(model)
    before = hook_count(model)
    with adapter.capture(lambda name, rows: None):
        assert hook_count(model) == before + len(adapter.taps())
    assert hook_count(model) == before
    with pytest.raises(RuntimeError, match="boom"):
        with adapter.capture(lambda name, rows: None, blocks=[1]):
            assert hook_count(model) == before + len(adapter.taps([1]))
            raise RuntimeError("boom")
    assert hook_count(model) == before


def test_capture_limited_to_blocks():
    model = build("llama")
    adapter = ModelAdapter(model)
    seen = []
    with adapter.capture(lambda name, rows: seen.append(name), blocks=[1]):
        model(tokens())
    assert sorted(seen) == sorted(u.tap for u in adapter.units if u.block == 1)


def test_unit_grad_is_the_matching_gradient_slice():
    model = build("olmoe")
    adapter = ModelAdapter(model)
    gate, up, down = expert_units(adapter, experts_names(adapter)[0], 1)
    assert gate.grad is None
    model(tokens(), labels=tokens()).loss.backward()
    inter = gate.param.shape[1] // 2
    torch.testing.assert_close(gate.grad, gate.param.grad[1, :inter], rtol=0, atol=0)
    torch.testing.assert_close(up.grad, up.param.grad[1, inter:], rtol=0, atol=0)
    torch.testing.assert_close(down.grad, down.param.grad[1], rtol=0, atol=0)
    q = adapter.units[0]
    assert q.grad is q.param.grad


class _Blocks(nn.Module):
    """A model with a config and a ModuleList of blocks made of `make()`."""

    def __init__(self, make, n=2):
        super().__init__()
        self.config = SimpleNamespace(num_hidden_layers=n)
        self.layers = nn.ModuleList(make() for _ in range(n))


def _transposed_mixtral():
    model = build("mixtral")
    model.model.layers[1].mlp.experts.is_transposed = True
    return model


@pytest.mark.parametrize(
    ("make_model", "expected"),
    [
        (lambda: nn.Linear(4, 4), ["Linear", "num_hidden_layers"]),
        (lambda: GPT2LMHeadModel(GPT2Config(vocab_size=VOCAB, n_embd=32, n_layer=2, n_head=2, n_positions=16)),
         ["GPT2LMHeadModel", "transformer.h.0.attn.c_attn", "Conv1D"]),
        (lambda: _Blocks(lambda: nn.LayerNorm(4)), ["_Blocks", "layers.0", "no nn.Linear"]),
        (lambda: _Blocks(lambda: nn.Embedding(4, 4)), ["_Blocks", "layers.0.weight", "Embedding"]),
        (_transposed_mixtral, ["MixtralForCausalLM", "model.layers.1.mlp.experts", "is_transposed"]),
    ],
)
def test_unsupported_models_are_refused_with_a_clear_message(make_model, expected):
    model = make_model()
    with pytest.raises(UnsupportedModelError) as error:
        ModelAdapter(model)
    for text in expected:
        assert text in str(error.value)


def test_no_modulelist_of_num_hidden_layers_is_refused():
    model = _Blocks(lambda: nn.Linear(4, 4))
    model.config.num_hidden_layers = 3
    with pytest.raises(UnsupportedModelError, match=r"_Blocks: no nn.ModuleList of 3 decoder blocks"):
        ModelAdapter(model)


def test_bad_roles_and_blocks_are_rejected():
    adapter = ModelAdapter(build("llama"))
    with pytest.raises(ValueError, match="unknown unit roles \\['bogus'\\]"):
        adapter.prunable({"q", "bogus"})
    with pytest.raises(IndexError, match="blocks \\[5\\] out of range"):
        adapter.block_units(5)
    with pytest.raises(IndexError, match="blocks \\[-1\\]"):
        adapter.taps([-1, 0])
