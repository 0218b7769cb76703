"""SparseGPT: the published algorithm transcribed in the test as the reference, exact sparsity on
a tiny Llama, and a lower layer-wise reconstruction error than pure metrics."""

import pytest
import torch

from prunerzero.models.adapter import ModelAdapter
from prunerzero.primitives.metric import builtin
from prunerzero.pruning.masks import PatternError, select_mask
from prunerzero.pruning.unstructured.sparsegpt import HessianAccumulator, lsq_refit_unit, prune_sparsegpt, sparsegpt_unit
from prunerzero.pruning.unstructured.target import PruneTarget


def reference_sparsegpt(W, H, sparsity, prunen=0, prunem=0, blocksize=128, percdamp=0.01, exact_count=True):
    """SparseGPT.fasterprune of IST-DASLab/sparsegpt (sparsegpt.py), transcribed. `exact_count`
    adapts its unstructured threshold (`tmp <= sort(tmp)[int(n*s)]`, which prunes one weight more
    than int(n*s) when scores are distinct) to prune exactly int(n*s), as ours does."""
    W = W.clone().float()
    H = H.clone()
    rows, columns = W.shape
    dead = torch.diag(H) == 0
    H[dead, dead] = 1
    W[:, dead] = 0
    damp = percdamp * torch.mean(torch.diag(H))
    diag = torch.arange(columns)
    H[diag, diag] += damp
    H = torch.linalg.cholesky(H)
    H = torch.cholesky_inverse(H)
    H = torch.linalg.cholesky(H, upper=True)
    Hinv = H
    for i1 in range(0, columns, blocksize):
        i2 = min(i1 + blocksize, columns)
        count = i2 - i1
        W1 = W[:, i1:i2].clone()
        Q1 = torch.zeros_like(W1)
        Err1 = torch.zeros_like(W1)
        Hinv1 = Hinv[i1:i2, i1:i2]
        if prunen == 0:
            tmp = W1**2 / (torch.diag(Hinv1).reshape((1, -1))) ** 2
            k = int(tmp.numel() * sparsity)
            thresh = torch.sort(tmp.flatten())[0][k - 1 if exact_count else k]
            mask1 = tmp <= thresh
        else:
            mask1 = torch.zeros_like(W1) == 1
        for i in range(count):
            w = W1[:, i]
            d = Hinv1[i, i]
            if prunen != 0 and i % prunem == 0:
                tmp = W1[:, i : (i + prunem)] ** 2 / (torch.diag(Hinv1)[i : (i + prunem)].reshape((1, -1))) ** 2
                mask1.scatter_(1, i + torch.topk(tmp, prunen, dim=1, largest=False)[1], True)
            q = w.clone()
            q[mask1[:, i]] = 0
            Q1[:, i] = q
            err1 = (w - q) / d
            W1[:, i:] -= err1.unsqueeze(1).matmul(Hinv1[i, i:].unsqueeze(0))
            Err1[:, i] = err1
        W[:, i1:i2] = Q1
        W[:, i2:] -= Err1.matmul(Hinv[i1:i2, i2:])
    return W


def _random_problem(rows=24, columns=256, tokens=600, seed=0):
    g = torch.Generator().manual_seed(seed)
    W = torch.randn(rows, columns, generator=g)
    X = torch.randn(tokens, columns, generator=g) * torch.rand(columns, generator=g) * 3
    X[:, 7] = 0  # one dead input
    return W, 2 * X.t() @ X / tokens


def _zeros_per_block(W, blocksize):
    return [int((W[:, i : i + blocksize] == 0).sum()) for i in range(0, W.shape[1], blocksize)]


