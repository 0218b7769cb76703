"""Issue 29, item 5: bad inputs end with a one-line message naming the input, not a traceback — a
candidate file of a kind the mode does not apply, a latency table cut short under a valid
checksum, a router file whose names are not [block, kind] pairs."""

import json

import pytest
import torch
from typer.testing import CliRunner

from prunerzero.cli import app
from prunerzero.core.integrity import CorruptCache, write_checked_json
from prunerzero.models.adapter import ModelAdapter
from prunerzero.pruning.structured import latency
from prunerzero.pruning.skip.routers import FORMAT, META, RouterSet
from prunerzero.pruning.skip.skipping import Router

runner = CliRunner()


@pytest.fixture
def no_model_load(monkeypatch):
    """A command that got as far as loading the model fails at once (and says so)."""
    def refuse(*args, **kwargs):
        raise RuntimeError("the model was loaded")
    monkeypatch.setattr("prunerzero.jobs.Session", refuse)


@pytest.mark.parametrize("mode, data, needle", [
    ("structured", {"kind": "allocation", "metric": "wanda", "sparsities": [0.5, 0.5]}, "applies in mode 'unstructured'"),
    ("skip", {"kind": "allocation", "metric": "wanda", "sparsities": [0.5, 0.5]}, "applies in mode 'unstructured'"),
    ("experts", {"kind": "allocation", "metric": "wanda", "sparsities": [0.5, 0.5]}, "applies in mode 'unstructured'"),
    ("unstructured", {"kind": "expert_plan", "order": "reap", "keep": [[0, 1]]}, "applies in mode 'experts'"),
    ("skip", {"kind": "method", "name": "sparsegpt"}, "'sparsegpt' is not a method of mode 'skip'"),
])
def test_a_candidate_file_of_another_mode_is_named_before_the_model_loads(tmp_path, no_model_load, mode, data,
                                                                          needle):
    path = tmp_path / "candidate.json"
    path.write_text(json.dumps(data))
    result = runner.invoke(app, ["prune", "--out", str(tmp_path / "out"), "--mode", mode, "--metric", str(path)])
    assert result.exit_code == 2 and needle in result.output and "candidate.json" in result.output, result.output
    assert "Traceback" not in result.output


def _table(model, width: int) -> latency.LatencyTable:
    s = ModelAdapter(model).structure
    a_opts = latency.attention_options(s.attentions[0].n_kv_heads, s.attentions[0].group_size)
    m_opts = list(range(s.mlps[0].width // width + 1))
    n = len(s.blocks)
    per = lambda k: {p: [[1e-3] * k for _ in range(n)] for p in latency.PHASES}  # noqa: E731
    return latency.LatencyTable(a_opts, m_opts, width, 1, 8, per(len(a_opts)), per(len(m_opts)),
                                {p: [1e-4] * n for p in latency.PHASES}, {p: 1e-4 for p in latency.PHASES},
                                {p: 1e-2 for p in latency.PHASES})


@pytest.mark.parametrize("damage", ["one block", "one option", "nan", "text"])
def test_a_latency_table_cut_short_under_a_valid_checksum_is_measured_again(tiny_llama, tmp_path, monkeypatch, damage):
    width = 32
    data = _table(tiny_llama, width).to_data()
    if damage == "one block":
        data["attn"]["prefill"] = data["attn"]["prefill"][:1]
    elif damage == "one option":
        data["mlp"]["decode"] = [row[:2] for row in data["mlp"]["decode"]]
    elif damage == "nan":
        data["rest"]["prefill"][0] = float("nan")
    else:
        data["overhead"]["decode"] = "fast"
    write_checked_json(latency._path(tiny_llama, width, 1, 8, tmp_path), data)  # checksummed: only the shape is wrong
    fresh = _table(tiny_llama, width)
    monkeypatch.setattr(latency, "measure", lambda *args, **kwargs: fresh)
    messages = []
    got = latency.load_or_measure(tiny_llama, ModelAdapter(tiny_llama), width, 1, 8, log=messages.append,
                                  directory=tmp_path)
    assert got is fresh
    assert any("latency table" in m and "field" in m and "measuring again" in m for m in messages), messages


@pytest.mark.parametrize("names, needle", [
    (5, "field 'names' must be a list"),
    (["ab"], "field 'names' must be a list"),
    ([[0, "ffn"]], "field 'names' must be a list"),
    ([["0", "mlp"]], "field 'names' must be a list"),
    ([[0, "mlp"], [0, "mlp"]], "lists a sublayer twice"),
])
def test_a_router_file_whose_names_are_not_pairs_is_named(tmp_path, names, needle):
    RouterSet([(0, "mlp")], [Router(8)], {"format": FORMAT, "names": [(0, "mlp")]}).save(tmp_path)
    assert RouterSet.load(tmp_path).names == [(0, "mlp")]
    meta = json.loads((tmp_path / META).read_text())
    (tmp_path / META).write_text(json.dumps(meta | {"names": names}))  # the checksum covers the tensors only
    with pytest.raises(CorruptCache, match=needle) as caught:
        RouterSet.load(tmp_path)
    assert META in str(caught.value) and "\n" not in str(caught.value)


def test_a_router_of_the_wrong_shape_is_named(tmp_path):
    router = Router(8)
    router.proj = torch.nn.Linear(8, 2)
    RouterSet([(0, "mlp")], [router], {"format": FORMAT, "names": [(0, "mlp")]}).save(tmp_path)
    with pytest.raises(CorruptCache, match=r"block 0 mlp has shape \(2, 8\)"):
        RouterSet.load(tmp_path)
