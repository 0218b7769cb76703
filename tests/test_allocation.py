"""Non-uniform sparsity: OWL's rule keeps the total and protects the blocks with more outliers."""

import pytest
import torch

from prunerzero.models.adapter import ModelAdapter
from prunerzero.primitives.metric import builtin
from prunerzero.primitives.stats import LayerStats
from prunerzero.pruning.unstructured.allocation import owl_ratios, owl_sparsities
from prunerzero.pruning.modes import get_mode
from prunerzero.pruning.unstructured.target import PruneTarget

from conftest import build, tiny_context


def test_owl_gives_outlier_heavy_blocks_more_weights_at_the_same_total():
    model = build("llama")
    adapter = ModelAdapter(model)
    units = adapter.prunable()
    stats = LayerStats(X={u.name: torch.ones(u.shape[1]) for u in units})
    with torch.no_grad():
        for u in units:
            if u.block == 1:
                u.weight[:, :2] *= 40  # block 1: a few loud columns, as LLM outlier features
    ratios = owl_ratios(units, stats)
    assert ratios[1] > ratios[0]
    sparsities = owl_sparsities(units, stats, 0.6, lam=0.08)
    assert sparsities[1] < 0.6 < sparsities[0]
    assert sum(sparsities.values()) / 2 == pytest.approx(0.6) and max(sparsities.values()) - min(sparsities.values()) == pytest.approx(0.16)


def test_the_unstructured_mode_prunes_with_owl_allocation(tiny_llama, tiny_windows):
    ctx = tiny_context(tiny_llama, tiny_windows)
    report = get_mode("unstructured").apply(ctx, builtin("wanda"), PruneTarget(0.5, allocation="owl"))
    per_block = report.table().groupby("block")[["zeros", "numel"]].sum()
    achieved = per_block["zeros"] / per_block["numel"]
    assert achieved.mean() == pytest.approx(0.5, abs=0.01) and achieved.max() - achieved.min() > 0.05
    assert PruneTarget(0.7, allocation="owl").describe() == "0.7 unstructured per row, OWL allocation"
    with pytest.raises(ValueError, match="sets a sparsity per block; pattern 2:4 fixes it"):
        PruneTarget(allocation="owl", pattern="2:4")
