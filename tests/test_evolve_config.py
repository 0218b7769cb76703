"""Campaign configuration: validation with errors that name the key, round trips, shipped configs."""

from pathlib import Path

import pytest

from prunerzero.evolve.config import CampaignConfig, ConfigError, from_dict, load_config

EXPERIMENTS = Path(__file__).resolve().parents[1] / "experiments"


@pytest.mark.parametrize("data, key", [
    ({"search": {"populaton": 10}}, "search.populaton: unknown key"),
    ({"colour": "red"}, "colour: unknown key"),
    ({"protocol": {"seq_length": 8}}, "protocol.seq_length: unknown key"),
    ({"search": {"population": "10"}}, "search.population: expected int"),
    ({"search": {"cx_prob": True}}, "search.cx_prob: expected float"),
    ({"search": {"cx_prob": 1.5}}, "search.cx_prob: must be in"),
    ({"search": {"operators": "mine"}}, "search.operators: unknown operator set"),
    ({"backend": {"kind": "dask"}}, "backend.kind"),
    ({"target": {"pattern": "5:4"}}, "target: unknown pattern"),
    ({"eval": {"pattern": "5:4"}}, "target: unknown pattern"),  # the [eval] key of earlier versions
    ({"eval": {"sparsity": 0.5}, "target": {"sparsity": 0.6}}, "eval.sparsity: given in \\[eval\\] and in \\[target\\]"),
    ({"target": {"sparsity": "half"}}, "target.sparsity: expected float"),
    ({"target": {"keep": 4}}, "target.keep: unknown key"),
    ({"eval": {"mode": "nope"}}, "eval: unknown pruning mode"),
    ({"eval": {"fitness": "bleu"}}, "eval: unknown fitness"),
    ({"search": {"problem": "nope"}}, "search.problem: unknown problem"),
    ({"protocol": {"eval_windows": 0}}, "protocol: protocol eval_windows must be >= 1"),
    ({"fidelity": {"rungs": 5}, "protocol": {"eval_windows": 8}}, "fidelity.rungs"),
    ({"search": {"elites": 30, "hall_of_fame": 20}}, "search.elites"),
    ({"search": {"oos_workers": -1}}, "search.oos_workers: must be in"),
])
def test_invalid_configs_name_the_key(data, key):
    with pytest.raises(ConfigError, match=key.replace("(", r"\(")):
        from_dict(data)


def test_resolved_config_round_trips_and_floats_accept_ints():
    cfg = from_dict({"name": "x", "eval": {"sparsity": 1 - 0.5}, "search": {"cx_prob": 1},
                     "protocol": {"seq_len": 64}})
    assert cfg.search.cx_prob == 1.0 and cfg.protocol.seq_len == 64
    assert from_dict(cfg.to_dict()) == cfg
    assert cfg.eval_spec().split == "valid"  # a search never sees the test split
    assert cfg.with_backend(kind="ray", workers=3).backend.workers == 3
    assert cfg.with_backend(kind="ray").search == cfg.search


def test_load_config_reports_missing_file_and_bad_toml(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "none.toml")
    bad = tmp_path / "bad.toml"
    bad.write_text("name = \n")
    with pytest.raises(ConfigError, match="not valid TOML"):
        load_config(bad)


@pytest.mark.parametrize("path", sorted(EXPERIMENTS.glob("*.toml")), ids=lambda p: p.name)
def test_shipped_campaign_configs_are_valid(path):
    cfg = load_config(path)
    assert isinstance(cfg, CampaignConfig) and cfg.eval.model != "toy"


def test_smoke_config_is_small_and_the_full_one_uses_the_default_protocol():
    smoke = load_config(EXPERIMENTS / "smoke.toml")
    full = load_config(EXPERIMENTS / "smollm2-unstructured50.toml")
    assert smoke.protocol.seq_len * (smoke.protocol.eval_windows + smoke.protocol.calib_windows) <= 4096
    assert full.protocol == CampaignConfig().protocol
    assert full.backend.kind == "ray" and full.backend.gpus_per_worker > 0