@pytest.mark.parametrize("sparsity, blocksize", [(0.5, 128), (0.5, 64), (0.3, 100)])
def test_unstructured_matches_the_reference_algorithm(sparsity, blocksize):
    W, H = _random_problem()
    ours = sparsegpt_unit(W, H, PruneTarget(sparsity), blocksize=blocksize)
    ref = reference_sparsegpt(W, H, sparsity, blocksize=blocksize)
    torch.testing.assert_close(ours, ref, rtol=1e-4, atol=1e-5)
    assert torch.equal(ours == 0, ref == 0)
    expected = [int(W.shape[0] * min(blocksize, W.shape[1] - i) * sparsity) for i in range(0, W.shape[1], blocksize)]
    assert _zeros_per_block(ours, blocksize) == expected
    assert (ours[:, 7] == 0).all()  # the dead input's weights go
    # the literal reference prunes exactly one weight more per column block
    literal = reference_sparsegpt(W, H, sparsity, blocksize=blocksize, exact_count=False)
    assert _zeros_per_block(literal, blocksize) == [n + 1 for n in expected]


def test_nm_matches_the_reference_algorithm():
    W, H = _random_problem(seed=1)
    ours = sparsegpt_unit(W, H, PruneTarget(pattern="2:4"))
    ref = reference_sparsegpt(W, H, 0, prunen=2, prunem=4)
    torch.testing.assert_close(ours, ref, rtol=1e-4, atol=1e-5)
    assert ((ours != 0).reshape(W.shape[0], -1, 4).sum(dim=-1) <= 2).all()
    assert ((ours != 0).reshape(W.shape[0], -1, 4).sum(dim=-1) == 2).float().mean() > 0.99  # dead input aside


def test_the_weight_update_changes_the_kept_weights():
    W, H = _random_problem(seed=2)
    out = sparsegpt_unit(W, H, PruneTarget(0.5))
    kept = out != 0
    assert not torch.allclose(out[kept], W[kept])  # not a pure mask: OBS compensation
    assert out.dtype == torch.float32 and out.shape == W.shape


# ---------------------------------------------------------------- on a tiny Llama
@pytest.fixture
def calib(tiny_llama):
    """More tokens than the width so that every unit's H is well conditioned."""
    return torch.randint(0, tiny_llama.config.vocab_size, (8, 32), generator=torch.Generator().manual_seed(5))


def _unit_inputs(model, adapter, windows) -> dict[str, torch.Tensor]:
    rows: dict[str, list] = {}
    with adapter.capture(lambda tap, x: rows.setdefault(tap, []).append(x.clone())), torch.no_grad():
        model(windows)
    return {tap: torch.cat(chunks) for tap, chunks in rows.items()}


def _error(X, W, W_pruned) -> float:
    return float(((X @ W.t() - X @ W_pruned.t()) ** 2).sum())


@pytest.mark.parametrize("pattern", ["unstructured", "2:4"])
def test_reconstruction_error_is_below_magnitude_and_wanda(tiny_llama, calib, pattern):
    adapter = ModelAdapter(tiny_llama)
    inputs = _unit_inputs(tiny_llama, adapter, calib)
    target = PruneTarget(0.5, pattern=pattern)
    for unit in adapter.prunable():
        X, W = inputs[unit.tap], unit.weight.float()
        acc = HessianAccumulator()
        acc(unit.tap, X)
        torch.testing.assert_close(acc.hessian(unit.tap), 2 * X.t() @ X / X.shape[0])
        errors = {"sparsegpt": _error(X, W, sparsegpt_unit(W, acc.hessian(unit.tap), target))}
        for name in ("magnitude", "wanda"):
            scores = builtin(name)(W, None, (X**2).mean(dim=0))
            errors[name] = _error(X, W, W.masked_fill(select_mask(scores, 0.5, target.nm), 0))
        assert errors["sparsegpt"] < min(errors["magnitude"], errors["wanda"]), (unit.name, errors)


