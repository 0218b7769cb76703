"""The structured mode on the real smollm2-135m: a latency table measured here, the MILP's plan
sliced into a smaller model whose perplexity the evaluator measures, saved and reloaded by
every prunerzero command, and the dense model restored."""

import pytest
import torch

from prunerzero.core.protocol import Protocol
from prunerzero.fitness.evaluator import EvalSpec, Evaluator
from prunerzero.models.loading import load_model
from prunerzero.fitness.perplexity import perplexity

pytestmark = pytest.mark.real

SMALL = Protocol(seq_len=128, calib_windows=8, eval_windows=4)
TARGET = {"latency": 0.6, "width": 128, "seq_len": 32}  # a small latency table: seconds to measure


def test_structured_pruning_of_the_real_model_saves_and_reloads(tmp_path):
    ev = Evaluator(EvalSpec(model="smollm2-135m", split="valid", protocol=SMALL, mode="structured", target=TARGET))
    dense = ev.measure().perplexity
    params = sum(p.numel() for p in ev.model.parameters())
    result = ev.evaluate(ev.candidate("wanda"))
    assert result.status == "ok" and dense < result.value < 50 * dense
    report = ev.prune("wanda")
    assert report.extra["predicted_ratio"] <= 0.6 and report.extra["solver_gap"] <= 1e-6
    kept = sum(p.numel() for p in ev.model.parameters())
    assert kept < params and report.sparsity > 0
    pruned = ev.measure().perplexity
    assert pruned == pytest.approx(result.value, rel=1e-6)
    ev.mode.save(ev.ctx, report, tmp_path)
    ev.lm.tokenizer.save_pretrained(tmp_path)
    ev.restore()
    assert ev.measure().perplexity == pytest.approx(dense, rel=1e-6)
    back = load_model(str(tmp_path))
    assert sum(p.numel() for p in back.model.parameters()) == kept
    assert perplexity(back.model, ev.windows).perplexity == pytest.approx(pruned, rel=1e-5)
    taylor = ev.evaluate(ev.candidate("taylor"))
    assert taylor.status == "ok" and torch.isfinite(torch.tensor(taylor.value))


def test_a_campaign_evolves_the_metric_for_the_structured_mode(tmp_path):
    import csv
    import math

    from prunerzero.evolve.campaign import run_campaign
    from prunerzero.evolve.config import from_dict
    from test_evolve_campaign import QUIET

    config = from_dict({
        "name": "structured", "runs_dir": str(tmp_path / "runs"), "cache": str(tmp_path / "fitness.sqlite"),
        "eval": {"model": "smollm2-135m", "mode": "structured", "device": "cpu"}, "target": TARGET,
        "protocol": {"seq_len": 128, "calib_windows": 8, "eval_windows": 2},
        "search": {"population": 4, "generations": 1, "hall_of_fame": 3, "seed": 0},
        "backend": {"kind": "serial"}})
    run_dir = run_campaign(config, console=QUIET)
    with open(run_dir / "hall_of_fame.csv", newline="") as f:
        hof = list(csv.DictReader(f))
    assert hof and all(math.isfinite(float(r["fitness"])) for r in hof)
    assert float(hof[0]["fitness"]) <= float(hof[-1]["fitness"])
