"""Scores → masks for every comparison group against plain references, targets, and metric
pruning applied in place on a tiny Llama with an exact restore."""

import numpy as np
import pytest
import torch

from prunerzero.models.adapter import ModelAdapter
from prunerzero.primitives.metric import Metric, builtin
from prunerzero.primitives.stats import collect_stats
from prunerzero.pruning.interventions import DenseSnapshot
from prunerzero.pruning.unstructured.mode import prune_with_metric
from prunerzero.pruning.unstructured.mode import prune_with_metric_sequential
from prunerzero.pruning.masks import (PatternError, check_pattern_fits, nm_mask, pack_on_device, packed, select_mask,
                                      zero_masked)
from prunerzero.pruning.report import PruneReport
from prunerzero.pruning.unstructured.target import PruneTarget


def ref_row_mask(scores: np.ndarray, sparsity: float) -> np.ndarray:
    """Per row, prune the int(in * s) lowest scores; ties go to the earlier position."""
    mask = np.zeros(scores.shape, dtype=bool)
    k = int(scores.shape[1] * sparsity)
    for i, row in enumerate(scores):
        mask[i, np.argsort(row, kind="stable")[:k]] = True
    return mask


def ref_layer_mask(scores: np.ndarray, sparsity: float) -> np.ndarray:
    flat = np.zeros(scores.size, dtype=bool)
    flat[np.argsort(scores.ravel(), kind="stable")[: int(scores.size * sparsity)]] = True
    return flat.reshape(scores.shape)


def ref_nm_mask(scores: np.ndarray, n: int, m: int) -> np.ndarray:
    mask = np.zeros(scores.shape, dtype=bool)
    for i in range(scores.shape[0]):
        for j in range(0, scores.shape[1], m):
            mask[i, j + np.argsort(scores[i, j : j + m], kind="stable")[: m - n]] = True
    return mask


def _scores(shape, ties: bool, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    if ties:  # few distinct values: the tie-break must be the reference's
        return torch.randint(0, 4, shape, generator=g).float()
    return torch.randn(shape, generator=g)


@pytest.mark.parametrize("ties", [False, True])
@pytest.mark.parametrize("sparsity", [0.0, 0.25, 0.5, 0.7, 0.99])
def test_row_mask_equals_reference_with_exact_counts(ties, sparsity):
    scores = _scores((9, 40), ties)
    mask = select_mask(scores, sparsity, group="row")
    assert mask.dtype == torch.bool and mask.shape == scores.shape
    np.testing.assert_array_equal(mask.numpy(), ref_row_mask(scores.numpy(), sparsity))
    assert (mask.sum(dim=1) == int(40 * sparsity)).all()


@pytest.mark.parametrize("ties", [False, True])
@pytest.mark.parametrize("sparsity", [0.0, 0.3, 0.5, 0.9])
def test_layer_mask_equals_reference(ties, sparsity):
    scores = _scores((9, 40), ties, seed=1)
    mask = select_mask(scores, sparsity, group="layer")
    np.testing.assert_array_equal(mask.numpy(), ref_layer_mask(scores.numpy(), sparsity))
    assert mask.sum() == int(9 * 40 * sparsity)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float16, torch.bfloat16])  # numpy's selection / topk's
@pytest.mark.parametrize("group", ["row", "layer"])
def test_masks_are_the_same_for_every_score_dtype(dtype, group):
    scores = _scores((9, 40), ties=True, seed=4)  # small integers: exact in every dtype
    mask = select_mask(scores.to(dtype), 0.5, group=group)
    np.testing.assert_array_equal(mask.numpy(), select_mask(scores, 0.5, group=group).numpy())


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64])
def test_zero_masked_writes_positive_zeros_and_leaves_the_rest(dtype):
    weight = torch.randn(6, 10, generator=torch.Generator().manual_seed(5)).to(dtype)
    dense = weight.clone()
    mask = torch.rand(6, 10, generator=torch.Generator().manual_seed(6)) < 0.5
    zero_masked(weight, mask)
    assert torch.equal(weight[~mask], dense[~mask])
    assert (weight[mask] == 0).all() and not torch.signbit(weight[mask]).any()  # +0.0, not -0.0


def test_layer_group_differs_from_row_group():
    scores = torch.rand(8, 16, generator=torch.Generator().manual_seed(2))
    scores[:4] += 1  # rows 0..3 dominate: the layer group prunes the other rows first
    layer = select_mask(scores, 0.5, group="layer")
    assert layer[4:].all() and not layer[:4].any()
    assert (select_mask(scores, 0.5, group="row").sum(dim=1) == 8).all()


