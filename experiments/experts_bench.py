"""The experts mode on the real-weight derived MoE (smollm2-135m-moe): the MoE against the dense
model, one-shot expert pruning at 4 of 8 experts per layer, merging, the EEP search, fewer active
experts (speed and peak memory measured here), and a discovered metric if a campaign ran.

    python experiments/experts_bench.py                  # everything (~1 h on 2 CPU cores)
    python experiments/experts_bench.py --sections ab    # a subset: a MoE, b one-shot, c EEP, d speed, e campaign

Sections (all perplexities on austen's test split unless said):
 a. dense smollm2-135m against the MoE at top-k 1, 2 (shipped), 3, 4 and 8;
 b. 4 of 8 experts kept per layer, one shot: random, frequency, gate mass, REAP, NAEE, metrics
    (reduced over each expert, times REAP or alone), each without and with aligned merging;
 c. EEP: stage 1 (which experts each layer keeps) from the best one-shot choice, stage 2 (merge
    coefficients) on its result, both through the campaign machinery (run directory, checkpoints,
    fitness cache) with the valid split as fitness; test perplexity of both stages' best;
 d. top-k − 1 (2 → 1 active experts), unpruned and at 4 of 8: prefill and decode tokens/s timed
    interleaved against the top-2 MoE (fitness/speed.py), and the peak resident memory of a fresh
    process that loads each saved model and runs one prefill;
 e. the metric a `mode = "experts"` campaign discovered (`--campaign RUN_DIR`), beside frequency and
    REAP at the same budget.
Writes results/EXPERTS.md and results/experts_bench.json; leaderboard rows to results/leaderboard.csv.
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from prunerzero import leaderboard
from prunerzero.core.paths import cache_dir
from prunerzero.core.protocol import Protocol
from prunerzero.core.tables import markdown_table
from prunerzero.evolve.campaign import run_campaign
from prunerzero.evolve.config import from_dict
from prunerzero.evolve.problems import make_problem
from prunerzero.fitness.session import Session, count_params
from prunerzero.fitness.spec import EvalSpec
from prunerzero.fitness.speed import compare, machine, ratio
from prunerzero.jobs import leaderboard_row
from prunerzero.pruning.candidates import decode

MOE = "smollm2-135m-moe"
KEEP = 4
# (label, candidate, target fields beyond experts = KEEP)
ONE_SHOT = [
    ("random", "random", {}),
    ("frequency", "frequency", {}),
    ("gate mass", "gate", {}),
    ("REAP (gate x output norm)", "reap", {}),
    ("NAEE (subset enumeration)", "naee", {}),
    ("wanda x REAP", "wanda", {"signal": "reap"}),
    ("wanda x frequency", "wanda", {"signal": "frequency"}),
    ("magnitude x REAP", "magnitude", {"signal": "reap"}),
    ("wanda alone", "wanda", {"signal": "none"}),
]
MERGED = [  # merging on the two best-informed choices: aligned averages (full, quarter weight), least-squares refit
    ("REAP + merge", "reap", {"merge": "aligned"}),
    ("REAP + merge x0.25", "reap", {"merge": "aligned", "merge_weight": 0.25}),
    ("NAEE + merge", "naee", {"merge": "aligned"}),
    ("REAP + refit", "reap", {"merge": "refit"}),
    ("NAEE + refit", "naee", {"merge": "refit"}),
]


def row(label, candidate, fields, ppl, params, **extra) -> dict:
    out = {"method": label, "candidate": candidate, "target": fields, "perplexity": ppl, "params": params, **extra}
    print(json.dumps(out), flush=True)
    return out


_MOE: dict = {}  # the unpruned MoE's (test perplexity, parameters) per session: every row's reference


def moe_reference(ev: Session) -> tuple[float, int]:
    if id(ev) not in _MOE:
        _MOE[id(ev)] = (ev.measure().perplexity, count_params(ev.model))
    return _MOE[id(ev)]


def saving_to(folder: Path):
    """An `observe` hook of Session.trial: the mode saves the pruned model (and the tokenizer)."""
    @contextlib.contextmanager
    def save(session, report):
        session.mode.save(session.ctx, report, folder)
        session.lm.tokenizer.save_pretrained(folder)
        yield {"saved": str(folder)}
    return save


def prune_measure(ev: Session, candidate, fields: dict, keep_model: bool = False, label: str = ""):
    """(test perplexity, parameters, report, a copy of the pruned model or None, its saved folder or
    None, the leaderboard row or None) through Session.trial; the MoE restored. With a `label`,
    the row the CLI would write for this trial (jobs.leaderboard_row)."""
    target = ev.mode.make_target({"experts": KEEP, **fields})
    thing = ev.candidate(candidate) if isinstance(candidate, str) else candidate
    saved = Path(tempfile.mkdtemp(prefix="experts_bench_")) if keep_model else None
    trial = ev.trial(thing, target, keep=keep_model, observe=saving_to(saved) if saved else None)
    board = None
    if label:
        board = leaderboard_row(ev, trial, (label, str(candidate), f"experts:{label}", thing), target,
                                *moe_reference(ev))
    return trial.perplexity.perplexity, trial.params, trial.report, trial.pruned, saved, board


# ------------------------------------------------------------------ a: the MoE
def section_a(ev: Session, dense_ppl: float) -> list[dict]:
    rows = [row("dense smollm2-135m", "", {}, dense_ppl, None)]
    for k in (1, 2, 3, 4, 8):
        ppl, n, *_ = prune_measure(ev, "reap", {"experts": 8, "top_k": k})
        rows.append(row(f"MoE, top-{k}" + (" (shipped)" if k == 2 else ""), "", {"top_k": k}, ppl, n))
    return rows


# ------------------------------------------------------------------ b: one shot
def section_b(ev: Session) -> list[dict]:
    rows = []
    for label, cand, fields in ONE_SHOT + MERGED:
        t0 = time.perf_counter()
        ppl, n, report, _, _, board = prune_measure(ev, cand, {"merge": "none", **fields}, label=label)
        rows.append(row(label, cand, {"merge": "none", **fields}, ppl, n, seconds=round(time.perf_counter() - t0, 1),
                        keep=report.extra["plan"]["keep"], leaderboard=board))
    return rows


# ------------------------------------------------------------------ c: EEP
def eep_config(name: str, protocol: Protocol, problem: dict, fields: dict, args) -> dict:
    return {"name": name, "runs_dir": args.runs_dir, "cache": str(cache_dir("fitness") / "experts_bench.sqlite"),
            "eval": {"model": MOE, "mode": "experts", "device": "cpu"}, "target": {"experts": KEEP, **fields},
            "protocol": {"seq_len": protocol.seq_len, "calib_windows": protocol.calib_windows,
                         "eval_windows": args.eep_windows},
            "search": {"problem": "experts", "population": args.population, "generations": args.generations,
                       "hall_of_fame": 3, "elites": 2, "cx_prob": 0.5, "mut_prob": 0.5, "seed": 0},
            "problem": problem, "backend": {"kind": "serial"}}


def best_of(run_dir: Path) -> dict:
    with open(run_dir / "hall_of_fame.csv", newline="") as f:
        return next(csv.DictReader(f))


def eep_stage(ev: Session, protocol: Protocol, name: str, problem: dict, fields: dict, args, label: str):
    """One EEP stage through the campaign machinery: (its best row of hall_of_fame.csv, its best
    plan, test perplexity, parameters, seconds, run directory, leaderboard row)."""
    config = from_dict(eep_config(name, protocol, problem, fields, args))
    t0 = time.perf_counter()
    run = run_campaign(config)
    best = best_of(run)
    made = make_problem(config)
    plan = decode(made.candidate(made.decode([int(g) for g in best["genes"].split()])))
    ppl, n, _, _, _, board = prune_measure(ev, plan, fields, label=label)
    return best, plan, ppl, n, round(time.perf_counter() - t0, 1), str(run), board


def section_c(ev: Session, protocol: Protocol, order: str, fields: dict, args) -> list[dict]:
    label = f"EEP stage 1 (prune, from {order})"
    best1, plan1, ppl, n, seconds, run1, board = eep_stage(
        ev, protocol, "experts-eep-prune", {"order": order, "stage": "prune", "moves": 3}, fields, args, label)
    rows = [row(label, order, fields, ppl, n, valid=float(best1["fitness"]), seconds=seconds, run_dir=run1,
                keep=best1["formula"], leaderboard=board)]
    ppl, n, _, _, _, board = prune_measure(ev, plan1, {**fields, "merge": "refit"}, label="EEP stage 1 + refit")
    rows.append(row("EEP stage 1 + refit", order, {**fields, "merge": "refit"}, ppl, n, keep=best1["formula"],
                    leaderboard=board))
    label = "EEP stage 2 (+ merge)"
    best2, _, ppl, n, seconds, run2, board = eep_stage(ev, protocol, "experts-eep-merge", {
        "order": order, "stage": "merge", "keep": best1["formula"], "moves": 3}, fields, args, label)
    rows.append(row(label, order, fields, ppl, n, valid=float(best2["fitness"]), seconds=seconds,
                    run_dir=run2, merge=best2["formula"], leaderboard=board))
    return rows


# ------------------------------------------------------------------ d: speed and memory
PEAK = """
import sys, torch
from pathlib import Path
from prunerzero.models.loading import load_model
model = load_model(sys.argv[1], device="cpu").model
Path("/proc/self/clear_refs").write_text("5")
with torch.no_grad():
    model(torch.randint(0, 1000, (1, int(sys.argv[2]))), use_cache=False, logits_to_keep=1)
