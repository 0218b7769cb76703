"""The structured mode: selection (MILP against brute force, greedy and uniform), slicing and
removal exact against masking, the KV cache with removed attention, saving and reloading, the
least-squares recovery, the latency table's cache, and bad input."""

import itertools
import json

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from prunerzero.models.adapter import ModelAdapter
from prunerzero.models.loading import ModelLoadError
from prunerzero.pruning.interventions import Edits
from prunerzero.pruning.structured.latency import LatencyTable, attention_options, load_or_measure
from prunerzero.pruning.modes import ModeError, get_mode
from prunerzero.pruning.reshaped import load_reshaped, save_reshaped
from prunerzero.pruning.structured.recovery import collect_grams, refit_following
from prunerzero.pruning.structured.selection import Options, SelectionError, select
from conftest import tiny_context
from prunerzero.pruning.structured.mode import apply_plan, load_structured


def random_options(seed: int, blocks: int = 4, na: int = 5, nm: int = 6) -> Options:
    rng = np.random.default_rng(seed)

    def ladder(n):  # option 0 removed (free), then increasing cost and importance
        lat = np.concatenate([np.full((blocks, 1), 0.01), np.sort(rng.uniform(0.1, 1.0, (blocks, n - 1)), 1)], 1)
        imp = np.concatenate([np.zeros((blocks, 1)), np.sort(rng.uniform(0, 5, (blocks, n - 1)), 1)], 1)
        return imp, lat
    (ai, al), (mi, ml) = ladder(na), ladder(nm)
    return Options(ai, al, mi, ml, rng.uniform(0.05, 0.1, blocks), 0.3)


def brute_force(opts: Options, budget: float) -> float:
    n = len(opts.rest)
    best = -np.inf
    for attn in itertools.product(range(opts.attn_latency.shape[1]), repeat=n):
        for mlp in itertools.product(range(opts.mlp_latency.shape[1]), repeat=n):
            removed = [a == 0 and m == 0 for a, m in zip(attn, mlp)]
            if opts.latency(list(attn), list(mlp), removed) <= budget:
                best = max(best, opts.importance(list(attn), list(mlp)))
    return best


@pytest.mark.parametrize("seed", range(3))
def test_the_milp_is_optimal_and_at_least_greedy_and_uniform(seed):
    opts = random_options(seed, blocks=3, na=3, nm=4)
    dense = opts.latency(*opts.full, [False] * 3)
    for fraction in (0.8, 0.6, 0.4):
        budget = fraction * dense
        milp = select(opts, budget, "milp")
        assert milp.latency <= budget + 1e-9 and milp.gap <= 1e-9 and milp.status == "Optimal"
        assert milp.importance == pytest.approx(brute_force(opts, budget), abs=1e-6)
        for baseline in ("greedy", "uniform"):
            try:
                other = select(opts, budget, baseline)
            except SelectionError:
                continue
            assert other.latency <= budget + 1e-9
            assert milp.importance >= other.importance - 1e-9


def test_the_milp_removes_whole_blocks_when_that_saves_their_own_cost():
    opts = random_options(7, blocks=4)
    sel = select(opts, 0.45 * opts.latency(*opts.full, [False] * 4), "milp")
    assert all(r == (a == 0 and m == 0) for r, a, m in zip(sel.removed, sel.attn, sel.mlp))


def test_an_unreachable_budget_is_named():
    opts = random_options(1)
    with pytest.raises(SelectionError, match="even with every block removed the model takes"):
        select(opts, 0.1, "milp")