@pytest.mark.parametrize("ties", [False, True])
@pytest.mark.parametrize("n, m", [(2, 4), (4, 8), (1, 4), (3, 4), (5, 16)])  # ranked up to 8 wide, selected past it
def test_nm_mask_equals_reference_and_keeps_exactly_n(ties, n, m):
    scores = _scores((7, 32), ties, seed=3)
    mask = select_mask(scores, 0.5, nm=(n, m))  # sparsity is ignored for N:M
    np.testing.assert_array_equal(mask.numpy(), ref_nm_mask(scores.numpy(), n, m))
    kept = (~mask).reshape(7, 32 // m, m).sum(dim=-1)
    assert (kept == n).all()


def test_nm_mask_keeps_the_highest_of_each_group():
    scores = torch.tensor([[4.0, 1.0, 3.0, 2.0, -1.0, -2.0, 0.0, 5.0]])
    assert nm_mask(scores, 2, 4).tolist() == [[False, True, False, True, True, True, False, False]]


@pytest.mark.parametrize("width, m", [(30, 4), (12, 8), (7, 4)])
def test_nm_pattern_not_dividing_the_width_names_it(width, m):
    with pytest.raises(PatternError, match=f"does not divide the input width {width} of layer.q"):
        select_mask(torch.randn(3, width), 0.5, nm=(m // 2, m), name="layer.q")


def test_check_pattern_fits_names_the_units():
    shapes = {"a": torch.Size([4, 64]), "b": torch.Size([4, 30]), "c": torch.Size([4, 8])}
    with pytest.raises(PatternError, match=r"2:4 .* 1 unit\(s\): b \(width 30\)"):
        check_pattern_fits(shapes, (2, 4))
    check_pattern_fits(shapes, None)
    check_pattern_fits({"a": shapes["a"], "c": shapes["c"]}, (4, 8))


@pytest.mark.parametrize("sparsity", [1.0, -0.1, 1.5, float("nan")])
def test_target_rejects_sparsity_outside_unit_interval(sparsity):
    with pytest.raises(ValueError, match=f"sparsity {sparsity} is out of range"):
        PruneTarget(sparsity=sparsity)


@pytest.mark.parametrize("pattern", ["4:2", "2:2", "0:4", "2:4:8", "half", "2-4", ""])
def test_target_rejects_bad_patterns(pattern):
    with pytest.raises(ValueError, match="unknown pattern"):
        PruneTarget(pattern=pattern)


def test_target_rejects_unknown_group_and_reports_expectations():
    with pytest.raises(ValueError, match="unknown comparison group 'column'"):
        PruneTarget(group="column")
    with pytest.raises(ValueError, match="unknown comparison group 'column'"):
        select_mask(torch.randn(2, 4), 0.5, group="column")
    assert PruneTarget(0.3).nm is None and PruneTarget(0.3).expected_sparsity == 0.3
    assert PruneTarget(pattern="2:4").nm == (2, 4) and PruneTarget(pattern="4:8").expected_sparsity == 0.5
    assert PruneTarget(pattern="1:4").expected_sparsity == 0.75


# ---------------------------------------------------------------- applied on a tiny model
@pytest.fixture
def pruned_setup(tiny_llama, tiny_windows):
    adapter = ModelAdapter(tiny_llama)
    stats = collect_stats(tiny_llama, adapter, tiny_windows, need_g=False)
    return tiny_llama, adapter, stats


def _state(model) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in model.state_dict().items()}


@pytest.mark.parametrize("name, reference", [
    ("magnitude", lambda W, X: W.abs()),
    ("wanda", lambda W, X: W.abs() * X.sqrt().reshape(1, -1)),
])
def test_prune_with_metric_matches_reference_and_restores_bit_identically(pruned_setup, name, reference):
    model, adapter, stats = pruned_setup
    units = adapter.prunable()
    dense = _state(model)
    dense_units = {u.name: u.weight.clone() for u in units}
    snapshot = DenseSnapshot(units)
    report = prune_with_metric(units, stats, builtin(name), PruneTarget(0.5))
    assert len(units) == 14 and [r["name"] for r in report.rows] == [u.name for u in units]
    for unit in units:
        W = dense_units[unit.name]
        mask = ref_row_mask(reference(W, stats.X[unit.name]).numpy(), 0.5)
        expected = torch.where(torch.from_numpy(mask), torch.zeros_like(W), W)
        assert torch.equal(unit.weight, expected), unit.name
        assert ((unit.weight == 0).sum(dim=1) == W.shape[1] // 2).all()
    assert report.sparsity == 0.5 and report.method == name
    assert (report.table()["sparsity"] == 0.5).all()
    pruned = {f"{u.name}.weight" for u in units}
    assert all(torch.equal(v, dense[k]) for k, v in model.state_dict().items() if k not in pruned)
    snapshot.restore()
    after = model.state_dict()
    assert after.keys() == dense.keys()
    assert all(torch.equal(after[k], dense[k]) for k in dense)


def test_prune_nm_on_tiny_model(pruned_setup):
    model, adapter, stats = pruned_setup
    units = adapter.prunable()
    dense_units = {u.name: u.weight.clone() for u in units}
    report = prune_with_metric(units, stats, builtin("wanda"), PruneTarget(pattern="2:4"))
    for unit in units:
        W = dense_units[unit.name]
        ref = ref_nm_mask((W.abs() * stats.X[unit.name].sqrt()).numpy(), 2, 4)
        np.testing.assert_array_equal((unit.weight == 0).numpy(), ref)
        assert ((unit.weight != 0).reshape(W.shape[0], -1, 4).sum(dim=-1) == 2).all()
    assert report.sparsity == 0.5


def test_zero_sparsity_prunes_nothing(pruned_setup):
    model, adapter, stats = pruned_setup
    dense = _state(model)
    report = prune_with_metric(adapter.prunable(), stats, builtin("magnitude"), PruneTarget(0.0))
    assert report.sparsity == 0.0
    assert all(torch.equal(v, dense[k]) for k, v in model.state_dict().items())


def test_bad_pattern_fails_before_touching_any_weight(pruned_setup):
    model, adapter, stats = pruned_setup
    dense = _state(model)
    with pytest.raises(PatternError, match="3:5 does not divide the input width of 14 unit"):
        prune_with_metric(adapter.prunable(), stats, builtin("magnitude"), PruneTarget(pattern="3:5"))
    assert all(torch.equal(v, dense[k]) for k, v in model.state_dict().items())


def test_metric_needing_uncollected_statistic_is_refused(pruned_setup):
    model, adapter, stats = pruned_setup
    with pytest.raises(ValueError, match="'gradient' needs statistic.*G.*not collected"):
        prune_with_metric(adapter.prunable(), stats, builtin("gradient"), PruneTarget(0.5))


def test_report_counts_zeros_per_unit_and_in_total():
    target = PruneTarget(0.5)
    report = PruneReport(target, "x", rows=[
        {"name": "a", "block": 0, "role": "q", "expert": None, "numel": 100, "zeros": 50},
        {"name": "b", "block": 0, "role": "k", "expert": None, "numel": 300, "zeros": 30},
    ])
    assert report.sparsity == pytest.approx(80 / 400)
    assert report.table()["sparsity"].tolist() == [0.5, 0.1]
    assert PruneReport(target, "empty").sparsity == 0.0


# ---------------------------------------------------------------- phenotype fingerprints
@pytest.mark.parametrize("numel", [1, 8, 13, 1000])
def test_device_bit_packing_equals_numpy_packbits(numel):
    flat = torch.rand(numel, generator=torch.Generator().manual_seed(numel)) > 0.5
    assert pack_on_device(flat).numpy().tobytes() == np.packbits(flat.numpy()).tobytes() == packed(flat).numpy().tobytes()


def _fingerprint(masks: dict[str, torch.Tensor]) -> str:
    report = PruneReport(PruneTarget(), "test")
    for name, mask in masks.items():
        report.add_mask(name, mask)
    return report.fingerprint


def test_fingerprint_tells_masks_apart_by_any_bit_by_shape_and_by_unit():
    mask = torch.rand(6, 16, generator=torch.Generator().manual_seed(0)) > 0.5
    flipped = mask.clone()
    flipped[5, 15] = ~flipped[5, 15]
    same = _fingerprint({"a": mask.clone()})
    assert _fingerprint({"a": mask}) == same
    assert _fingerprint({"a": flipped}) != same
    assert _fingerprint({"a": mask.reshape(16, 6)}) != same
    assert _fingerprint({"b": mask}) != same
    assert PruneReport(PruneTarget(), "sparsegpt").fingerprint == ""  # no masks recorded: no phenotype


def test_rank_equivalent_metrics_share_a_fingerprint_and_others_do_not(pruned_setup):
    model, adapter, stats = pruned_setup
    units = adapter.prunable()
    snapshot = DenseSnapshot(units)
    prints = {}
    for expression in ("abs(W)", "sqr(W)", "log(abs(W))", "mul(abs(W), sqrt(X))"):
        prints[expression] = prune_with_metric(units, stats, Metric.from_expression(expression), PruneTarget()).fingerprint
        snapshot.restore()
    assert prints["abs(W)"] == prints["sqr(W)"] == prints["log(abs(W))"]
    assert prints["mul(abs(W), sqrt(X))"] != prints["abs(W)"]


def test_sequential_pruning_fingerprints_every_block(pruned_setup, tiny_windows):
    model, adapter, stats = pruned_setup
    snapshot = DenseSnapshot(adapter.prunable())
    report = prune_with_metric_sequential(model, adapter, tiny_windows, builtin("wanda"), PruneTarget(), stats)
    snapshot.restore()
    assert report.fingerprint and report.masked_units == len(adapter.prunable())
