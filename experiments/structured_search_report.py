"""results/STRUCTURED-SEARCH.md from what the structured search's scripts wrote: the fitness study
(structured_search_study.py), the campaign's run directory and the bench (structured_search_bench.py).

    python experiments/structured_search_report.py --run results/runs/<structured run>
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from skip_search_report import campaign_section, study_lines, write_report  # noqa: E402


CONFIG = "experiments/smollm2-structured80-lsq.toml"
SEARCHED_ELSEWHERE = "discovered unstructured metric"  # found by the unstructured campaign: not hand-made


def _shown(candidate) -> str:
    return f"method {candidate['name']}" if isinstance(candidate, dict) else candidate


def study_section(study: dict) -> list[str]:
    ref = study["reference"]
    return study_lines(
        study, "metrics for structured pruning",
        f"Reference: {len(ref)} metrics that give distinct plans, each through the MILP at "
        f"{study['target']['latency']:g}x measured prefill latency and the LSQ refit, test perplexity on the "
        f"full protocol ({study['protocol']}, test split of austen).",
        ("reference metric", "expression"),
        [(study["names"][k], _shown(study["candidates"][k]), ref[k][0]) for k in ref],
        "Cheap settings on the valid split (perplexity or KL to the dense model; windows x tokens; calibration "
        "16 windows of the same length; the LSQ refit inside the fitness or not); Spearman against the reference "
        "over all metrics and over the better half (where a search chooses); seconds: median per candidate "
        "(importance, MILP, slicing, refit, forward, restore).")


def bench_section(bench: dict) -> list[str]:
    sel = bench["selection"]
    out = ["## 3. The winner against every hand-made importance, the same LSQ refit on both sides", "",
           f"Command: `{bench['command']}`.", "",
           f"Winner chosen on the valid split ({bench['protocol']}) among the hall of fame: **{sel['winner']}** "
           f"`{sel['formula']}`.", "", "| hall of fame | valid ppl |", "|---|---:|"]
    for name, value in sorted(sel["valid"].items(), key=lambda kv: kv[1]):
        out.append(f"| {name} | {value:.2f} |")
    draws = bench["draws"]
    names = [n for n in next(iter(draws.values())) if n != "load_1min"]
    out += ["", f"Test perplexity ({bench['protocol']}, the seed and corpus per draw), every candidate through the "
            "MILP at 0.8x measured prefill latency with the LSQ refit (ShortGPT: whole blocks, nothing to refit).", "",
            "| model:corpus:seed | " + " | ".join(names) + " | winner vs best hand-made | winner vs the discovered "
            "unstructured metric | load |", "|---|" + "---:|" * (len(names) + 2) + "---|"]
    for draw, got in draws.items():
        values = [got[n]["perplexity"] for n in names]
        winner = got["searched (winner)"]["perplexity"]
        best = min(got[n]["perplexity"] for n in names if n not in ("searched (winner)", SEARCHED_ELSEWHERE))
        load = "/".join(f"{x:.1f}" for x in got["load_1min"])
        out.append(f"| {draw} | " + " | ".join(f"{v:.2f}" for v in values) + f" | {100 * (winner / best - 1):+.1f}% | "
                   f"{100 * (winner / got[SEARCHED_ELSEWHERE]['perplexity'] - 1):+.1f}% | {load} |")
    return out + [""]


def main(argv=None) -> None:
    write_report(argv, "STRUCTURED-SEARCH", "structured_search_report.py",
                 "Searching the importance metric for structured pruning (smollm2-135m, 0.8x prefill latency, LSQ)",
                 study_section, lambda run: campaign_section(run, CONFIG, "metrics", "valid ppl (1x512)"),
                 bench_section)


if __name__ == "__main__":
    main()
