"""Campaigns name their mode and target; run directories hold plain data only."""

import json
import os
import pickle

import pytest

from prunerzero.evolve.campaign import LEGACY_CHECKPOINT, resume_campaign, run_campaign
from prunerzero.evolve.config import ConfigError, from_dict
from prunerzero.evolve.toy import toy_config
from prunerzero.fitness.spec import EvalSpec

from test_evolve_campaign import QUIET, _hof, _search_trace


def test_explicit_unstructured_mode_equals_the_config_of_earlier_versions(tmp_path):
    legacy = toy_config(tmp_path / "a", eval={"sparsity": 0.6, "group": "row"})
    explicit = toy_config(tmp_path / "b", eval={"mode": "unstructured"}, target={"sparsity": 0.6})
    assert legacy.eval_spec() == explicit.eval_spec()
    assert explicit.target == {"sparsity": 0.6, "pattern": "unstructured", "group": "row", "update": "none",
                              "allocation": "uniform"}
    a, b = run_campaign(legacy, console=QUIET), run_campaign(explicit, console=QUIET)
    assert _hof(a) == _hof(b) and _search_trace(a) == _search_trace(b)
    written = json.loads((b / "config.json").read_text())
    assert written["eval"]["mode"] == "unstructured" and written["target"]["sparsity"] == 0.6
    assert "sparsity" not in written["eval"]


def test_the_cache_key_of_the_unstructured_perplexity_spec_is_the_earlier_versions(tmp_path):
    import hashlib
    from dataclasses import asdict

    spec = EvalSpec(model="m", target={"sparsity": 0.6, "pattern": "2:4"})
    earlier = {"model": "m", "corpus": "austen", "sparsity": 0.6, "pattern": "2:4", "group": "row", "split": "valid",
               "protocol": asdict(spec.protocol), "dtype": "auto"}
    assert spec.cache_key() == hashlib.sha256(json.dumps(earlier, sort_keys=True).encode()).hexdigest()[:16]
    assert EvalSpec(model="m", target={"sparsity": 0.6, "pattern": "2:4"}, fitness="kl").cache_key() != spec.cache_key()


class Exploit:
    """Unpickling this creates a file: what a crafted checkpoint could do."""

    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return (open, (self.path, "w"))


def test_a_pickled_checkpoint_is_refused_unread(tmp_path):
    run_dir = run_campaign(toy_config(tmp_path, search={"generations": 1}), console=QUIET)
    (run_dir / "checkpoint.json").unlink()
    marker = tmp_path / "pwned"
    (run_dir / LEGACY_CHECKPOINT).write_bytes(pickle.dumps({"state": Exploit(str(marker))}))
    with pytest.raises(ConfigError, match="pickled checkpoint .* not read"):
        resume_campaign(run_dir, console=QUIET)
    assert not marker.exists()


@pytest.mark.parametrize("content, needle", [
    (b"", "not a valid checkpoint"), (b"\x80\x04garbage", "not a valid checkpoint"),
    (b'{"version": 2, "config": {}}', "no engine state"),
    (b'{"version": 2, "config": {}, "engine": {"generation": "x"}}', "engine.generation must be a int"),
])
def test_a_damaged_checkpoint_is_an_error_naming_the_file(tmp_path, content, needle):
    run_dir = run_campaign(toy_config(tmp_path, search={"generations": 1}), console=QUIET)
    (run_dir / "checkpoint.json").write_bytes(content)
    with pytest.raises(ConfigError, match=needle) as e:
        resume_campaign(run_dir, console=QUIET)
    assert "checkpoint.json" in str(e.value)


def test_a_checkpoint_whose_population_does_not_decode_is_an_error_naming_the_file(tmp_path):
    run_dir = run_campaign(toy_config(tmp_path, search={"generations": 1}), console=QUIET)
    state = json.loads((run_dir / "checkpoint.json").read_text())
    state["engine"]["population"][0][0] = "frob(W)"
    (run_dir / "checkpoint.json").write_text(json.dumps(state))
    with pytest.raises(ConfigError, match="checkpoint.json: its engine state does not load"):
        resume_campaign(run_dir, console=QUIET)


def test_checkpoints_are_json_with_the_rng_states(tmp_path):
    run_dir = run_campaign(toy_config(tmp_path, search={"generations": 1}), console=QUIET)
    state = json.loads((run_dir / "checkpoint.json").read_text())
    assert set(state["engine"]["rng"]) == {"python", "numpy", "torch"}
    assert state["engine"]["problem"] == "metric" and isinstance(state["engine"]["population"][0][0], str)
    assert from_dict(state["config"]).search.problem == "metric"
    assert not any(p.suffix == ".pkl" for p in run_dir.iterdir())
    assert os.stat(run_dir / "checkpoint.json").st_size > 0
