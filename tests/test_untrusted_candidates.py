"""Issue 29, item 2: data never runs code. A metric named in a candidate file, a campaign config or
a run directory may be a built-in, an expression or an exported file (its EXPRESSION read with
`ast`); a Python file without one is refused, naming the file and the field, and never imported.
A metric file the user names on the command line is imported only after every other input is
checked."""

import json

import pytest
from typer.testing import CliRunner

from prunerzero.cli import app
from prunerzero.evolve.campaign import resume_campaign, run_campaign
from prunerzero.evolve.toy import toy_config
from prunerzero.primitives.metric import Metric, UnknownMetricError, builtin, resolve_metric
from prunerzero.pruning.candidates import CandidateError, read_candidate_file

runner = CliRunner()
EVIL = ("import pathlib\n"
        "pathlib.Path(__file__).with_suffix('.ran').write_text('ran')\n"
        "def metric(W, G=None, X=None):\n"
        "    return W.abs()\n")


@pytest.fixture
def evil(tmp_path):
    """A Python metric without EXPRESSION that leaves a `.ran` file beside itself when imported."""
    path = tmp_path / "evil.py"
    path.write_text(EVIL)
    return path


def ran(path) -> bool:
    return path.with_suffix(".ran").exists()


def candidate_file(tmp_path, **data):
    path = tmp_path / "candidate.json"
    path.write_text(json.dumps(data))
    return path


@pytest.fixture
def no_model_load(monkeypatch):
    """A command that got as far as loading the model fails at once (and says so)."""
    def refuse(*args, **kwargs):
        raise RuntimeError("the model was loaded")
    monkeypatch.setattr("prunerzero.jobs.Session", refuse)


def test_a_metric_from_data_is_read_never_imported(tmp_path, evil):
    with pytest.raises(UnknownMetricError, match=r"evil.py' has no EXPRESSION.*never runs code"):
        resolve_metric(str(evil), allow_code=False)
    exported = tmp_path / "exported.py"
    exported.write_text(builtin("wanda").source() + "\n\ndef other(W, G=None, X=None):\n    return W\n")
    assert resolve_metric(str(exported), allow_code=False).key == builtin("wanda").key
    with pytest.raises(UnknownMetricError, match=r"named with a function \('other'\)"):
        resolve_metric(f"{exported}:other", allow_code=False)  # a function is only reached by importing
    assert not ran(evil)


@pytest.mark.parametrize("data, field", [
    ({"kind": "allocation", "sparsities": [0.5, 0.5]}, "metric"),
    ({"kind": "expert_plan", "keep": [[0, 1]]}, "order"),
])
def test_a_candidate_file_naming_python_code_is_refused_unrun(tmp_path, evil, data, field):
    import prunerzero.pruning.modes  # noqa: F401  (registers the expert_plan kind)

    path = candidate_file(tmp_path, **data, **{field: f"{evil}:metric"})
    with pytest.raises(CandidateError, match=rf"candidate.json: .*field '{field}': metric file .*evil.py"):
        thing = read_candidate_file(path)
        getattr(thing, "key", None)  # what the old code did next: the key resolved (imported) the metric
    assert not ran(evil)


def test_an_allocation_of_an_exported_metric_still_loads(tmp_path):
    exported = tmp_path / "found.py"
    exported.write_text(Metric.from_expression("mul(abs(W), X)").source())
    allocation = read_candidate_file(candidate_file(tmp_path, kind="allocation", metric=str(exported),
                                                    sparsities=[0.4, 0.6]))
    assert isinstance(allocation.resolved, Metric) and allocation.resolved.formula == "mul(abs(W), X)"


def test_prune_checks_the_model_before_importing_a_metric_file(tmp_path, evil):
    result = runner.invoke(app, ["prune", "--out", str(tmp_path / "out"), "--model", "no-such-model",
                                 "--metric", f"{evil}:metric"])
    assert result.exit_code == 2 and "unknown model 'no-such-model'" in result.output
    assert not ran(evil)


def test_leaderboard_refuses_a_candidate_file_naming_code(tmp_path, evil, no_model_load):
    path = candidate_file(tmp_path, kind="allocation", metric=str(evil), sparsities=[0.5] * 30)
    result = runner.invoke(app, ["leaderboard", "--metrics", str(path), "--csv", str(tmp_path / "lb.csv")])
    assert result.exit_code == 2 and "field 'metric'" in result.output and "evil.py" in result.output
    assert "Traceback" not in result.output and not ran(evil)


def test_an_allocation_campaign_never_imports_its_metric(tmp_path, evil):
    ga = {"search": {"problem": "allocation", "population": 4, "generations": 1, "hall_of_fame": 2},
          "problem": {"metric": str(evil)}}
    with pytest.raises(ValueError, match=r"problem.metric: metric file .*evil.py' has no EXPRESSION"):
        run_campaign(toy_config(tmp_path, **ga))
    assert not ran(evil)
    run_dir = tmp_path / "shared-run"  # a run directory someone sent: resuming it must not run its metric
    run_dir.mkdir()
    (run_dir / "config.json").write_text(json.dumps(toy_config(tmp_path, **ga).to_dict()))
    with pytest.raises(ValueError, match="problem.metric"):
        resume_campaign(run_dir)
    assert not ran(evil)