print(int(next(l.split()[1] for l in open("/proc/self/status") if l.startswith("VmHWM:"))) / 1024)
"""


def peak_mb(path: Path | str, seq_len: int) -> float:
    """Peak resident memory (MiB) of a fresh process that loads the model and runs one prefill."""
    proc = subprocess.run([sys.executable, "-c", PEAK, str(path), str(seq_len)], capture_output=True, text=True,
                          env={**os.environ, "PYTHONWARNINGS": "ignore"})
    if proc.returncode:
        raise RuntimeError(f"peak memory of {path} failed:\n{proc.stderr[-2000:]}")
    return float(proc.stdout.strip().splitlines()[-1])


def section_d(ev: Session, args) -> list[dict]:
    ids = ev.windows[:1, :args.speed_len]
    variants = {}
    for label, fields in (("MoE top-2", {"experts": 8}), ("MoE top-1", {"experts": 8, "top_k": 1}),
                          (f"{KEEP}/8 REAP, top-2", {}), (f"{KEEP}/8 REAP, top-1", {"top_k": 1})):
        variants[label] = (fields, *prune_measure(ev, "reap", fields, keep_model=True, label=label))
    load = os.getloadavg()[0]
    speed = compare({k: v[4] for k, v in variants.items()}, ids, repeats=args.repeats, warmup=1, decode_tokens=16,
                    logits_to_keep=1)
    base = speed["MoE top-2"]
    rows = []
    for label, (fields, ppl, n, _, _, saved, board) in variants.items():
        s, peak = speed[label], peak_mb(saved, args.speed_len)
        board |= {"tokens_per_s": s.prefill_tokens_per_s, "decode_tokens_per_s": s.decode_tokens_per_s,
                  "peak_mem_mb": peak}
        rows.append(row(label, "reap", fields, ppl, n, prefill_tokens_per_s=s.prefill_tokens_per_s,
                        decode_tokens_per_s=s.decode_tokens_per_s, prefill_speedup=ratio(s, base),
                        decode_speedup=ratio(s, base, "decode"), peak_mb=peak,
                        load_before=load, load_after=os.getloadavg()[0], leaderboard=board))
    rows.append(row("dense smollm2-135m (memory)", "", {}, float("nan"), None, peak_mb=peak_mb("smollm2-135m",
                                                                                                args.speed_len)))
    return rows


# ------------------------------------------------------------------ e: a discovered metric
def section_e(ev: Session, run_dir: Path) -> list[dict]:
    best = best_of(run_dir)
    rows = []
    for label, cand in (("discovered metric x REAP", best["formula"]), ("frequency", "frequency"), ("REAP", "reap")):
        ppl, n, _, _, _, board = prune_measure(ev, cand, {}, label=label)
        rows.append(row(label, cand, {}, ppl, n, valid=float(best["fitness"]) if cand == best["formula"] else None,
                        leaderboard=board))
    return rows


def leaderboard_rows(doc: dict) -> list[dict]:
    """The leaderboard rows the sections measured, each built by jobs.leaderboard_row as the CLI's
    (a section of an earlier version's JSON, without them, adds none)."""
    return [r["leaderboard"] for name in "bcde" for r in doc.get(name, []) if r.get("leaderboard")]


# ------------------------------------------------------------------ the report
def render(doc: dict) -> str:
    """results/EXPERTS.md from the benchmark's JSON: targets first, then each section's table."""
    a, b, c, d, e = (doc.get(k, []) for k in "abcde")
    lines = ["# The experts mode on the derived MoE", "",
             "Written by " + ", then ".join(f"`{c}`" for c in doc["commands"]) + f" ({doc.get('seconds', 0) / 60:.0f} "
             f"min in all). Machine: {doc['machine']}; load average {doc.get('load_at_start', float('nan')):.1f} at "
             "the start of the last command (section d records it beside its timings). Protocol: "
             + doc["protocol"] + "; perplexity on austen's test split unless a column says valid.", "",
             *targets(a, b, c, d, e), ""]
    if a:
        lines += ["## a. The MoE against the dense model", "",
                  "smollm2-135m-moe (models/moefy.py): each MLP's 512 most active neurons a shared expert, the other "
                  "1024 in 8 routed experts of 128 (co-activation clusters), routers fitted with the base frozen for "
                  "top-2. The top-k is a free knob (routing weights absorbed: the scale does not depend on it); with "
                  "all 8 active and zero routers the MoE is the dense model (tested to float tolerance).", "",
                  *markdown_table(a, [("model", "method", ""), ("test perplexity", "perplexity", ".2f"),
                              ("parameters", "params", ",")]), ""]
    if b:
        lines += [f"## b. {KEEP} of 8 experts kept per layer, one shot", "",
                  "Each method's choice with the router rows of the removed experts removed (the softmax "
                  "renormalises over the kept ones), without and with merging: aligned (each removed expert averaged "
                  "into the kept expert its tokens go to next, neurons matched first, weights by routing mass) or "
                  "refit (the kept experts' down projections refit by ridge least squares so each layer's routed "
                  "output on the calibration tokens matches the unpruned layer's).", "",
                  *markdown_table(b, [("method", "method", ""), ("test perplexity", "perplexity", ".2f"),
                              ("parameters", "params", ","), ("seconds", "seconds", ".1f")]), ""]
    if c:
        lines += ["## c. EEP search", "",
                  "Both stages ran through the campaign machinery (run directory, JSON checkpoints, fitness cache; "
                  "`prunerzero evolve experiments/smollm2-experts-eep.toml` is the stage-1 configuration); fitness "
                  "is the valid split's perplexity, the table's perplexity the test split's.", "",
                  *markdown_table(c, [("stage", "method", ""), ("valid (fitness)", "valid", ".2f"),
                              ("test perplexity", "perplexity", ".2f"), ("seconds", "seconds", ".0f")]), "",
                  *[f"- {r['method']}: run directory `{r['run_dir']}`" for r in c if "run_dir" in r], ""]
    if d:
        lines += ["## d. Fewer active experts: speed and memory", "",
                  "Prefill of 1 x 256 test tokens (last position's logits only, as generation's prefill) and 16 "
                  "greedy decode steps with the KV cache, the four models timed interleaved after a warm-up (medians; "
                  "speedups are the median of each repeat's own ratio to the top-2 MoE). Peak memory: the peak "
                  "resident set of a fresh process that loads the saved model and runs one prefill.", "",
                  *markdown_table(d, [("model", "method", ""), ("test perplexity", "perplexity", ".2f"),
                              ("parameters", "params", ","), ("prefill tok/s", "prefill_tokens_per_s", ".0f"),
                              ("prefill speedup", "prefill_speedup", ".3f"),
                              ("decode tok/s", "decode_tokens_per_s", ".1f"), ("decode speedup", "decode_speedup", ".3f"),
                              ("peak MiB", "peak_mb", ".0f"), ("load avg", "load_before", ".1f")]), ""]
    if e:
        lines += ["## e. A discovered expert-importance metric", "",
                  *markdown_table(e, [("method", "method", ""), ("test perplexity", "perplexity", ".2f"),
                              ("formula", "candidate", "")]), ""]
    return "\n".join(lines) + "\n"


def targets(a, b, c, d, e) -> list[str]:
    """The issue's targets, each stated met or not with the number reached."""
    out = ["## Targets", ""]
    moe = next((r["perplexity"] for r in a if r["method"].startswith("MoE, top-2")), None)
    one_shot = [r for r in b if r["target"].get("merge") == "none" and r["candidate"] != "random"]
    best = min(one_shot, key=lambda r: r["perplexity"]) if one_shot else None
    searched = [r for r in c if r["target"].get("merge", "none") != "refit"]  # the GA's own results
    if searched and best:
        eep = min(r["perplexity"] for r in searched)
        gain = 1 - eep / best["perplexity"]
        out.append(f"- EEP beats the best one-shot baseline by >= 10% at {KEEP}/8: **{'met' if gain >= 0.1 else 'not met'}**"
                   f" — EEP {eep:.2f} against {best['method']} {best['perplexity']:.2f} ({100 * gain:.1f}% lower; "
                   "the refit rows below are one-shot steps on top, not the search).")
    if moe is not None:
        out += merge_recovery(b, c, moe)
    top1 = next((r for r in d if r["method"] == "MoE top-1"), None)
    if top1:
        out.append(f"- Top-k - 1 gives >= 1.3x measured tokens/s: **{'met' if top1['prefill_speedup'] >= 1.3 else 'not met'}**"
                   f" — prefill {top1['prefill_speedup']:.3f}x, decode {top1['decode_speedup']:.3f}x; perplexity "
                   f"{moe:.2f} -> {top1['perplexity']:.2f}.")
    if e:
        disc = e[0]["perplexity"]
        others = min(r["perplexity"] for r in e[1:])
        out.append(f"- The campaign's metric beats frequency and REAP: **{'met' if disc < others else 'not met'}** — "
                   f"{disc:.2f} against {others:.2f}.")
    else:
        out.append("- The expert-mode campaign's metric against frequency and REAP: not measured in this run.")
    return out


def merge_recovery(b, c, moe: float) -> list[str]:
    """Each merge (b: beside the same choice unmerged; c: EEP stage 1 against its merged forms) as the
    share of the pruned-to-unpruned gap it recovers; the target line from the best of them."""
    pairs = []
    for r in b:
        if r["target"].get("merge", "none") != "none":
            base = next((q for q in b if q["candidate"] == r["candidate"] and q["target"].get("merge") == "none"
                         and q["target"].get("signal") == r["target"].get("signal")), None)
            pairs += [(base, r)] if base else []
    pairs += [(c[0], r) for r in c[1:]]
    rec = [((p["perplexity"] - m["perplexity"]) / (p["perplexity"] - moe), p, m) for p, m in pairs
           if p["perplexity"] > moe]
    if not rec:
        return []
    best = max(rec, key=lambda t: t[0])
    out = [f"- Merging recovers >= 30% of the gap between pruned and unpruned MoE ({moe:.2f}): "
           f"**{'met' if best[0] >= 0.3 else 'not met'}** — best: {best[2]['method']}, {best[1]['perplexity']:.2f} -> "
           f"{best[2]['perplexity']:.2f} ({100 * best[0]:.1f}% recovered). Every merge:"]
    out += [f"  - {m['method']}: {p['perplexity']:.2f} -> {m['perplexity']:.2f} ({100 * r:.1f}%)" for r, p, m in rec]
    return out


def eep_order(doc: dict) -> tuple[str, dict]:
    """EEP starts from the best one-shot choice (section b): its method or metric and fields."""
    one_shot = [r for r in doc["b"] if r["target"].get("merge") == "none" and r["candidate"] != "random"]
    best = min(one_shot, key=lambda r: r["perplexity"])
    return best["candidate"], {k: v for k, v in best["target"].items() if k != "merge"}


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sections", default="abcd")
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--calib-windows", type=int, default=16)
    ap.add_argument("--eval-windows", type=int, default=32)
    ap.add_argument("--eep-windows", type=int, default=6, help="valid windows of the EEP fitness")
    ap.add_argument("--population", type=int, default=10)
    ap.add_argument("--generations", type=int, default=5)
    ap.add_argument("--speed-len", type=int, default=256)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--campaign", default="", help="run directory of a mode = 'experts' campaign (section e)")
    ap.add_argument("--runs-dir", default=str(cache_dir("runs")))
    ap.add_argument("--json", default="results/experts_bench.json")
    ap.add_argument("--report", default="results/EXPERTS.md")
    ap.add_argument("--leaderboard", default=str(leaderboard.DEFAULT_PATH))
    ap.add_argument("--render-only", action="store_true", help="rewrite the report from the JSON, measure nothing")
    args = ap.parse_args(argv)
    if args.render_only:
        Path(args.report).write_text(render(json.loads(Path(args.json).read_text())))
        return
    protocol = Protocol(seq_len=args.seq_len, calib_windows=args.calib_windows, eval_windows=args.eval_windows)
    t_start = time.perf_counter()
    out = Path(args.json)
    doc = json.loads(out.read_text()) if out.is_file() else {}
    command = "python experiments/experts_bench.py " + " ".join(argv or sys.argv[1:])
    doc.update({"machine": machine(), "protocol": protocol.describe(), "load_at_start": os.getloadavg()[0],
                "commands": doc.get("commands", []) + [command]})
    dense_ppl = None
    if "a" in args.sections:
        dense = Session(EvalSpec(model="smollm2-135m", split="test", protocol=protocol))
        dense_ppl = dense.measure().perplexity
        del dense
    ev = Session(EvalSpec(model=MOE, split="test", protocol=protocol, mode="experts", target={"experts": KEEP}),
                   log=print)
    sections = {"a": lambda: section_a(ev, dense_ppl), "b": lambda: section_b(ev),
                "c": lambda: section_c(ev, protocol, *eep_order(doc), args), "d": lambda: section_d(ev, args),
                "e": lambda: section_e(ev, Path(args.campaign))}
    for name in args.sections:
        doc[name] = sections[name]()
        out.write_text(json.dumps(doc, indent=1))  # each section kept as soon as it is measured
    doc["seconds"] = doc.get("seconds", 0) + round(time.perf_counter() - t_start)
    out.write_text(json.dumps(doc, indent=1))
    leaderboard.append(leaderboard_rows(doc), args.leaderboard)
    Path(args.report).write_text(render(doc))
    print(f"wrote {out}, {args.report} and rows of {args.leaderboard}")


if __name__ == "__main__":
    main()
