"""The mask selection (`pruning.masks._lowest`, the native kernel on CPU) against its definition —
per row, the k lowest by a stable argsort, ties to the leftmost — and against the reference path
it replaced (numpy's introselect + the tie pass), bit for bit: on real smollm2-135m scores and on
adversarial ones (ties, zeros, constant rows, ±inf, ±0, NaN, every k at the edges, tiny shapes,
float16 / bfloat16 / float64, the layer group, N:M)."""

import shutil

import numpy as np
import pytest
import torch

from prunerzero.pruning import masks
from prunerzero.core.protocol import Protocol
from prunerzero.fitness.evaluator import EvalSpec, Evaluator
from prunerzero.pruning import select_native
from prunerzero.pruning.masks import lowest_reference, native_lowest, select_mask
from prunerzero.pruning.reduce import unit_scores
from prunerzero.primitives.metric import resolve_metric


def stable_lowest(scores: torch.Tensor, k: int) -> np.ndarray:
    """The definition: per row, the first k places of a stable ascending argsort (NaN last)."""
    x = scores.detach().double().numpy()  # exact for every float dtype; order unchanged
    order = np.argsort(x, axis=1, kind="stable")[:, :k]
    mask = np.zeros(x.shape, dtype=bool)
    np.put_along_axis(mask, order, True, axis=1)
    return mask


def check(scores: torch.Tensor, k: int, native_expected: bool = True) -> None:
    got = masks._lowest(scores, k)
    assert got.dtype == torch.bool and got.shape == scores.shape
    np.testing.assert_array_equal(got.numpy(), lowest_reference(scores, k).numpy())
    if not torch.isnan(scores).any():
        np.testing.assert_array_equal(got.numpy(), stable_lowest(scores, k))
    kernels = select_native._native_kernels()
    if native_expected and kernels is not None and 1 <= k <= scores.shape[1]:
        if scores.shape[1] >= select_native.NATIVE_MIN_WIDTH:
            assert native_lowest(scores, k) is not None  # the kernel ran, not the fallback
        else:  # narrow rows take the reference path; the kernel must still be right on them
            x = scores.detach().double() if scores.dtype == torch.float64 else scores.detach().float()
            x = x.contiguous()
            out = torch.empty(x.shape, dtype=torch.bool)
            fn = kernels["f64" if x.dtype == torch.float64 else "f32"]
            assert fn(x.data_ptr(), x.shape[0], x.shape[1], k, out.data_ptr(), torch.get_num_threads()) == 0
            np.testing.assert_array_equal(out.numpy(), got.numpy())


