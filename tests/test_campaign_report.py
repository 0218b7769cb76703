"""The campaign report reads a run directory and the leaderboard and writes what was measured."""

import subprocess
import sys
from pathlib import Path

import pandas as pd

from prunerzero.evolve.campaign import run_campaign
from prunerzero.evolve.toy import toy_config
from prunerzero.fitness.cache import FitnessCache
from prunerzero.primitives.metric import resolve_metric
from prunerzero.leaderboard import COLUMNS

from test_evolve_campaign import QUIET

ROOT = Path(__file__).resolve().parents[1]


def _row(metric: str, formula: str, pattern: str, perplexity: float, protocol_id: str = "p1") -> dict:
    row = dict.fromkeys(COLUMNS, "")
    row.update(metric=metric, formula=formula, key=formula, model="toy", corpus="austen", protocol="calib 4x8",
               protocol_id=protocol_id, split="test", sparsity=0.5, pattern=pattern, group="row",
               perplexity=perplexity, dense_perplexity=10.0, eval_tokens=64)
    return row


def test_report_has_cost_history_hall_of_fame_and_test_rows(tmp_path):
    run_dir = run_campaign(toy_config(tmp_path, search={"generations": 2}), console=QUIET)
    board = tmp_path / "lb.csv"
    pd.DataFrame([_row("wanda", "mul(abs(W), sqrt(X))", "unstructured", 20.0),
                  _row("wanda", "mul(abs(W), sqrt(X))", "2:4", 40.0),
                  _row(f"{run_dir.name}-1", "mul(abs(W), X)", "unstructured", 19.0),
                  _row("wanda", "mul(abs(W), sqrt(X))", "unstructured", 99.0, protocol_id="other")],
                 columns=COLUMNS).to_csv(board, index=False)
    proc = subprocess.run([sys.executable, str(ROOT / "experiments" / "campaign_report.py"), str(run_dir),
                           "--leaderboard", str(board)], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    text = (run_dir / "REPORT.md").read_text()
    assert (run_dir / "history.png").stat().st_size > 0
    history = pd.read_csv(run_dir / "history.csv")
    assert f"evaluated with a forward {history['evaluations'].sum()}" in text
    by_generation = text.split("## Fitness by generation")[1].split("## Hall of fame")[0]
    assert [line.split(" | ")[0] for line in by_generation.splitlines() if line[:3] in ("| 0", "| 1", "| 2")] == \
        ["| 0", "| 1", "| 2"]
    assert f"| {run_dir.name}-1 | `mul(abs(W), X)` | 19.00 | – | -5.0% |" in text
    assert "| wanda | `mul(abs(W), sqrt(X))` | 20.00 | 40.00 | +0.0% |" in text  # the other protocol's 99 is not used
    assert "Baselines without a row under this protocol: magnitude, ria" in text


def test_report_scores_baselines_on_the_search_fitness_and_says_when_no_metric_was_exported(tmp_path):
    run_dir = run_campaign(toy_config(tmp_path, search={"generations": 1}), console=QUIET)
    command = [sys.executable, str(ROOT / "experiments" / "campaign_report.py"), str(run_dir),
               "--leaderboard", str(tmp_path / "none.csv"), "--baselines", "magnitude,wanda"]
    proc = subprocess.run(command, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    text = (run_dir / "REPORT.md").read_text()
    assert f"No leaderboard rows for `{run_dir.name}-*` yet" in text
    section = text.split("## Hand-made metrics on the search's fitness")[1].split("## On the test split")[0]
    rows = {line.split(" | ")[0][2:]: float(line.split(" | ")[2]) for line in section.splitlines() if line.startswith("| ") and "`" in line}
    assert set(rows) == {"magnitude", "wanda"} and rows["wanda"] < rows["magnitude"]  # the toy has outlier channels
    cache = FitnessCache(tmp_path / "fitness.sqlite")  # measured once, kept for the next report
    spec = toy_config(tmp_path).eval_spec()
    key = resolve_metric("wanda").key
    assert rows["wanda"] == round(cache.get_many([key], spec.cache_key(), 8)[key].fitness, 2)