def test_prune_sparsegpt_exact_unstructured_sparsity_per_column_block(tiny_llama, tiny_windows):
    adapter = ModelAdapter(tiny_llama)
    report = prune_sparsegpt(tiny_llama, adapter, tiny_windows, PruneTarget(0.5), blocksize=32)
    assert report.method == "sparsegpt" and report.sparsity == 0.5
    for unit in adapter.prunable():
        out, columns = unit.shape
        assert _zeros_per_block(unit.weight, 32) == [out * 32 // 2] * (columns // 32), unit.name
    assert all(torch.isfinite(p).all() for p in tiny_llama.parameters())


def test_prune_sparsegpt_exact_nm(tiny_llama, tiny_windows):
    adapter = ModelAdapter(tiny_llama)
    dense = {k: v.clone() for k, v in tiny_llama.state_dict().items()}
    report = prune_sparsegpt(tiny_llama, adapter, tiny_windows, PruneTarget(pattern="2:4"))
    assert report.sparsity == 0.5
    pruned = set()
    for unit in adapter.prunable():
        kept = (unit.weight != 0).reshape(unit.shape[0], -1, 4).sum(dim=-1)
        assert (kept == 2).all(), unit.name
        pruned.add(f"{unit.name}.weight")
    after = tiny_llama.state_dict()
    assert all(torch.equal(after[k], v) for k, v in dense.items() if k not in pruned)


def test_prune_sparsegpt_rejects_bad_patterns_before_touching_weights(tiny_llama, tiny_windows):
    adapter = ModelAdapter(tiny_llama)
    dense = {k: v.clone() for k, v in tiny_llama.state_dict().items()}
    with pytest.raises(PatternError, match="3:5"):
        prune_sparsegpt(tiny_llama, adapter, tiny_windows, PruneTarget(pattern="3:5"))
    with pytest.raises(ValueError, match="blocksize 30 must be a multiple of M=4"):
        prune_sparsegpt(tiny_llama, adapter, tiny_windows, PruneTarget(pattern="2:4"), blocksize=30)
    assert all(torch.equal(tiny_llama.state_dict()[k], v) for k, v in dense.items())


# ---------------------------------------------------------------- a metric's mask inside the update
@pytest.mark.parametrize("pattern", ["unstructured", "2:4"])
def test_a_metric_mask_with_the_obs_update_prunes_exactly_that_mask_and_reconstructs_better(tiny_llama, calib,
                                                                                            pattern):
    adapter = ModelAdapter(tiny_llama)
    inputs = _unit_inputs(tiny_llama, adapter, calib)
    target = PruneTarget(0.5, pattern=pattern, update="obs")
    for unit in adapter.prunable():
        X, W = inputs[unit.tap], unit.weight.float()
        acc = HessianAccumulator()
        acc(unit.tap, X)
        mask = select_mask(builtin("wanda")(W, None, (X**2).mean(dim=0)), 0.5, target.nm)
        updated = sparsegpt_unit(W, acc.hessian(unit.tap), target, mask=mask)
        assert torch.equal(updated == 0, mask)  # exactly the metric's mask
        masked = W.masked_fill(mask, 0)
        assert _error(X, W, updated) < _error(X, W, masked), unit.name


def _unstructured_mode(model, windows):
    """The unstructured mode, a context on `windows`, a dense snapshot and the dense logits."""
    from prunerzero.pruning.interventions import DenseSnapshot
    from prunerzero.pruning.modes import get_mode
    from conftest import tiny_context

    ctx = tiny_context(model, windows, stats="WGX")
    adapter = ctx.adapter
    with torch.no_grad():
        dense = model(windows).logits
    return get_mode("unstructured"), ctx, DenseSnapshot(adapter.prunable()), dense


def test_the_unstructured_mode_with_obs_update_is_sequential_exact_and_restorable(tiny_llama, tiny_windows):
    mode, ctx, snapshot, dense = _unstructured_mode(tiny_llama, tiny_windows)
    plain = mode.apply(ctx, builtin("gradient"), PruneTarget(0.5))
    plain_logits = tiny_llama(tiny_windows).logits.detach()
    snapshot.restore()
    obs = mode.apply(ctx, builtin("gradient"), PruneTarget(0.5, update="obs"))
    assert obs.sparsity == plain.sparsity == 0.5 and obs.method == "gradient + OBS update"
    with torch.no_grad():
        obs_logits = tiny_llama(tiny_windows).logits
    assert (obs_logits - dense).norm() < (plain_logits - dense).norm()  # the update recovers output
    snapshot.restore()
    assert torch.equal(tiny_llama(tiny_windows).logits.detach(), dense)
    assert PruneTarget(0.5, update="obs").describe() == "0.5 unstructured per row + OBS update"
    with pytest.raises(ValueError, match="unknown weight update 'lstsq'"):
        PruneTarget(0.5, update="lstsq")


# ---------------------------------------------------------------- the exact least-squares refit
def _damped_error(H, W, W_pruned, percdamp=0.01) -> float:
    Hd = H + percdamp * H.diagonal().mean() * torch.eye(H.shape[0])
    D = W - W_pruned
    return float(torch.einsum("ri,ij,rj->", D, Hd, D))


@pytest.mark.parametrize("pattern", ["unstructured", "2:4"])
def test_the_lsq_refit_keeps_the_mask_and_is_the_optimum_obs_approaches(tiny_llama, calib, pattern):
    adapter = ModelAdapter(tiny_llama)
    inputs = _unit_inputs(tiny_llama, adapter, calib)
    target = PruneTarget(0.5, pattern=pattern, update="lsq")
    for unit in adapter.prunable():
        X, W = inputs[unit.tap], unit.weight.float()
        acc = HessianAccumulator()
        acc(unit.tap, X)
        H = acc.hessian(unit.tap)
        mask = select_mask(builtin("wanda")(W, None, (X**2).mean(dim=0)), 0.5, target.nm)
        lsq = lsq_refit_unit(W, H, mask)
        assert torch.equal(lsq == 0, mask), unit.name  # exactly the metric's mask
        obs = sparsegpt_unit(W, H, target, mask=mask)
        assert _damped_error(H, W, lsq) <= _damped_error(H, W, obs) * (1 + 1e-5), unit.name
        assert _error(X, W, lsq) < _error(X, W, W.masked_fill(mask, 0)), unit.name


def test_the_lsq_refit_solves_each_row_like_a_direct_least_squares():
    g = torch.Generator().manual_seed(3)
    X = torch.randn(200, 12, generator=g)
    X[:, 5] = 0  # a dead input
    W = torch.randn(7, 12, generator=g)
    mask = torch.rand(7, 12, generator=g) < torch.linspace(0.2, 0.8, 7).unsqueeze(1)  # a different count per row
    H = 2 * X.t() @ X / X.shape[0]
    got = lsq_refit_unit(W, H, mask, percdamp=0.01)
    lam = 0.01 * H.diagonal().mean()
    for r in range(7):
        S = (~mask[r]).nonzero().squeeze(1)
        # min ||X_S w_S - X w||² n/2... in the damped form: [X_S; √(λn/2) I] w_S = [X w; √(λn/2) w_S0]
        A = torch.cat([X[:, S], (lam * X.shape[0] / 2) ** 0.5 * torch.eye(len(S))])
        b = torch.cat([X @ W[r], (lam * X.shape[0] / 2) ** 0.5 * W[r, S]])
        expect = torch.linalg.lstsq(A.double(), b.double().unsqueeze(1)).solution.squeeze(1)
        torch.testing.assert_close(got[r, S].double(), expect, atol=1e-4, rtol=1e-4)
        assert torch.all(got[r, mask[r]] == 0)


def test_the_unstructured_mode_with_the_lsq_refit(tiny_llama, tiny_windows):
    mode, ctx, snapshot, dense = _unstructured_mode(tiny_llama, tiny_windows)
    plain = mode.apply(ctx, builtin("wanda"), PruneTarget(0.5, pattern="2:4"))
    with torch.no_grad():
        plain_logits = tiny_llama(tiny_windows).logits
    snapshot.restore()
    lsq = mode.apply(ctx, builtin("wanda"), PruneTarget(0.5, pattern="2:4", update="lsq"))
    assert lsq.sparsity == plain.sparsity == 0.5 and lsq.method == "wanda + LSQ refit"
    with torch.no_grad():
        assert (tiny_llama(tiny_windows).logits - dense).norm() < (plain_logits - dense).norm()
    snapshot.restore()
    assert PruneTarget(0.0, pattern="2:4", update="lsq").describe() == "2:4 + LSQ refit"
