"""Export of a shared run directory (issue 29, item 1): every value that reaches a file name or
generated source is checked or escaped; nothing is written outside --out, no value runs."""

import ast
import csv
import json

import pytest

from prunerzero.evolve.export import ExportError, export_run
from prunerzero.evolve.toy import toy_config
from prunerzero.primitives.metric import Metric

FIELDS = ["rank", "fitness", "windows", "formula", "key", "generation", "size", "depth"]
GOOD = {"rank": "1", "fitness": "12.5", "windows": "8", "formula": "mul(abs(W), X)", "key": "X*Abs(W)",
        "generation": "3", "size": "4", "depth": "3"}


def _run_dir(root, name="toy-20260101-000000", **changes):
    run_dir = root / name
    run_dir.mkdir(parents=True)
    (run_dir / "config.json").write_text(json.dumps(toy_config(root).to_dict()))
    with (run_dir / "hall_of_fame.csv").open("w", newline="") as f:
        writer = csv.DictWriter(f, FIELDS)
        writer.writeheader()
        writer.writerow(GOOD | changes)
    return run_dir


def _files(root):
    return sorted(str(p.relative_to(root)) for p in root.rglob("*") if p.is_file())


def test_a_clean_run_directory_still_exports(tmp_path):
    (path,) = export_run(_run_dir(tmp_path), top=1, out_dir=tmp_path / "out")
    assert path == tmp_path / "out" / "toy-20260101-000000-1.py"
    assert "generation: 3" in ast.get_docstring(ast.parse(path.read_text()))


@pytest.mark.parametrize("field, value, needle", [
    ("rank", "1/../../escaped/sitecustomize", "hall_of_fame.csv row 1: rank '1/../../escaped/sitecustomize' is not an integer"),
    ("rank", "../x", "rank '../x' is not an integer"),
    ("rank", "0", "rank '0' is not an integer >= 1"),
    ("generation", '3"""\nimport os; os.system("echo pwned")\n"""', "generation"),
    ("windows", "8 windows; evil", "windows '8 windows; evil' is not an integer"),
    ("fitness", "nan", "fitness 'nan' is not a finite number"),
    ("fitness", "1e400", "fitness '1e400' is not a finite number"),
    ("formula", "__import__('os').system('echo pwned')", "hall_of_fame.csv rank 1: malformed expression"),
])
def test_a_crafted_hall_of_fame_field_is_refused_naming_it_and_nothing_is_written(tmp_path, field, value, needle):
    run_dir = _run_dir(tmp_path / "shared", **{field: value})
    before = _files(tmp_path)
    with pytest.raises(ExportError, match=needle.replace("(", r"\(").replace(")", r"\)")):
        export_run(run_dir, top=1, out_dir=tmp_path / "out")
    assert _files(tmp_path) == before


def test_a_run_directory_name_that_is_not_a_plain_name_is_refused(tmp_path):
    run_dir = _run_dir(tmp_path, name='run"""; import os')
    with pytest.raises(ExportError, match="run directory name"):
        export_run(run_dir, top=1, out_dir=tmp_path / "out")
    assert not (tmp_path / "out").exists()


HOSTILE = ['"""\nimport os\nos.system("echo pwned")\n"""', 'ends with a quote"', 'a backslash \\', '\\"""',
           "nul \x00 byte", "carriage\rreturn", "line\u2028separator", "form\x0cfeed", "\\N{BULLET}", "unicode é ✓"]


@pytest.mark.parametrize("text", HOSTILE, ids=range(len(HOSTILE)))
def test_no_provenance_text_breaks_out_of_the_generated_docstring(text):
    metric = Metric.from_expression("mul(abs(W), X)", name=f"m{text}")
    module = ast.parse(metric.source({"generation": text, text: "value"}))  # a NUL or a broken literal: no parse
    doc = ast.get_docstring(module, clean=False)
    assert f"generation: {text}" in doc and f"{text}: value" in doc and f"Pruning metric m{text}" in doc
    plain = ast.parse(Metric.from_expression("mul(abs(W), X)", name="m").source())
    assert [ast.dump(n) for n in module.body[1:]] == [ast.dump(n) for n in plain.body[1:]]  # no statement added