def edge_ks(width: int) -> list[int]:
    return sorted({0, 1, 2, width // 3, width // 2, width - 1, width} & set(range(width + 1)))


def test_the_native_kernel_builds_here():
    if select_native._native_kernels() is None:
        pytest.skip("no C++ compiler: the reference path runs (checked by every other test)")
    assert set(select_native._native_kernels()) == {"f32", "f64"}


# ------------------------------------------------------------------ adversarial scores
def _adversarial(width: int, seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    rows = 6
    cases = {
        "gaussian": torch.randn(rows, width, generator=g),
        "few values": torch.randint(0, 3, (rows, width), generator=g).float(),
        "all equal": torch.full((rows, width), 0.25),
        "zeros": torch.zeros(rows, width),
        "negative": -torch.rand(rows, width, generator=g) * 1e3,
        "heavy tail": torch.exp(torch.randn(rows, width, generator=g) * 8),
        "tiny magnitudes": torch.rand(rows, width, generator=g) * 1e-38,  # denormals
    }
    mixed = torch.randint(-2, 3, (rows, width), generator=g).float()
    mixed[0] = 5.0  # a constant row beside varied ones
    cases["constant row among others"] = mixed
    signed_zeros = torch.zeros(rows, width)
    signed_zeros[:, ::3] = -0.0  # -0.0 == +0.0: one tie class, broken by position
    signed_zeros[:, 1::5] = -1.0
    cases["signed zeros"] = signed_zeros
    inf = torch.randn(rows, width, generator=g)
    inf[:, ::4] = float("inf")
    inf[:, 1::7] = float("-inf")
    cases["infinities"] = inf
    extremes = torch.tensor([float("-inf"), -3.4e38, -1.0, -0.0, 0.0, 1e-45, 1.0, 3.4e38, float("inf")])
    cases["extremes"] = extremes[torch.randint(0, len(extremes), (rows, width), generator=g)]
    return cases


@pytest.mark.parametrize("width", [1, 2, 3, 7, 16, 17, 47, 48, 49, 64, 100, 577, 1536])
def test_rows_equal_the_stable_sort_on_adversarial_scores(width):
    for name, scores in _adversarial(width, seed=width).items():
        for k in edge_ks(width):
            check(scores, k)


def test_one_row_one_column_and_long_rows():
    g = torch.Generator().manual_seed(7)
    check(torch.randn(1, 1), 1)
    check(torch.randn(50, 1), 1)
    check(torch.randn(50, 1), 0)
    check(torch.randn(1, 1000, generator=g), 500)
    long = torch.randint(0, 50, (2, 200_000), generator=g).float()  # long rows of many ties
    for k in (1, 77_777, 100_000, 199_999):
        check(long, k)
    # one long row (the layer group's shape), ties everywhere
    for one in (torch.randint(0, 7, (1, 300_001), generator=g).float(), torch.randn(1, 300_001, generator=g),
                torch.full((1, 300_001), 2.0), torch.randint(0, 7, (1, 300_001), generator=g).double()):
        for k in (1, 2, 42_000, 150_000, 300_000, 300_001):
            check(one, k)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float64])
def test_every_score_dtype(dtype):
    g = torch.Generator().manual_seed(3)
    for scores in (torch.randn(9, 300, generator=g), torch.randint(0, 5, (9, 300), generator=g).float(),
                   torch.exp(torch.randn(9, 300, generator=g) * 6)):
        scores = scores.to(dtype)  # float16/bfloat16: rounding makes many ties
        for k in edge_ks(300):
            check(scores, k)
    near = torch.tensor([[1.0, 1.0 + 2**-40, 1.0 - 2**-40, 1.0] * 20], dtype=torch.float64)
    check(near, 40)  # float64 values float32 would merge: the kernel keeps float64


def test_nan_keeps_the_reference_behaviour():
    scores = torch.randn(5, 80, generator=torch.Generator().manual_seed(4))
    scores[1, 3] = float("nan")
    scores[4, ::2] = float("nan")
    assert native_lowest(scores, 40) is None  # a NaN: the reference path decides, as before
    for k in (1, 40, 79, 80):
        check(scores, k, native_expected=False)


def test_noncontiguous_and_grad_scores():
    base = torch.randn(20, 64, generator=torch.Generator().manual_seed(5), requires_grad=True)
    check(base, 30)
    check(base.detach().t(), 7)  # a transposed view: rows of width 20
    check(base.detach()[:, ::2], 16)


def test_groups_through_select_mask():
    g = torch.Generator().manual_seed(6)
    for scores in (torch.randn(24, 64, generator=g), torch.randint(0, 4, (24, 64), generator=g).float()):
        for sparsity in (0.0, 0.01, 0.5, 0.7, 1.0):
            row = select_mask(scores, sparsity, group="row")
            np.testing.assert_array_equal(row.numpy(), stable_lowest(scores, int(64 * sparsity)))
            layer = select_mask(scores, sparsity, group="layer")
            flat = stable_lowest(scores.reshape(1, -1), int(scores.numel() * sparsity)).reshape(scores.shape)
            np.testing.assert_array_equal(layer.numpy(), flat)


@pytest.mark.parametrize("n, m", [(2, 4), (4, 8), (16, 32), (1, 16)])
def test_nm_groups(n, m):
    g = torch.Generator().manual_seed(m)
    for scores in (torch.randn(16, 128, generator=g), torch.randint(0, 3, (16, 128), generator=g).float()):
        mask = select_mask(scores, 0.5, nm=(n, m))
        ref = stable_lowest(scores.reshape(-1, m), m - n).reshape(scores.shape)
        np.testing.assert_array_equal(mask.numpy(), ref)


# ------------------------------------------------------------------ real smollm2-135m scores
REAL = ["model.layers.0.self_attn.q_proj", "model.layers.0.self_attn.k_proj", "model.layers.7.mlp.down_proj",
        "model.layers.15.mlp.gate_proj", "model.layers.29.self_attn.o_proj"]


@pytest.mark.real
def test_real_scores_equal_the_reference():
    """Wanda, magnitude and Pruner-Zero scores of five real layers (statistics of a small
    calibration of smollm2-135m, computed here or read from the cache)."""
    ev = Evaluator(EvalSpec(model="smollm2-135m", split="valid",
                            protocol=Protocol(seq_len=64, calib_windows=2, eval_windows=1)), needs=frozenset("WGX"))
    stats = ev.stats(frozenset("WGX"))
    units = [u for u in ev.units if u.name in REAL]
    assert len(units) == len(REAL)
    for unit in units:
        name = unit.name
        scores = {m: unit_scores(resolve_metric(m), unit, stats) for m in ("wanda", "magnitude", "pruner-zero")}
        for metric, s in scores.items():
            width = s.shape[1]
            for k in (1, width // 4, width // 2, (7 * width) // 10, width - 1):
                check(s, k)
            for sparsity in (0.5, 0.7):
                layer = select_mask(s, sparsity, group="layer")
                flat = stable_lowest(s.reshape(1, -1), int(s.numel() * sparsity)).reshape(s.shape)
                np.testing.assert_array_equal(layer.numpy(), flat, err_msg=f"{name} {metric}")
            for n, m in ((2, 4), (4, 8), (16, 32)):
                mask = select_mask(s, 0.5, nm=(n, m))
                ref = stable_lowest(s.reshape(-1, m), m - n).reshape(s.shape)
                np.testing.assert_array_equal(mask.numpy(), ref, err_msg=f"{name} {metric} {n}:{m}")
            half = s.to(torch.bfloat16)  # rounded scores: ties everywhere
            check(half, width // 2)


def test_a_cached_kernel_others_can_write_is_never_loaded(tmp_path, monkeypatch):
    """Loading a library runs it: one in the cache that another user could have written is built
    again, and a cache folder others can write is not used at all."""
    if shutil.which("g++") is None and shutil.which("c++") is None:
        pytest.skip("no C++ compiler here: nothing is ever loaded")
    monkeypatch.setenv("PRUNERZERO_CACHE", str(tmp_path))
    planted = select_native._native_library()
    planted.write_bytes(b"not the kernel")
    planted.chmod(0o666)
    rebuilt = select_native._native_library()
    assert rebuilt == planted and rebuilt.read_bytes() != b"not the kernel" and select_native._trusted(rebuilt)
    planted.parent.chmod(0o777)
    with pytest.warns(UserWarning, match="not this user's alone"):
        private = select_native._native_library()
    assert private.parent != planted.parent and select_native._trusted(private.parent)
