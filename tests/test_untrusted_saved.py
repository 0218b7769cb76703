"""Issue 29, items 7 and 8: a directory a pruning mode saved in a shape transformers' config cannot
express fails loudly in plain transformers, naming prunerzero's loader (never a dense model with
random weights where the saved ones do not fit), and still loads identically through prunerzero.
A structured directory without its plan, or with a tampered one, is refused in one line naming
the file and the field."""

import json

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM

from prunerzero.models import loading
from prunerzero.pruning.modes import get_mode

from conftest import build, tiny_context, tiny_model
from test_structured import fake_table

USER_ERRORS = (ValueError, KeyError, RuntimeError, OSError)  # prunerzero.console.USER_ERRORS: one line, no traceback


@pytest.fixture(autouse=True)
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("PRUNERZERO_CACHE", str(tmp_path / "cache"))


def _context(model, ids, width=None):
    ctx = tiny_context(model, ids)
    if width:
        ctx.memo[("latency", width, 1, 256)] = fake_table(model, width)  # no timing in unit tests
    return ctx


def saved(mode: str, tiny_llama, out):
    """(directory, logits of the pruned model, its block count) for a model `mode` pruned and saved."""
    ids = torch.randint(3, 64, (4, 16), generator=torch.Generator().manual_seed(1))
    the_mode = get_mode(mode)
    if mode == "experts":
        ctx, candidate, fields = _context(build("mixtral"), ids), "reap", {"per_layer": "3,2", "top_k": 1}
    elif mode == "structured":
        ctx, candidate, fields = _context(tiny_llama, ids, 32), "wanda", {"latency": 0.4, "width": 32}
    else:
        ctx, candidate, fields = _context(tiny_llama, ids), "wanda", {"ratio": 0.25}
    report = the_mode.apply(ctx, the_mode.candidate(candidate), the_mode.make_target(fields))
    with torch.no_grad():
        logits = ctx.model(ids).logits
    the_mode.save(ctx, report, out)
    return out, ids, logits, len(ctx.structure.blocks)


@pytest.mark.parametrize("mode", ["skip", "structured", "experts"])
def test_plain_transformers_refuses_a_reshaped_directory_naming_the_loader(tiny_llama, tmp_path, mode):
    out, ids, logits, blocks = saved(mode, tiny_llama, tmp_path / mode)
    for load in (AutoModelForCausalLM.from_pretrained, AutoConfig.from_pretrained):
        with pytest.raises(ValueError, match=r"prunerzero\.models\.loading\.load_model"):
            load(out)
    back = loading._from_pretrained(str(out), torch.float32)  # what every prunerzero command loads it with
    with torch.no_grad():
        torch.testing.assert_close(back(ids).logits, logits, rtol=1e-5, atol=1e-5)
    assert loading.count_blocks(str(out)) == blocks


def test_a_directory_saved_before_the_guard_still_loads(tiny_llama, tmp_path):
    out, ids, logits, _ = saved("structured", tiny_llama, tmp_path / "old")
    (out / "config.json").write_text((out / loading.REAL_CONFIG).read_text())  # as earlier versions saved it
    (out / loading.REAL_CONFIG).unlink()
    with torch.no_grad():
        assert torch.equal(loading._from_pretrained(str(out), torch.float32)(ids).logits, logits)


@pytest.mark.parametrize("mode, marker", [("structured", "prunerzero_structure.json"), ("skip", "prunerzero_skip.json")])
def test_a_reshaped_directory_without_its_plan_is_refused(tiny_llama, tmp_path, mode, marker):
    out, *_ = saved(mode, tiny_llama, tmp_path / mode)
    (out / marker).unlink()
    with pytest.raises(loading.ModelLoadError, match=rf"{marker} is missing"):
        loading._from_pretrained(str(out), torch.float32)


