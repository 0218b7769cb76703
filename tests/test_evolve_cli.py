"""The evolve/export commands on a toy campaign: run, resume, export, and config errors."""

from pathlib import Path

from typer.testing import CliRunner

from prunerzero.cli_evolve import evolve_app

runner = CliRunner()


def _toml(tmp_path: Path, extra: str = "") -> Path:
    path = tmp_path / "toy.toml"
    path.write_text(f'name = "cli"\nruns_dir = "{tmp_path / "runs"}"\ncache = "{tmp_path / "c.sqlite"}"\n'
                    '[eval]\nmodel = "toy"\n[protocol]\ncalib_windows = 4\neval_windows = 4\n'
                    f'[search]\npopulation = 6\ngenerations = 1\nhall_of_fame = 3\n{extra}')
    return path


def test_evolve_resume_and_export(tmp_path):
    result = runner.invoke(evolve_app, ["evolve", str(_toml(tmp_path))])
    assert result.exit_code == 0, result.output
    (run_dir,) = (tmp_path / "runs").iterdir()
    assert f"run directory: {run_dir}" in result.output and "gen   1/1" in result.output
    assert runner.invoke(evolve_app, ["evolve", "--resume", str(run_dir)]).exit_code == 0
    result = runner.invoke(evolve_app, ["evolve", "--resume", str(run_dir), "--generations", "2"])
    assert result.exit_code == 0 and "gen   2/2" in result.output, result.output
    result = runner.invoke(evolve_app, ["evolve", "--resume", str(run_dir), "--generations", "1"])
    assert result.exit_code == 2 and "already run 2 generations" in result.output
    result = runner.invoke(evolve_app, ["export", str(run_dir), "--top", "2", "--out", str(tmp_path / "m")])
    assert result.exit_code == 0, result.output
    assert sorted(p.name for p in (tmp_path / "m").iterdir()) == [f"{run_dir.name}-1.py", f"{run_dir.name}-2.py"]


def test_bad_config_and_arguments_are_clear_errors(tmp_path):
    result = runner.invoke(evolve_app, ["evolve", str(_toml(tmp_path, "mutation = 0.1\n"))])
    assert result.exit_code == 2 and "search.mutation: unknown key" in result.output
    result = runner.invoke(evolve_app, ["evolve"])
    assert result.exit_code != 0 and "either a CONFIG or --resume" in result.output
    result = runner.invoke(evolve_app, ["evolve", str(_toml(tmp_path)), "--generations", "3"])
    assert result.exit_code != 0 and "use it with --resume" in result.output
    result = runner.invoke(evolve_app, ["export", str(tmp_path)])
    assert result.exit_code == 2 and "hall_of_fame.csv" in result.output


def test_piped_progress_keeps_one_line_per_generation(tmp_path):
    """Not a terminal (CI, | tee, nohup): rich would wrap at 80 columns and split a generation's
    line in two; each line must stay whole."""
    result = runner.invoke(evolve_app, ["evolve", str(_toml(tmp_path))])
    assert result.exit_code == 0, result.output
    lines = [ln for ln in result.output.splitlines() if ln.startswith("gen ")]
    assert len(lines) == 2  # generations 0 and 1
    assert all(len(ln) > 80 and "best" in ln and "unique" in ln and ln.rstrip().endswith("s") for ln in lines)
