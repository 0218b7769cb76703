"""Calibration statistics on a tiny Llama against references computed by hand: X from our own
hooks, G from per-window autograd.grad."""

import json
import random

import pytest
import torch

from prunerzero.core.integrity import CorruptCache
from prunerzero.models.adapter import ModelAdapter
from prunerzero.primitives.stats import (
    ActivationAccumulator, LayerStats, collect_stats, load_or_collect, x_for_units,
)


def reference_x(model, units, windows) -> dict[str, torch.Tensor]:
    """Mean over tokens of x² of each unit's input, from forward pre-hooks on its Linear."""
    sums, counts, handles = {}, {}, []
    for unit in units:
        def hook(module, args, name=unit.name):
            x = args[0].reshape(-1, args[0].shape[-1]).double()
            sums[name] = sums.get(name, 0) + (x**2).sum(dim=0)
            counts[name] = counts.get(name, 0) + x.shape[0]
        handles.append(model.get_submodule(unit.name).register_forward_pre_hook(hook))
    with torch.no_grad():
        for window in windows:  # one at a time: batching must not matter
            model(window[None])
    for h in handles:
        h.remove()
    return {name: (sums[name] / counts[name]).float() for name in sums}


def reference_g(model, units, windows) -> dict[str, torch.Tensor]:
    """√Σ_s g_s² with one torch.autograd.grad per window."""
    params = [u.param for u in units]
    for p in params:
        p.requires_grad_(True)
    total = [torch.zeros_like(p, dtype=torch.float64) for p in params]
    for window in windows:
        ids = window[None]
        grads = torch.autograd.grad(model(ids, labels=ids).loss, params)
        for t, g in zip(total, grads):
            t += g.double() ** 2
    for p in params:
        p.requires_grad_(False)
    return {u.name: t.sqrt().float() for u, t in zip(units, total)}


def _assert_model_clean(model, flag: bool) -> None:
    for name, p in model.named_parameters():
        assert p.requires_grad is flag, f"{name}.requires_grad is {p.requires_grad}"
        assert p.grad is None, f"{name} kept a .grad"


def test_x_is_the_mean_square_of_each_units_input(tiny_llama, tiny_windows):
    adapter = ModelAdapter(tiny_llama)
    units = adapter.prunable()
    stats = collect_stats(tiny_llama, adapter, tiny_windows, need_g=False, batch_size=3)
    expected = reference_x(tiny_llama, units, tiny_windows)
    assert stats.X.keys() == {u.name for u in units} and stats.G == {}
    for unit in units:
        assert stats.X[unit.name].dtype == torch.float32 and stats.X[unit.name].shape == (unit.shape[1],)
        torch.testing.assert_close(stats.X[unit.name], expected[unit.name], rtol=1e-5, atol=0)
    # units sharing an input share X: q, k, v see the same normalised hidden states
    block0 = {u.role: u.name for u in adapter.block_units(0)}
    assert torch.equal(stats.X[block0["q"]], stats.X[block0["v"]])
    assert not torch.allclose(stats.X[block0["q"]], stats.X[block0["o"]])
    assert stats.meta["windows"] == 4 and stats.meta["seq_len"] == 16 and stats.meta["G"] is False
    assert not stats.has("G") and stats.has("X") and stats.has("W")


def test_g_is_root_sum_of_per_window_squared_gradients(tiny_llama, tiny_windows):
    adapter = ModelAdapter(tiny_llama)
    units = adapter.prunable()
    stats = collect_stats(tiny_llama, adapter, tiny_windows, need_g=True)
    _assert_model_clean(tiny_llama, False)
    assert not tiny_llama.training
    expected = reference_g(tiny_llama, units, tiny_windows)
    for unit in units:
        G = stats.G[unit.name]
        assert G.dtype == torch.float32 and G.shape == unit.shape and (G > 0).any()
        torch.testing.assert_close(G, expected[unit.name], rtol=1e-4, atol=1e-10)
    without_g = collect_stats(tiny_llama, adapter, tiny_windows, need_g=False)
    for unit in units:  # the gradient pass observes the same activations
        torch.testing.assert_close(stats.X[unit.name], without_g.X[unit.name], rtol=1e-5, atol=0)
    assert stats.meta["G"] is True and stats.has("G")


def test_trainable_model_gets_no_stray_gradients_and_keeps_its_flags(tiny_llama, tiny_windows):
    adapter = ModelAdapter(tiny_llama)
    frozen = collect_stats(tiny_llama, adapter, tiny_windows[:2], need_g=True)
    tiny_llama.requires_grad_(True).train()
    unit = adapter.prunable()[0]
    unit.param.grad = torch.ones_like(unit.param)  # stale: must not leak into G
    trainable = collect_stats(tiny_llama, adapter, tiny_windows[:2], need_g=True)
    _assert_model_clean(tiny_llama, True)  # no .grad on embeddings, norms or head either
    assert tiny_llama.training
    for name, g in frozen.G.items():
        torch.testing.assert_close(trainable.G[name], g, rtol=1e-5, atol=1e-12)


def test_accumulator_and_units_without_tokens():
    acc = ActivationAccumulator()
    acc("a", torch.tensor([[1.0, 2.0], [3.0, 0.0]]))
    acc("a", torch.tensor([[1.0, 1.0]]))
    torch.testing.assert_close(acc.mean("a"), torch.tensor([11 / 3, 5 / 3]))
    unit = type("U", (), {"name": "u", "tap": "never", "shape": (3, 2), "weight": torch.zeros(3, 2)})()
    assert torch.equal(x_for_units([unit], acc)["u"], torch.zeros(2))