def _tamper(step0: dict, kind: str):
    """The first block's step of a structured plan, changed one way."""
    heads, channels = step0["heads"] or [[0], [2]], step0["channels"] or [0]
    return {
        "no removed": {k: v for k, v in step0.items() if k != "removed"},
        "removed text": step0 | {"removed": "no"},
        "heads not a list": step0 | {"heads": 3},
        "heads of one kv": step0 | {"heads": heads[:1]},
        "head out of range": step0 | {"heads": [[0], [99]]},
        "head of another kv": step0 | {"heads": [[2], [0]]},
        "head twice": step0 | {"heads": [[0, 0], [2, 3]]},
        "unequal heads": step0 | {"heads": [[0, 1], [2]]},
        "no heads": step0 | {"heads": [[], []]},
        "channel out of range": step0 | {"channels": [0, 10_000]},
        "channel twice": step0 | {"channels": [channels[0], channels[0]]},
        "channels empty": step0 | {"channels": []},
        "channel text": step0 | {"channels": ["0"]},
        "step not an object": [1, 2],
    }[kind]


TAMPERED = ["no removed", "removed text", "heads not a list", "heads of one kv", "head out of range",
            "head of another kv", "head twice", "unequal heads", "no heads", "channel out of range", "channel twice",
            "channels empty", "channel text", "step not an object"]


@pytest.fixture(scope="module")
def structured_dir(tmp_path_factory):
    model = tiny_model("llama", seed=0, frozen=False, vocab_size=128, hidden_size=64, intermediate_size=128,
                       pad_token_id=None)  # LlamaConfig's own ids
    root = tmp_path_factory.mktemp("structured")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("PRUNERZERO_CACHE", str(root / "cache"))  # the removal losses it caches
        out, *_ = saved("structured", model.eval(), root / "saved")
    return out


@pytest.mark.parametrize("kind", TAMPERED)
def test_a_tampered_structure_file_is_named(structured_dir, tmp_path, kind):
    import shutil

    out = shutil.copytree(structured_dir, tmp_path / "copy")
    doc = json.loads((out / "prunerzero_structure.json").read_text())
    doc["plan"][0] = _tamper(doc["plan"][0], kind)
    (out / "prunerzero_structure.json").write_text(json.dumps(doc))
    with pytest.raises(USER_ERRORS) as caught:
        loading._from_pretrained(str(out), torch.float32)
    message = str(caught.value)
    assert "prunerzero_structure.json: plan[0]" in message and "\n" not in message, message


@pytest.mark.parametrize("doc", [{"plan": {}}, {"plan": [None]}, {"plan": "x"}, [], {"format": 1}])
def test_a_structure_file_of_the_wrong_shape_is_named(structured_dir, tmp_path, doc):
    import shutil

    out = shutil.copytree(structured_dir, tmp_path / "copy")
    (out / "prunerzero_structure.json").write_text(json.dumps(doc))
    with pytest.raises(USER_ERRORS, match="prunerzero_structure.json"):
        loading._from_pretrained(str(out), torch.float32)


@pytest.mark.parametrize("change, needle", [
    ({"removed": 3}, "plan.removed must list"),
    ({"removed": [[9, "mlp"]]}, "plan.removed must list"),
    ({"routed": [["0", "mlp"]]}, "plan.routed must list"),
    ({"execution": "fast"}, "plan.execution must be gather or multiply"),
    ({"threshold": "high"}, "plan.threshold must be a finite number"),
    ({"costs": [1.0, 2.0]}, "plan.costs must give a positive number"),
])
def test_a_tampered_skip_plan_is_named(tiny_llama, tmp_path, change, needle):
    out, *_ = saved("skip", tiny_llama, tmp_path / "skip")
    doc = json.loads((out / "prunerzero_skip.json").read_text())
    doc["plan"] |= change
    (out / "prunerzero_skip.json").write_text(json.dumps(doc))
    with pytest.raises(USER_ERRORS, match=f"prunerzero_skip.json: {needle}") as caught:
        loading._from_pretrained(str(out), torch.float32)
    assert "\n" not in str(caught.value)
