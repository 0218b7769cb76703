"""Integration on the real smollm2-135m and the real austen corpus (both fetched by the install
command; fetched here on first use otherwise), at a small CPU token budget."""

import contextlib

import pandas as pd
import pytest
import torch

from prunerzero.fitness.evaluator import EvalSpec, Evaluator
from prunerzero.fitness.perplexity import perplexity
from prunerzero.jobs import leaderboard_rows, prune_and_save
from prunerzero.leaderboard import IDENTITY, append, read
from prunerzero.primitives.metric import resolve_metric
from prunerzero.pruning.unstructured.target import PruneTarget
from conftest import REAL

pytestmark = pytest.mark.real

SMALL = REAL  # conftest.REAL: one calibration draw for every real-model file


@pytest.fixture(scope="module")
def evaluator():
    return Evaluator(EvalSpec(model="smollm2-135m", corpus="austen", split="test", protocol=SMALL))


@pytest.fixture(scope="module")
def results(evaluator):
    dense = evaluator.measure().perplexity
    pruned = {m: evaluator.evaluate(resolve_metric(m)) for m in ("magnitude", "wanda", "pruner-zero")}
    return dense, pruned


def test_real_model_units(evaluator):
    units = evaluator.units
    assert len(units) == 30 * 7  # q k v o gate up down in each of 30 blocks
    q_o, k_v, mlp = 576 * 576, 192 * 576, 576 * 1536  # 9 heads, 3 KV heads of 64; MLP 1536
    assert sum(u.weight.numel() for u in units) == 30 * (2 * q_o + 2 * k_v + 3 * mlp)
    assert {u.role for u in units} == {"q", "k", "v", "o", "gate", "up", "down"}


def test_every_pruned_model_is_worse_than_dense(results):
    dense, pruned = results
    for name, r in pruned.items():
        assert r.status == "ok", r.reason
        assert abs(r.sparsity - 0.5) < 1e-3
        assert r.perplexity > dense, name


def test_wanda_far_below_magnitude(results):
    _, pruned = results
    assert pruned["wanda"].perplexity * 2 < pruned["magnitude"].perplexity


def test_evaluate_restores_dense_exactly(evaluator, results):
    dense, _ = results
    assert evaluator.measure().perplexity == dense


def test_same_masks_answer_without_a_forward_exactly_as_a_forward_would(evaluator, results):
    from prunerzero.primitives.metric import Metric

    _, pruned = results
    magnitude = pruned["magnitude"]
    known = {magnitude.phenotype: magnitude.perplexity}
    squared = Metric.from_expression("sqr(W)")  # ranks weights as magnitude does
    skipped = evaluator.evaluate(squared, known=known)
    assert not skipped.measured and skipped.phenotype == magnitude.phenotype
    assert skipped.perplexity == magnitude.perplexity and skipped.eval_tokens == magnitude.eval_tokens
    forward = evaluator.evaluate(squared)
    assert forward.measured and forward.perplexity == magnitude.perplexity
    assert evaluator.evaluate(resolve_metric("wanda"), known=known).measured  # other masks: measured


def test_saved_pruned_model_reloads_with_same_perplexity_and_zeros(evaluator, tmp_path):
    from transformers import AutoModelForCausalLM

    lines = []
    summary = prune_and_save("smollm2-135m", "wanda", PruneTarget(0.5), tmp_path / "pruned", corpus="austen",
                             protocol=SMALL, measure=True, log=lines.append)
    # one line per step, no raw data structures; the perplexity names the tokens it was measured on
    assert all("\n" not in ln and "{" not in ln for ln in lines)
    assert lines[0] == f"measuring the dense perplexity on {SMALL.eval_windows} test windows x 128 tokens"
    assert lines[-1].endswith(f"on {SMALL.eval_windows * 127} test tokens; saved to {tmp_path / 'pruned'}")
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "pruned", dtype=torch.float32).eval()
    again = perplexity(reloaded, evaluator.windows).perplexity
    assert again == pytest.approx(summary["perplexity"], rel=1e-5)
    report = pd.read_csv(tmp_path / "pruned" / "prune_report.csv")
    params = dict(reloaded.named_parameters())
    for _, row in report.head(10).iterrows():
        assert int((params[row["name"] + ".weight"] == 0).sum()) == row["zeros"]
    assert report["zeros"].sum() / report["numel"].sum() == pytest.approx(0.5, abs=1e-3)


def test_leaderboard_rows_append_without_duplicates(tmp_path):
    tiny = SMALL.with_(eval_windows=1)  # same calibration as the fixture: statistics come from the cache
    csv = tmp_path / "lb.csv"
    rows = leaderboard_rows("smollm2-135m", "austen", ["magnitude", "wanda"], [0.5], ["unstructured", "2:4"],
                            protocol=tiny, log=lambda m: None)
    append(rows, csv)
    append([r | {"seconds": r["seconds"] + 1000} for r in rows], csv)  # a re-run of the same rows replaces them
    df = read(csv)
    assert len(df) == 4 and (df["seconds"] >= 1000).all()
    assert not df.duplicated(subset=IDENTITY).any()
    assert set(df["pattern"]) == {"unstructured", "2:4"}
    assert (df["perplexity"] > df["dense_perplexity"]).all()


def test_a_trial_measures_what_evaluate_measures_and_leaves_the_dense_model(evaluator, results):
    dense, pruned = results
    trial = evaluator.trial("wanda", keep=True)
    # the same windows and model; the fitness measure batches its own forwards (float rounding apart)
    assert trial.perplexity.perplexity == pytest.approx(pruned["wanda"].perplexity, rel=1e-4)
    assert trial.report.sparsity == pytest.approx(0.5, abs=1e-3)
    assert trial.params == sum(p.numel() for p in evaluator.model.parameters())  # masks remove no parameter
    zeros = sum(int((m.weight == 0).sum()) for m in trial.pruned.modules() if isinstance(m, torch.nn.Linear))
    assert zeros > 0.45 * sum(u.weight.numel() for u in evaluator.units)  # the copy is the pruned model
    assert evaluator.measure().perplexity == dense  # the session's own model is dense again


def test_a_trial_that_fails_while_measuring_still_restores_the_dense_model(evaluator, results):
    dense, _ = results

    @contextlib.contextmanager
    def broken(session, report):
        assert session.model is evaluator.model and report.sparsity > 0.4  # entered with the model pruned
        raise RuntimeError("a hook failed mid-measurement")
        yield {}

    with pytest.raises(RuntimeError, match="mid-measurement"):
        evaluator.trial("magnitude", observe=broken)
    assert evaluator.measure().perplexity == dense
