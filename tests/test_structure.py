"""Words for structure (heads, KV heads, channels, experts, sublayers, blocks) on tiny models of
every supported family, and the reducer from weight scores to group scores."""

import pytest
import torch

from prunerzero.models.adapter import ModelAdapter
from prunerzero.models.structure import StructureError
from prunerzero.primitives.metric import CallableMetric, resolve_metric
from prunerzero.primitives.stats import collect_stats
from prunerzero.pruning.reduce import REDUCERS, group_scores, reduce_groups

from conftest import TINY_SHAPE, TINY_FAMILIES, MOE_FAMILIES, N_EXPERTS, build, tokens

HEADS, KV, HEAD_DIM = TINY_SHAPE["num_attention_heads"], TINY_SHAPE["num_key_value_heads"], 8
LAYERS = TINY_SHAPE["num_hidden_layers"]


def structure(family):
    return ModelAdapter(build(family)).structure


@pytest.mark.parametrize("family", TINY_FAMILIES)
def test_heads_follow_the_grouped_query_layout(family):
    st = structure(family)
    heads, kv_heads = st.heads(), st.kv_heads()
    assert len(heads) == LAYERS * HEADS and len(kv_heads) == LAYERS * KV
    a = st.attentions[0]
    assert (a.n_heads, a.n_kv_heads, a.head_dim, a.group_size) == (HEADS, KV, HEAD_DIM, HEADS // KV)
    assert [a.kv_of(h) for h in range(HEADS)] == [0, 0, 1, 1]
    q_rows, o_cols = heads[3].parts  # block 0, query head 3: rows 24..32 of q, columns 24..32 of o
    assert (q_rows.unit.role, q_rows.axis, q_rows.start, q_rows.stop) == ("q", 0, 24, 32)
    assert (o_cols.unit.role, o_cols.axis, o_cols.start, o_cols.stop) == ("o", 1, 24, 32)
    kv1 = {p.unit.role: (p.axis, p.start, p.stop) for p in kv_heads[1].parts}
    assert kv1 == {"q": (0, 16, 32), "k": (0, 8, 16), "v": (0, 8, 16), "o": (1, 16, 32)}  # heads 2, 3 read KV head 1
    assert kv_heads[1].numel == 2 * (16 * 32) + 2 * (8 * 32)


@pytest.mark.parametrize("family", TINY_FAMILIES)
def test_channels_sublayers_and_blocks(family):
    model = build(family)
    st = ModelAdapter(model).structure
    assert [s.kind for b in st.blocks for s in b.sublayers] == ["attention", "mlp"] * LAYERS
    for sub in st.blocks[1].sublayers:
        assert getattr(sub.parent, sub.attr) is sub.module and sub.parent is st.blocks[1].module
    subs = st.sublayers()
    assert {p.unit.role for p in subs[0].parts} == {"q", "k", "v", "o"} and subs[0].module is st.blocks[0].sublayers[0].module
    assert {p.unit.role for p in subs[1].parts} >= {"gate", "up", "down"} and "router" not in {p.unit.role for p in subs[1].parts}
    blocks = st.block_groups()
    assert len(blocks) == LAYERS and sum(g.numel for g in blocks) == sum(u.weight.numel() for u in st.adapter.prunable())
    if st.mlps:  # dense MLPs and Qwen2-MoE's shared expert
        width = st.mlps[0].width
        groups = st.channels(width // 4)
        assert len(groups) == 4 * len(st.mlps)
        gate, up, down = groups[1].parts
        assert (gate.unit.role, gate.axis, gate.start) == ("gate", 0, width // 4)
        assert (up.unit.role, down.unit.role, down.axis, down.stop) == ("up", "down", 1, width // 2)
        with pytest.raises(StructureError, match=f"does not divide the MLP width {width}"):
            st.channels(width + 1)
    else:
        assert st.channels(4) == []


@pytest.mark.parametrize("family", MOE_FAMILIES)
def test_experts_carry_their_units_and_router_row(family):
    st = structure(family)
    experts = st.experts()
    assert len(experts) == LAYERS * N_EXPERTS and st.is_moe
    layer = st.expert_layers[0]
    assert layer.n_experts == N_EXPERTS and layer.top_k == 2
    e2 = experts[2]
    assert [p.unit.role for p in e2.parts] == ["gate", "up", "down"] and all(p.unit.expert == 2 for p in e2.parts)
    (row,) = e2.links
    assert row.unit.role == "router" and (row.start, row.stop) == (2, 3)
    assert torch.equal(row.weight, layer.router.weight[2:3])
    assert (layer.shared is not None) == (family == "qwen2_moe")


def test_dense_families_have_no_experts():
    st = structure("llama")
    assert st.experts() == [] and not st.is_moe


# ---------------------------------------------------------------- the reducer
def hand(group, scores, reducer):
    values = torch.cat([p.of(scores[p.unit.name]).reshape(-1).double() for p in group.parts])
    return {"sum": values.sum(), "mean": values.mean(), "max": values.max(), "norm": values.norm()}[reducer]


@pytest.mark.parametrize("family, kind", [("llama", k) for k in ("head", "kv_head", "channel", "sublayer", "block")]
                         + [("qwen2_moe", k) for k in ("head", "kv_head", "channel", "expert", "sublayer", "block")])
def test_reducers_equal_hand_computed_group_scores(family, kind):
    st = structure(family)
    g = torch.Generator().manual_seed(3)
    scores = {u.name: torch.randn(u.shape, generator=g) for u in st.adapter.units}
    groups = st.groups(kind, **({"width": 4} if kind == "channel" else {}))
    assert groups
    for reducer in REDUCERS:
        got = reduce_groups(groups, scores, reducer)
        want = torch.stack([hand(grp, scores, reducer) for grp in groups])
        assert torch.allclose(got, want), reducer


def test_overlapping_groups_and_per_unit_normalisation():
    st = structure("llama")
    scores = {u.name: torch.rand(u.shape, generator=torch.Generator().manual_seed(4)) for u in st.adapter.units}
    groups = st.heads() + st.kv_heads()  # kv heads overlap the heads' q rows
    got = reduce_groups(groups, scores, "sum")
    assert torch.allclose(got, torch.stack([hand(grp, scores, "sum") for grp in groups]))
    normed = reduce_groups(st.heads(), scores, "sum", normalize="max")
    unit_max = {name: s.abs().max() for name, s in scores.items()}
    want = [sum(float(p.of(scores[p.unit.name]).sum() / unit_max[p.unit.name]) for p in h.parts) for h in st.heads()]
    assert torch.allclose(normed, torch.tensor(want, dtype=torch.float64))
    with pytest.raises(ValueError, match="unknown reducer 'median'"):
        reduce_groups(groups, scores, "median")


def test_any_metric_scores_groups(tmp_path, tiny_windows):
    """A built-in, an expression and a Python file score heads, channels, experts, sublayers, blocks."""
    model = build("qwen2_moe")
    adapter = ModelAdapter(model)
    stats = collect_stats(model, adapter, tokens(), need_g=True)
    path = tmp_path / "mine.py"
    path.write_text("def metric(W, G=None, X=None):\n    return W.abs() * X.reshape(1, -1)\n")
    file_metric = resolve_metric(f"{path}:metric")
    assert isinstance(file_metric, CallableMetric)
    wanda = resolve_metric("wanda")
    st = adapter.structure
    for kind in ("head", "channel", "expert", "sublayer", "block"):
        groups = st.groups(kind, **({"width": 8} if kind == "channel" else {}))
        by_builtin = group_scores(wanda, stats, groups, "sum")
        by_expression = group_scores(resolve_metric("mul(abs(W), sqrt(X))"), stats, groups, "sum")
        by_file = group_scores(file_metric, stats, groups, "sum")
        assert torch.equal(by_builtin, by_expression)
        assert by_file.shape == (len(groups),) and torch.isfinite(by_file).all()
        assert not torch.equal(by_file, by_builtin)  # X, not sqrt(X): another ranking's numbers
        gradient = group_scores(resolve_metric("gradient"), stats, groups, "mean")
        assert (gradient >= 0).all() and gradient.max() > 0
