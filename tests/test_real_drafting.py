"""Self-speculative decoding on the real smollm2-135m: greedy output identical to the dense
model's with a layer view of its own weights and with a pruned model saved by the skip mode
(`prunerzero.jobs.prune_and_save`, loaded by `models.loading.load_model`), and the command."""

import pytest
import typer
from typer.testing import CliRunner

import prunerzero.pruning.modes  # noqa: F401  (registers the reshaped loaders)
from prunerzero.cli_generate import register
from prunerzero.generate import calibration_windows, generate
from prunerzero.jobs import prune_and_save
from prunerzero.models.corpora import load_tokenized
from prunerzero.drafting import layer_view, load_draft, shares_weights, shortgpt_keep
from prunerzero.models.loading import load_model
from conftest import REAL

pytestmark = pytest.mark.real
SMALL = REAL  # conftest.REAL: one calibration draw for every real-model file
NEW = 16


@pytest.fixture(scope="module")
def dense():
    return load_model("smollm2-135m", device="cpu")


@pytest.fixture(scope="module")
def prompt(dense):
    return load_tokenized("austen", dense.tokenizer).splits["test"][5000:5080][None]


@pytest.fixture(scope="module")
def plain(dense, prompt):
    return generate(dense.model, prompt, NEW, stop_at_eos=False).tokens


def test_view_draft_is_lossless(dense, prompt, plain):
    keep = shortgpt_keep(dense.model, calibration_windows("austen", dense.tokenizer, 1, 64), 6)
    view = layer_view(dense.model, keep)
    assert len(keep) == 24 and shares_weights(view, dense.model)
    got = generate(dense.model, prompt, NEW, view, stop_at_eos=False)
    assert got.tokens == plain
    assert got.drafted > 0 and got.accepted > 0


def test_saved_skip_model_draft_is_lossless(dense, prompt, plain, tmp_path):
    out = tmp_path / "skip-static"
    prune_and_save("smollm2-135m", "shortgpt", {"ratio": 0.25}, out, corpus="austen", protocol=SMALL,
                   device="cpu", measure=False, log=lambda msg: None, mode="skip")
    draft = load_draft(str(out), dense)
    assert draft.kind == "skip" and not draft.shared
    got = generate(dense.model, prompt, NEW, draft.model, stop_at_eos=False)
    assert got.tokens == plain
    assert got.drafted > 0


def test_generate_command(dense, prompt):
    app = typer.Typer()
    register(app)
    app.command("noop")(lambda: None)  # a second command, so `generate` is a subcommand as in the real app
    text = dense.tokenizer.decode(prompt[0])
    r = CliRunner().invoke(app, ["generate", "--prompt", text, "--draft", "layers:0-23", "--max-new-tokens", "12",
                                 "--compare", "--device", "cpu"])
    assert r.exit_code == 0, r.output
    assert "acceptance" in r.output and "output identical to dense: yes" in r.output
    bad = CliRunner().invoke(app, ["generate", "--prompt", "x", "--draft", "shortgpt:x"])
    assert bad.exit_code == 2 and "shortgpt:N" in bad.output
