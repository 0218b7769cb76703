"""The structured mode on the real smollm2-135m: a latency table measured here, the MILP's plan
sliced into a smaller model whose perplexity the evaluator measures, saved and reloaded by
every prunerzero command, and the dense model restored."""

import contextlib

import pytest

from prunerzero.fitness.evaluator import EvalSpec, Evaluator
from prunerzero.models.loading import load_model
from prunerzero.pruning.structured.latency import load_or_measure
from prunerzero.fitness.perplexity import perplexity
from conftest import REAL

pytestmark = pytest.mark.real

SMALL = REAL  # conftest.REAL: one calibration draw for every real-model file
TARGET = {"latency": 0.6, "width": 256, "seq_len": 32}  # a small latency table: seconds to measure


@pytest.fixture(scope="module")
def evaluator():
    ev = Evaluator(EvalSpec(model="smollm2-135m", split="valid", protocol=SMALL, mode="structured", target=TARGET))
    # the table the mode will look up, measured here with one timed pass per probe instead of five
    # (a noisier table, the same path): what is tested is the plan it prices, not the timings
    load_or_measure(ev.model, ev.ctx.adapter, TARGET["width"], 1, TARGET["seq_len"], log=lambda m: None, repeats=1)
    return ev


def test_structured_pruning_of_the_real_model_saves_and_reloads(evaluator, tmp_path):
    ev = evaluator
    dense = ev.measure().perplexity
    params = sum(p.numel() for p in ev.model.parameters())

    @contextlib.contextmanager
    def saved(session, report):  # while the model is pruned: the mode saves it
        session.mode.save(session.ctx, report, tmp_path)
        session.lm.tokenizer.save_pretrained(tmp_path)
        yield {}

    trial = ev.trial("wanda", observe=saved)
    report, pruned = trial.report, trial.perplexity.perplexity
    assert dense < pruned < 50 * dense
    assert report.extra["predicted_ratio"] <= 0.6 and report.extra["solver_gap"] <= 1e-6
    assert trial.params < params and report.sparsity > 0
    assert ev.measure().perplexity == pytest.approx(dense, rel=1e-6)  # restored
    back = load_model(str(tmp_path))
    assert sum(p.numel() for p in back.model.parameters()) == trial.params
    assert perplexity(back.model, ev.windows).perplexity == pytest.approx(pruned, rel=1e-5)
    taylor = ev.evaluate(ev.candidate("taylor"))
    assert taylor.status == "ok" and dense < taylor.value and taylor.value != pruned  # measured: its own model


def test_a_campaign_evolves_the_metric_for_the_structured_mode(evaluator, tmp_path, measured_campaign):
    from prunerzero.evolve.campaign import run_campaign
    from prunerzero.evolve.config import from_dict
    from test_evolve_campaign import QUIET

    config = from_dict({
        "name": "structured", "runs_dir": str(tmp_path / "runs"), "cache": str(tmp_path / "fitness.sqlite"),
        "eval": {"model": "smollm2-135m", "mode": "structured", "device": "cpu"}, "target": TARGET,
        "protocol": {"seq_len": SMALL.seq_len, "calib_windows": SMALL.calib_windows,
                     "eval_windows": SMALL.eval_windows},  # the evaluator's: same numbers
        "search": {"population": 4, "generations": 1, "hall_of_fame": 3, "seed": 0},
        "backend": {"kind": "serial"}})
    run_dir = run_campaign(config, console=QUIET)
    ev = evaluator
    measured_campaign(run_dir, 4, lambda formula: ev.evaluate(ev.candidate(formula)).value, ev.measure().perplexity)
