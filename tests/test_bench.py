"""The benchmark script runs end to end on CPU at its tiny size and writes a complete report, or
the sections asked for."""

import re
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.real

ROOT = Path(__file__).resolve().parents[1]


def _bench(*args: str, timeout: int = 600) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(ROOT / "experiments" / "bench.py"), *args], capture_output=True,
                          text=True, timeout=timeout)


def _tiny_report(tmp_path, *args: str) -> str:
    out = tmp_path / "BENCH.md"
    proc = _bench("--size", "tiny", "--out", str(out), *args)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return out.read_text()


def test_bench_tiny_writes_every_section(tmp_path):
    text = _tiny_report(tmp_path, "--max-workers", "2")
    for heading in ("Targets", "a. Per-candidate fitness cost", "b. Evaluator throughput", "c. Ray scaling",
                    "d. Search efficiency", "e. Peak memory", "f. Kernel choices, side by side", "g. Search throughput"):
        assert f"## {heading}" in text
    assert re.search(r"\| 2 \| 4 \| [\d.]+ \| [\d.]+ \| [\d.]+ \| [\d.]+ \|", text)  # 2 evaluators, 4 candidates
    spared = [float(x) for x in re.findall(r"\*\*([\d.]+)%\*\* \|", text)]
    assert len(spared) == 2 and all(0 <= x <= 100 for x in spared)  # tree by tree; windows with successive halving
    kernels = re.findall(r"\| ([\d.]+) \| [^|]+ \| ([\d.]+) \| ([\d.]+)x \|", text)
    assert len(kernels) == 4 and all(float(base) > 0 and float(chosen) > 0 for base, chosen, _ in kernels)
    assert len(re.findall(r"\| (?:yes|no) \|", text)) == 12  # each target, met or not
    assert re.search(r"\*\*[\d.]+x\*\* the candidates per CPU-hour", text)  # as 1-thread Ray workers run
    drivers = re.findall(r"\| (in the driver|\d+) \| 2 \| \d+ \| \d+ \| [\d.]+ \| [\d.]+ \| ([\d.]+) \|.*\| ([\d.]+)% \| "
                         r"([\d.]+) \|", text)
    assert len(drivers) == 2 and drivers[0][0] == "in the driver" and drivers[1][0].isdigit()  # then in workers
    assert all(float(ms) > 0 and float(share) > 0 for _, ms, share, _ in drivers) and float(drivers[1][3]) > 0
    assert re.search(r"\| bf16, 1-thread worker \| [\d.]+ \| [\d.]+% \| \d+ \| [\d.]+ \|", text)  # the projection
    per_n = re.search(r"^\| evaluators N \|.*\n\|[-:|]+\|\n((?:\|.*\|\n)+)", text, re.M).group(1).splitlines()
    assert [row.split(" | ")[0] for row in per_n] == ["| 1", "| 2", "| 5", "| 10", "| 20", "| 50", "| 100"]
    assert "| OOS processes w | d(w) ms |" in text  # the driver's seconds split: OOS over w processes, the rest
    params = float(re.search(r"parameters alone: (\d+) MiB", text).group(1))
    loaded = float(re.search(r"\| loading an evaluator \| (\d+) \|", text).group(1))
    assert loaded >= params  # the process held at least the parameters


def test_bench_runs_only_the_sections_asked(tmp_path, capsys):
    sys.path.insert(0, str(ROOT / "experiments"))
    import bench  # in this process: the subprocess above already proves the script runs on its own

    out = tmp_path / "BENCH.md"
    bench.main(["--size", "tiny", "--sections", "d", "--out", str(out)])  # d: a toy campaign, no model forward
    text = out.read_text()
    assert "--sections d" in text and "## d. Search efficiency" in text
    assert "## a. Per-candidate" not in text and "## c. Ray scaling" not in text and "## f. Kernel" not in text
    assert len(re.findall(r"\| not run \|", text)) == 11  # d measures one target, the evaluations spared


def test_bench_refuses_unknown_sections():
    proc = _bench("--sections", "ax", timeout=120)
    assert proc.returncode == 2 and "--sections 'ax'" in proc.stderr


def test_merging_keeps_the_sections_not_run_and_says_which_run_wrote_them():
    sys.path.insert(0, str(ROOT / "experiments"))
    from bench_report import merge_reports

    old = ("# r\n\nWritten by `old` on 2026-01-01.\n\n## Targets\n\n| t | v | b | m |\n|---|\n| one | 1 | x | yes |\n"
           "| two | 2 | x | no |\n\n## a. First\n\nold a\n\n## c. Third\n\nold c\n")
    new = ("# r\n\nWritten by `new` on 2026-02-02.\n\n## Targets\n\n| t | v | b | m |\n|---|\n| one | not run | x | - |\n"
           "| two | 3 | x | yes |\n| three | not run | x | - |\n\n## b. Second\n\nnew b\n\n## c. Third\n\nnew c\n")
    merged = merge_reports(old, new)
    assert "| one | 1 | x | yes |" in merged and "| two | 3 | x | yes |" in merged and "| three | not run |" in merged
    assert merged.index("## a. First") < merged.index("## b. Second") < merged.index("## c. Third")
    assert "old a" in merged and "new c" in merged and "old c" not in merged
    assert "_Kept from an earlier report: written by `old` on 2026-01-01._" in merged
    assert merge_reports(merged, new) == merged  # a second merge keeps the provenance it had