# ---------------------------------------------------------------- on a tiny Llama
def fake_table(model, width: int) -> LatencyTable:
    """A latency table with costs proportional to size (no timing in unit tests)."""
    s = ModelAdapter(model).structure
    n, a0 = len(s.blocks), s.attentions[0]
    a_opts = attention_options(a0.n_kv_heads, a0.group_size)
    m_opts = list(range(s.mlps[0].width // width + 1))
    attn = [[0.001 + a * b for a, b in a_opts] for _ in range(n)]
    mlp = [[0.001 + 0.5 * j for j in m_opts] for _ in range(n)]
    both = {p: x for p in ("prefill", "decode") for x in [None]}
    return LatencyTable(a_opts, m_opts, width, 1, 16, {p: attn for p in both}, {p: mlp for p in both},
                        {p: [0.2] * n for p in both}, {p: 1.0 for p in both}, {p: 1.0 for p in both})


@pytest.fixture
def ctx(tiny_llama, tiny_windows):
    c = tiny_context(tiny_llama, tiny_windows, stats="WGX")
    c.memo[("latency", 32, 1, 256)] = fake_table(tiny_llama, 32)
    return c


def masked_logits(model, plan, ids):
    """The dense model with the plan's heads and channels zeroed at the projection reading them."""
    s = ModelAdapter(model).structure
    with torch.no_grad(), torch.inference_mode(False):
        edits = Edits()
        for block, step in zip(s.blocks, plan):
            attn, mlp = block.attention, block.mlp
            kept = set() if step["heads"] is None or step["removed"] else {h for hs in step["heads"] for h in hs}
            for h in set(range(attn.n_heads)) - kept:
                edits.write(attn.o.weight[:, h * attn.head_dim:(h + 1) * attn.head_dim], 0)
            keep = set() if step["channels"] is None or step["removed"] else set(step["channels"])
            for c in set(range(mlp.width)) - keep:
                edits.write(mlp.down.weight[:, c], 0)
        out = model(ids).logits
        edits.restore()
    return out


@pytest.mark.parametrize("candidate", ["wanda", "taylor"])
def test_the_mode_slices_a_smaller_model_equal_to_masking_and_restores(ctx, candidate):
    model, ids = ctx.model, ctx.calibration
    mode = get_mode("structured")
    with torch.no_grad():
        dense = model(ids).logits
    params = sum(p.numel() for p in model.parameters())
    report = mode.apply(ctx, mode.candidate(candidate), mode.make_target({"latency": 0.5, "width": 32}))
    plan = report.extra["plan"]
    assert report.extra["predicted_ratio"] <= 0.5 and report.extra["solver_gap"] <= 1e-9
    assert sum(p.numel() for p in model.parameters()) < params and 0 < report.sparsity < 1
    with torch.no_grad():
        pruned = model(ids).logits
    ctx.edits.restore()
    torch.testing.assert_close(pruned, masked_logits(model, plan, ids), atol=1e-5, rtol=1e-5)
    with torch.no_grad():
        assert torch.equal(model(ids).logits, dense)


def plan_removing(model, attention_blocks=(), mlp_blocks=(), blocks=(), heads=None):
    s = ModelAdapter(model).structure
    a = s.attentions[0]
    full = [list(range(k * a.group_size, (k + 1) * a.group_size)) for k in range(a.n_kv_heads)]
    return [{"heads": None if b in attention_blocks else (heads if heads and b not in blocks else full),
             "channels": None if b in mlp_blocks else list(range(s.mlps[0].width)), "removed": b in blocks}
            for b in range(len(s.blocks))]


@pytest.mark.parametrize("removal", [dict(attention_blocks=(0,)), dict(blocks=(0,)), dict(heads=[[0], []])])
def test_generation_with_the_kv_cache_matches_recomputing_after_removal(tiny_llama, removal):
    plan = plan_removing(tiny_llama, **removal)
    apply_plan(Edits(), ModelAdapter(tiny_llama), plan)
    prompt = torch.tensor([[1, 5, 9, 3]])
    cached = tiny_llama.generate(prompt, max_new_tokens=6, do_sample=False, use_cache=True)
    ids = prompt
    with torch.no_grad():
        for _ in range(6):  # greedy without any cache: the whole sequence every step
            ids = torch.cat([ids, tiny_llama(ids, use_cache=False).logits[:, -1:].argmax(-1)], 1)
    assert cached.shape[1] > prompt.shape[1] + 1 and torch.equal(cached, ids[:, :cached.shape[1]])  # (generate stops at EOS)


def test_a_saved_structured_model_reloads_identical(ctx, tmp_path):
    mode = get_mode("structured")
    report = mode.apply(ctx, mode.candidate("wanda"), mode.make_target({"latency": 0.4, "width": 32}))
    with torch.no_grad():
        pruned = ctx.model(ctx.calibration).logits
    mode.save(ctx, report, tmp_path)
    back = load_structured(tmp_path, torch.float32).eval()
    with torch.no_grad():
        assert torch.equal(back(ctx.calibration).logits, pruned)
    (tmp_path / "prunerzero_structure.json").write_text("{")
    with pytest.raises(ValueError, match="prunerzero_structure.json is damaged"):
        load_structured(tmp_path, torch.float32)


def test_a_saved_structured_model_loads_at_its_pruned_shapes_without_the_dense_weights(ctx, tmp_path):
    structure = ctx.adapter.structure
    plan = [{"removed": False, "channels": list(range(0, b.mlp.width, 2)),  # every MLP sliced to half
             "heads": [[h for h in range(b.attention.n_heads) if b.attention.kv_of(h) == kv]
                       for kv in range(b.attention.n_kv_heads)]} for b in structure.blocks]
    apply_plan(ctx.edits, ctx.adapter, plan)
    with torch.no_grad():
        pruned = ctx.model(ctx.calibration).logits
    save_reshaped(ctx.model, ctx.model.config, tmp_path, "prunerzero_structure.json", "structured",
                  {"format": 1, "plan": plan})
    ctx.edits.restore()
    seen = []

    def rebuild(model, plan, where):  # the mode's own rebuild, watched: it reshapes an empty model
        seen.append(all(p.is_meta for p in model.parameters()))
        apply_plan(Edits(), ModelAdapter(model), plan)

    back = load_reshaped(tmp_path, torch.float32, "prunerzero_structure.json", lambda doc: doc["plan"], rebuild)
    assert seen == [True]  # no dense weight was ever allocated
    assert not any(t.is_meta for t in [*back.parameters(), *back.buffers()])
    assert back.model.layers[0].mlp.up_proj.weight.shape[0] == structure.mlps[0].width // 2
    with torch.no_grad():
        assert torch.equal(back.eval()(ctx.calibration).logits, pruned)
    half = load_reshaped(tmp_path, torch.bfloat16, "prunerzero_structure.json", lambda doc: doc["plan"], rebuild)
    assert {p.dtype for p in half.parameters()} == {torch.bfloat16}  # assigned in the asked dtype, not the file's
    assert half.lm_head.weight is half.model.embed_tokens.weight or not half.config.tie_word_embeddings


def test_a_saved_model_missing_a_tensor_is_named(ctx, tmp_path):
    mode = get_mode("structured")
    report = mode.apply(ctx, mode.candidate("wanda"), mode.make_target({"latency": 0.4, "width": 32}))
    mode.save(ctx, report, tmp_path)
    tensors = load_file(tmp_path / "model.safetensors")
    gone = sorted(k for k in tensors if "layers." in k)[0]
    save_file({k: v for k, v in tensors.items() if k != gone}, tmp_path / "model.safetensors")
    with pytest.raises(ModelLoadError, match=f"missing tensor.*{gone}"):
        load_structured(tmp_path, torch.float32)


def test_least_squares_recovery_reduces_the_reconstruction_error(ctx):
    model, s = ctx.model, ctx.structure
    grams = collect_grams(ctx)
    plan = plan_removing(model, heads=[[0], [2]])
    for step in plan:
        step["channels"] = list(range(0, 128, 2))
    outputs = {}

    def record(tag):
        hooks = [model.get_submodule(u.name).register_forward_hook(
            lambda m, a, out, name=u.name: outputs.__setitem__((tag, name), out.clone()))
            for u in [b.attention.o for b in s.blocks] + [b.mlp.down for b in s.blocks]]
        with torch.no_grad():
            model(ctx.calibration)
        for h in hooks:
            h.remove()
    record("dense")
    for recover in (False, True):
        edits = Edits()
        apply_plan(edits, ctx.adapter, plan)
        if recover:
            refit_following(edits, s, plan, grams)
        record(recover)
        edits.restore()
    for name in {n for _, n in outputs}:
        plain = (outputs[(False, name)] - outputs[("dense", name)]).norm()
        refit = (outputs[(True, name)] - outputs[("dense", name)]).norm()
        if name.endswith("o_proj") and name.startswith("model.layers.0"):
            assert refit < plain, name  # block 0 sees the dense inputs the Gram was taken on
        assert torch.isfinite(refit)


@pytest.mark.parametrize("fields, needle", [
    ({"latency": 0.0}, r"latency budget 0.0 must be a fraction .* in \(0, 1\)"),
    ({"latency": 1.0}, r"latency budget 1.0 must be"),
    ({"solver": "cplex"}, "unknown solver 'cplex'"),
    ({"phase": "train"}, "unknown latency phase 'train'"),
    ({"recovery": "lora"}, "unknown recovery 'lora'"),
])
def test_bad_targets_are_named(fields, needle):
    with pytest.raises(ModeError, match=needle):
        get_mode("structured").make_target(fields)


def test_a_width_that_does_not_divide_the_mlp_is_named(ctx):
    with pytest.raises(ValueError, match="channel group width 48 does not divide the MLP width 128"):
        get_mode("structured").check(ctx, get_mode("structured").make_target({"width": 48}))


def test_the_latency_table_is_measured_cached_and_a_damaged_cache_recomputed(tiny_llama, tmp_path):
    adapter = ModelAdapter(tiny_llama)
    logs = []
    table = load_or_measure(tiny_llama, adapter, 64, 1, 8, log=logs.append, directory=tmp_path, repeats=1)
    assert table.attn_options == [(0, 0), (1, 1), (1, 2), (2, 1), (2, 2)] and table.mlp_options == [0, 1, 2]
    for phase in ("prefill", "decode"):
        assert np.asarray(table.attn[phase]).shape == (2, 5) and np.asarray(table.mlp[phase]).shape == (2, 3)
        assert table.dense[phase] > 0 and min(map(min, table.attn[phase])) > 0
    (path,) = tmp_path.glob("*.json")
    assert load_or_measure(tiny_llama, adapter, 64, 1, 8, directory=tmp_path).to_data() == table.to_data()
    doc = json.loads(path.read_text())
    doc["body"]["overhead"]["prefill"] = 99.0
    path.write_text(json.dumps(doc))
    again = load_or_measure(tiny_llama, adapter, 64, 1, 8, log=logs.append, directory=tmp_path, repeats=1)
    assert again.overhead["prefill"] != 99.0 and any("checksum mismatch" in m for m in logs)
    assert len(list(tmp_path.glob("*.corrupt-*"))) == 1


def test_a_timing_spike_never_makes_a_smaller_option_dearer_than_a_larger(tiny_llama):
    table = fake_table(tiny_llama, 32)
    table.mlp["prefill"][0][2] = 9.0  # a moment of something else running
    table.attn["prefill"][1][1] = 9.0  # (1 KV head, 1 query head) above (1, 2), (2, 1) and (2, 2)
    opts = table.options("prefill")
    assert np.all(np.diff(opts.mlp_latency, axis=1) >= 0)
    assert opts.mlp_latency[0, 2] == table.mlp["prefill"][0][3]
    cheapest_above = min(table.attn["prefill"][1][table.attn_options.index(o)] for o in ((1, 2), (2, 1), (2, 2)))
    assert opts.attn_latency[1, 1] == cheapest_above
    assert opts.attn_latency[1, 0] == table.attn["prefill"][1][0]  # the removed option keeps its own cost


def test_a_model_with_a_removed_block_is_still_a_model_prunerzero_can_evaluate_and_prune(tiny_llama):
    dense_units = len(ModelAdapter(tiny_llama).prunable())
    apply_plan(Edits(), ModelAdapter(tiny_llama), plan_removing(tiny_llama, blocks=(0,), attention_blocks=(1,)))
    adapter = ModelAdapter(tiny_llama)  # the removed block has no parameters: passed through, not refused
    assert len(adapter.prunable()) == dense_units - 7 - 4
    blocks = adapter.structure.blocks
    assert blocks[0].attention is None and blocks[0].mlp is None and blocks[1].attention is None