def _stats() -> LayerStats:
    g = torch.Generator().manual_seed(0)
    return LayerStats(
        X={"m.q": torch.rand(8, generator=g), "m.experts[1].down": torch.rand(4, generator=g)},
        G={"m.q": torch.rand(3, 8, generator=g), "m.experts[1].down": torch.rand(2, 4, generator=g)},
        meta={"windows": 4, "G": True, "model": "tiny"},
    )


def test_layer_stats_save_load_round_trip(tmp_path):
    stats = _stats()
    stats.save(tmp_path / "s")
    loaded = LayerStats.load(tmp_path / "s")
    assert {k: v for k, v in loaded.meta.items() if k != "sha256"} == stats.meta and len(loaded.meta["sha256"]) == 64
    for kind in ("X", "G"):
        got, want = getattr(loaded, kind), getattr(stats, kind)
        assert got.keys() == want.keys()
        assert all(torch.equal(got[k], want[k]) for k in want)
    assert not list((tmp_path / "s").glob("*.tmp"))


def test_layer_stats_for_unit_gives_only_what_is_needed():
    stats = _stats()
    assert stats.for_unit("m.q", {"W"}) == (None, None)
    G, X = stats.for_unit("m.q", {"W", "G", "X"})
    assert G is stats.G["m.q"] and X is stats.X["m.q"]
    half = stats.to("cpu", torch.float16)
    assert half.X["m.q"].dtype == torch.float16 and stats.X["m.q"].dtype == torch.float32


def test_load_or_collect_uses_the_cache_and_recomputes_when_g_is_missing(tiny_llama, tiny_windows, tmp_path):
    adapter = ModelAdapter(tiny_llama)
    logs = []
    first = load_or_collect(tmp_path, tiny_llama, adapter, tiny_windows, False, {"key": "k"}, logs.append)
    again = load_or_collect(tmp_path, tiny_llama, adapter, tiny_windows, False, {"key": "k"}, logs.append)
    assert "cached" in logs[-1] and again.meta["key"] == "k"
    assert all(torch.equal(again.X[k], first.X[k]) for k in first.X)
    with_g = load_or_collect(tmp_path, tiny_llama, adapter, tiny_windows, True, {"key": "k"}, logs.append)
    assert "with gradients" in logs[-2] and with_g.has("G")
    assert LayerStats.load(tmp_path).has("G")


def _damage_data(path):
    data = bytearray(path.read_bytes())
    rng = random.Random(0)
    for i in rng.sample(range(len(data) - 400, len(data)), 64):  # bytes of the tensors, not the header
        data[i] = rng.randrange(256)
    path.write_bytes(bytes(data))


@pytest.mark.parametrize("damage, why", [
    (_damage_data, "checksum mismatch"),
    (lambda p: p.write_bytes(b"\xff" * 8 + p.read_bytes()[8:]), "checksum mismatch"),
    (lambda p: p.write_bytes(p.read_bytes()[: len(p.read_bytes()) // 2]), "checksum mismatch"),
])
def test_a_damaged_statistics_cache_is_named_set_aside_and_recomputed(tiny_llama, tiny_windows, tmp_path, damage, why):
    adapter = ModelAdapter(tiny_llama)
    cache = tmp_path / "stats"
    first = load_or_collect(cache, tiny_llama, adapter, tiny_windows, True, {}, lambda m: None)
    damage(cache / "stats.safetensors")
    with pytest.raises(CorruptCache, match=why):
        LayerStats.load(cache)
    logs = []
    again = load_or_collect(cache, tiny_llama, adapter, tiny_windows, True, {}, logs.append)
    assert any(str(cache) in m and why in m and "recomputing" in m for m in logs)
    assert [p.name.startswith("stats.corrupt-") for p in tmp_path.iterdir()].count(True) == 1
    assert all(torch.equal(again.G[k], first.G[k]) for k in first.G)
    load_or_collect(cache, tiny_llama, adapter, tiny_windows, True, {}, logs.append)
    assert "cached" in logs[-1]  # the recomputed file verifies


def test_non_finite_or_missing_statistics_are_corrupt_even_with_a_good_checksum(tmp_path, tiny_llama):
    bad = _stats()
    bad.G["m.q"][0, 0] = float("inf")
    bad.save(tmp_path / "inf")
    with pytest.raises(CorruptCache, match="non-finite values"):
        LayerStats.load(tmp_path / "inf")
    _stats().save(tmp_path / "other")
    with pytest.raises(CorruptCache, match="no statistics for"):
        LayerStats.load(tmp_path / "other", ModelAdapter(tiny_llama).prunable())


def test_a_cache_written_before_checksums_is_verified_then_checksummed(tmp_path):
    _stats().save(tmp_path / "old")
    meta = json.loads((tmp_path / "old" / "meta.json").read_text())
    del meta["sha256"]
    (tmp_path / "old" / "meta.json").write_text(json.dumps(meta))
    assert LayerStats.load(tmp_path / "old").X.keys() == _stats().X.keys()
    assert "sha256" in json.loads((tmp_path / "old" / "meta.json").read_text())
