"""Export: standalone modules whose scores equal the framework's exactly, loadable as metrics."""

import importlib.util
import io

import pytest
import torch
from rich.console import Console

from prunerzero.evolve.campaign import run_campaign
from prunerzero.evolve.export import export_run, read_hall_of_fame
from prunerzero.evolve.toy import toy_config
from prunerzero.primitives.metric import Metric, resolve_metric


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    root = tmp_path_factory.mktemp("export")
    run_dir = run_campaign(toy_config(root, search={"generations": 1}), console=Console(file=io.StringIO()))
    return run_dir, export_run(run_dir, top=3, out_dir=root / "metrics")


def _load(path):
    spec = importlib.util.spec_from_file_location(path.stem.replace("-", "_"), path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_exported_modules_score_exactly_like_the_framework(exported):
    run_dir, paths = exported
    rows = read_hall_of_fame(run_dir)[:3]
    assert [p.name for p in paths] == [f"{run_dir.name}-{r['rank']}.py" for r in rows]
    g = torch.Generator().manual_seed(0)
    W, G, X = torch.randn(16, 24, generator=g), torch.rand(16, 24, generator=g), torch.rand(24, generator=g)
    for path, row in zip(paths, rows):
        module = _load(path)
        assert module.EXPRESSION == row["formula"]
        assert torch.equal(module.metric(W, G, X), Metric.from_expression(row["formula"])(W, G, X))
        imports = [line for line in path.read_text().splitlines() if line.startswith(("import ", "from "))]
        assert imports == ["import torch"]


def test_exported_docstring_carries_formula_and_provenance(exported):
    run_dir, paths = exported
    doc = _load(paths[0]).__doc__
    row = read_hall_of_fame(run_dir)[0]
    for text in (row["formula"], f"run {run_dir.name}", "model: toy", "corpus: austen", "protocol: calib 4x1024",
                 "valid split", "generation:"):
        assert text in doc


def test_exported_file_is_accepted_wherever_a_metric_is(exported):
    run_dir, paths = exported
    metric = resolve_metric(f"{paths[0]}:metric")
    assert metric.formula == read_hall_of_fame(run_dir)[0]["formula"]
    assert metric.name == paths[0].stem


def test_export_of_a_directory_without_results_says_so(tmp_path):
    with pytest.raises(FileNotFoundError, match="hall_of_fame.csv"):
        export_run(tmp_path, top=1, out_dir=tmp_path / "m")
