"""The benchmark report: results/BENCHMARKS.md from what experiments/bench.py measured — the
targets first, then each section that ran (`--sections`), the machine and the command."""

from __future__ import annotations

import statistics
import time

import torch

from prunerzero.fitness.speed import machine

PRUNE_STEPS = ("scores", "masks", "apply", "restore")


def median_ms(samples: list[float]) -> float:
    return 1000 * statistics.median(samples)


def paired_ratio(costs: dict[str, list[float]], num: tuple[str, ...], den: str) -> float:
    """Median over repeats of sum(num steps) / den step, each repeat's own."""
    return statistics.median(sum(costs[k][i] for k in num) / costs[den][i] for i in range(len(costs[den])))


def report(args, spec, ev, metric: str, costs, scaling, search, memory, kernels, throughput=None) -> str:
    """The whole report; a section measured as None was not run (`--sections`)."""
    model_mib = sum(p.numel() * p.element_size() for p in ev.model.parameters()) / 2**20
    n_params = sum(u.weight.numel() for u in ev.units)
    command = "python experiments/bench.py --size " + args.size + (
        f" --sections {args.sections}" if args.sections != "abcdefg" else "")
    lines = [
        "# prunerzero benchmarks", "",
        f"Written by `{command}` on {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}.",
        f"Machine: {machine()}. Device {ev.lm.device}, weights {str(ev.lm.dtype).replace('torch.', '')}.",
        f"Model smollm2-135m ({n_params / 1e6:.1f}M pruned weights in {len(ev.units)} units; {model_mib:.0f} MiB of "
        f"parameters); corpus austen; {spec.protocol.describe()}; metric {metric} at {ev.target.describe()}.",
        f"Medians over {args.repeats} repeats after one warm-up; ratios are the median of each repeat's own ratio "
        "(the steps of one repeat run back to back, so a noisy machine moves both sides together).", "",
        *targets(costs, scaling, search, ev.lm.device.type == "cuda", throughput), "",
    ]
    if costs is not None:
        lines += cost_sections(ev, costs)
    if scaling is not None:
        lines += ray_section(args, scaling)
    if search is not None:
        lines += search_section(search)
    if memory is not None:
        lines += memory_section(memory, model_mib)
    if kernels is not None:
        lines += kernel_section(args, ev, metric, kernels)
    if throughput is not None:
        lines += throughput_section(throughput)
    return "\n".join(lines).rstrip() + "\n"


def targets(costs, scaling, search, gpu: bool, throughput=None) -> list[str]:
    """The targets against this run. The first two are stated for a GPU: measured on a CPU they
    say how this machine fares, not whether the GPU target is met."""
    where = "" if gpu else " (stated for a GPU; this run: CPU)"
    rows = [(f"pruning + restore, share of the forward{where}", "<= 15%",
             None if costs is None else paired_ratio(costs, PRUNE_STEPS, "forward"), lambda x: x <= 0.15, "{:.1%}"),
            (f"evaluator throughput, share of the plain forward{where}", ">= 90%",
             None if costs is None else paired_ratio(costs, ("floor",), "evaluate"), lambda x: x >= 0.90, "{:.1%}"),
            (f"Ray efficiency at {scaling[-1]['workers'] if scaling else 'the most'} evaluators", ">= 0.85",
             None if scaling is None else scaling[-1]["efficiency"], lambda x: x >= 0.85, "{:.2f}"),
            ("evaluations spared over 20 generations", ">= 30%",
             None if search is None else search["spared"], lambda x: x >= 0.30, "{:.1%}")]
    t = throughput_numbers(throughput) if throughput is not None else None
    rows += [("chosen cheap fitness: candidates per CPU-hour against today's campaign fitness (one 1-thread "
              "evaluator per core, as the campaign's Ray workers)", ">= 5x",
              None if t is None else t["speedup_1t"], lambda x: x >= 5, "{:.1f}x"),
             ("the same, one evaluator using both cores", ">= 5x",
              None if t is None else t["speedup"], lambda x: x >= 5, "{:.1f}x"),
             ("chosen cheap fitness: pruning + restore, share of its forward", "<= 3%",
              None if t is None else t["overhead"], lambda x: x <= 0.03, "{:.1%}"),
             ("driver time per evaluated candidate (OOS in worker processes), share of one cheap evaluation "
              "(a 1-thread Ray worker's, as the campaign runs them)", "<= 1%",
              None if t is None else t["driver_share_1t"], lambda x: x <= 0.01, "{:.2%}"),
             ("the same, share of one cheap evaluation using both cores", "<= 1%",
              None if t is None else t["driver_share"], lambda x: x <= 0.01, "{:.2%}"),
             ("driver time per evaluated candidate (OOS in worker processes), share of one bf16 cheap evaluation "
              "(experiments/smollm2-cpu-cheap-bf16.toml; a 1-thread Ray worker's)", "<= 1%",
              None if t is None else t["driver_share_bf16_1t"], lambda x: x <= 0.01, "{:.2%}"),
             ("the same, share of one bf16 cheap evaluation using both cores", "<= 1%",
              None if t is None else t["driver_share_bf16"], lambda x: x <= 0.01, "{:.2%}"),
             ("evaluators before the driver is the bottleneck (its seconds per generation equal one round of bf16 "
              "1-thread evaluations: N = evaluation / driver time per candidate)", ">= 100",
              None if t is None else t["breakeven_bf16_1t"], lambda x: x >= 100, "{:.0f}")]
    out = ["## Targets", "", "| target | this run | threshold | met |", "|---|---:|---:|---|"]
    for what, bound, got, ok, fmt in rows:
        out.append(f"| {what} | not run | {bound} | - |" if got is None else
                   f"| {what} | {fmt.format(got)} | {bound} | {'yes' if ok(got) else 'no'} |")
    return out


def cost_sections(ev, costs) -> list[str]:
    med = {k: median_ms(v) for k, v in costs.items()}
    tokens = int(ev.windows.numel())
    lines = ["## a. Per-candidate fitness cost", "",
             f"Perplexity forward over {ev.windows.shape[0]} windows x {ev.windows.shape[1]} tokens = {tokens} tokens.", "",
             "| step | median ms | share of the forward |", "|---|---:|---:|"]
    for k in (*PRUNE_STEPS, "forward", "evaluate", "floor"):
        lines.append(f"| {k} | {med[k]:.1f} | {med[k] / med['forward']:.1%} |")
    return lines + [
        "", f"Pruning + restore = {sum(med[k] for k in PRUNE_STEPS):.1f} ms; "
        f"**{paired_ratio(costs, PRUNE_STEPS, 'forward'):.1%} of the forward** (target on a GPU: <= 15%).", "",
        "## b. Evaluator throughput", "",
        "| | tokens/s |", "|---|---:|",
        f"| plain forward (floor) | {tokens / (med['floor'] / 1000):.0f} |",
        f"| evaluator (prune + perplexity + restore) | {tokens / (med['evaluate'] / 1000):.0f} |", "",
        f"Evaluator throughput = **{paired_ratio(costs, ('floor',), 'evaluate'):.1%} of the plain forward** "
        "(target on a GPU: >= 90%). The evaluation also computes the scores' masks fingerprint and the achieved "
        "sparsity, and the loss over the logits.", ""]


def ray_section(args, scaling) -> list[str]:
    lines = ["## c. Ray scaling", "",
             f"Real evaluators (one model replica each), {args.jobs} candidates per evaluator after a warm-up call per "
             "actor.", "",
             "| evaluators | evaluations | seconds | evaluations/s | speedup | efficiency |", "|---:|---:|---:|---:|---:|---:|"]
    for r in scaling:
        lines.append(f"| {r['workers']} | {r['evaluations']} | {r['seconds']:.1f} | {r['evals_per_s']:.3f} | "
                     f"{r['speedup']:.2f} | {r['efficiency']:.2f} |")
    return lines + ["", f"Efficiency at {scaling[-1]['workers']} evaluators: **{scaling[-1]['efficiency']:.2f}** "
                    "(target >= 0.85).", ""]


def search_section(search) -> list[str]:
    s = search
    first = s["full_windows"] // 2 ** (s["rungs"] - 1)
    return [
        "## d. Search efficiency", "",
        f"A {s['generations']}-generation campaign, population {s['population']}, evaluator: {s['evaluator']}, "
        "fresh fitness cache.", "",
        "| trees generated | rejected by OOS | duplicates after OOS | cache hits | same masks as one measured | evaluated "
        "| spared |",
        "|---:|---:|---:|---:|---:|---:|---:|",
        f"| {s['generated']} | {s['rejected_by_oos']} | {s['duplicates']} | {s['cache_hits']} | "
        f"{s['same_masks']} | {s['evaluated']} | **{s['spared']:.1%}** |", "",
        "'Same masks': candidates whose masks match an evaluated one's (computing the masks, skipping the forward). "
        f"Best: `{s['best']}`. Target: OOS + de-duplication + cache avoid >= 30% of evaluations.", "",
        f"With successive halving (the same campaign and seed, {s['rungs']} rungs, eta 2: candidates first "
        f"measured on {first} of {s['full_windows']} windows, the better half going on), the windows spent against "
        "fully evaluating every tree:", "",
        "| trees generated | forwards (all rungs) | windows spent | every tree in full | spared |",
        "|---:|---:|---:|---:|---:|",
        f"| {s['halving_generated']} | {s['halving_forwards']} | {s['halving_windows']} | "
        f"{s['halving_generated'] * s['full_windows']} | **{s['halving_spared']:.1%}** |", "",
        f"Best: `{s['halving_best']}`.", ""]


def memory_section(memory, model_mib: float) -> list[str]:
    how = "max GPU memory allocated" if torch.cuda.is_available() else "peak resident set (VmHWM, reset after loading)"
    lines = ["## e. Peak memory", "",
             f"Each phase in a fresh process; {how} in MiB; the evaluator holds the model, a dense copy of the pruned "
             f"weights and the corpus; parameters alone: {model_mib:.0f} MiB.", "",
             "| phase | peak MiB | x parameters |", "|---|---:|---:|"]
    for k, label in (("load", "loading an evaluator"), ("stats", "statistics collection (W, G, X)"),
                     ("evaluator", "one evaluation")):
        lines.append(f"| {label} | {memory[k]:.0f} | {memory[k] / model_mib:.2f} |")
    return lines + [""]


def kernel_section(args, ev, metric: str, kernels) -> list[str]:
    lines = ["## f. Kernel choices, side by side", "",
             f"Each per-candidate kernel against the plain torch way, on the real {metric} scores of all "
             f"{len(ev.units)} units (the loss: on one batch of the model's logits), interleaved in one run; medians of "
             f"{args.repeats}. The results are the same either way (tests/test_masks.py, tests/test_perplexity.py).", "",
             "| step | plain torch | ms | chosen | ms | speed-up |", "|---|---|---:|---|---:|---:|"]
    for r in kernels:
        lines.append(f"| {r['what']} | {r['base']} | {r['base_ms']:.1f} | {r['chosen']} | {r['chosen_ms']:.1f} | "
                     f"{r['base_ms'] / r['chosen_ms']:.2f}x |")
    return lines


def throughput_numbers(t) -> dict:
    today, cheap = (statistics.median(t["evals"][k]) for k in ("today", "cheap"))
    pooled = t["drivers"][max(t["drivers"])]
    e = t["evals"]
    one = bool(e.get("today_1t"))  # reports before the 1-thread measurement have none
    cheap_1t = statistics.median(e["cheap_1t"]) if one else None
    bf16 = {k: statistics.median(e[k]) if e.get(k) else None for k in ("cheap_bf16", "cheap_bf16_1t")}
    per = pooled["per_candidate"]
    return {"today": today, "cheap": cheap, "cheap_bf16": bf16["cheap_bf16"], "cheap_bf16_1t": bf16["cheap_bf16_1t"],
            "driver_share_bf16": per / bf16["cheap_bf16"] if bf16["cheap_bf16"] else None,
            "driver_share_bf16_1t": per / bf16["cheap_bf16_1t"] if bf16["cheap_bf16_1t"] else None,
            "breakeven_bf16_1t": bf16["cheap_bf16_1t"] / per if bf16["cheap_bf16_1t"] and per > 0 else None,
            "speedup": statistics.median(a / b for a, b in zip(e["today"], e["cheap"])),
            "today_1t": statistics.median(e["today_1t"]) if one else None,
            "cheap_1t": cheap_1t,
            "speedup_1t": statistics.median(a / b for a, b in zip(e["today_1t"], e["cheap_1t"])) if one else None,
            "overhead": paired_ratio(t["cheap_costs"], PRUNE_STEPS, "forward"),
            "driver_share": pooled["per_candidate"] / cheap,
            "driver_share_1t": pooled["per_candidate"] / cheap_1t if one else None}


def _describe(spec) -> str:
    p = spec.protocol
    return f"{spec.fitness} on {p.eval_windows}x{p.seq_len} {spec.split} tokens"


def throughput_section(t) -> list[str]:
    n = throughput_numbers(t)
    costs = {k: median_ms(v) for k, v in t["cheap_costs"].items()}
    lines = ["## g. Search throughput", "",
             f"Today's campaign fitness ({_describe(t['today'])}) against the cheap fitness chosen in "
             f"results/FITNESS.md ({_describe(t['cheap'])}; experiments/smollm2-cpu-cheap.toml), one evaluation of "
             "each in turn per repeat.", "",
             "| fitness | s / candidate | candidates / hour on this machine |", "|---|---:|---:|",
             f"| today: {_describe(t['today'])} | {n['today']:.2f} | {3600 / n['today']:.0f} |",
             f"| chosen: {_describe(t['cheap'])} | {n['cheap']:.2f} | {3600 / n['cheap']:.0f} |",
             *([f"| chosen in bf16: {_describe(t['cheap_bf16'])}, bfloat16 | {n['cheap_bf16']:.2f} | "
                f"{3600 / n['cheap_bf16']:.0f} |"] if n["cheap_bf16"] else []), "",
             f"**{n['speedup']:.1f}x** the candidates per hour of one evaluator using every core (median of each "
             "repeat's own ratio).", ""]
    if n["speedup_1t"] is not None:
        lines += ["As a campaign's Ray worker runs it (`cpus_per_worker = 1`: one thread, one evaluator per core), "
                  "measured the same way after the above:", "",
                  "| fitness | s / candidate | candidates / CPU-hour |", "|---|---:|---:|",
                  f"| today: {_describe(t['today'])} | {n['today_1t']:.2f} | {3600 / n['today_1t']:.0f} |",
                  f"| chosen: {_describe(t['cheap'])} | {n['cheap_1t']:.2f} | {3600 / n['cheap_1t']:.0f} |",
                  *([f"| chosen in bf16: {_describe(t['cheap_bf16'])}, bfloat16 | {n['cheap_bf16_1t']:.2f} | "
                     f"{3600 / n['cheap_bf16_1t']:.0f} |"] if n["cheap_bf16_1t"] else []), "",
                  f"**{n['speedup_1t']:.1f}x** the candidates per CPU-hour.", ""]
    lines += [f"The chosen fitness's cost per candidate ({t['cheap_tokens']} tokens, every core):", "",
             "| step | median ms | share of the forward |", "|---|---:|---:|"]
    for k in (*PRUNE_STEPS, "forward", "evaluate"):
        lines.append(f"| {k} | {costs[k]:.1f} | {costs[k] / costs['forward']:.1%} |")
    lines += ["", f"Pruning + restore: **{n['overhead']:.1%} of the forward** (target <= 3%).", "",
              "The driver's own time per candidate — OOS (SymPy), selection and variation, the fitness cache, the "
              "checkpoint, history and evaluation log of every generation — over toy campaigns with the committed "
              "CPU campaign's search settings (the toy's evaluations take no model; their seconds are subtracted), "
              "summed over the generations after the first (the first generation's driver time, which includes "
              "starting the OOS processes once per campaign, in its own column); 'OOS s': the part spent preparing "
              "offspring (SymPy and the probes, in the driver or waiting for the OOS processes):",
              "", "| OOS processes | generations | offspring | evaluated | driver s | OOS s | driver ms / evaluated "
              "candidate | share of today's evaluation | share of the chosen one | share of the chosen one, 1-thread "
              "worker | share of the bf16 one, 1-thread worker | first generation s |",
              "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for workers, d in sorted(t["drivers"].items()):
        one = f"{d['per_candidate'] / n['cheap_1t']:.2%}" if n["cheap_1t"] else "-"
        bf16 = f"{d['per_candidate'] / n['cheap_bf16_1t']:.2%}" if n["cheap_bf16_1t"] else "-"
        oos = f"{d['oos_seconds']:.2f}" if "oos_seconds" in d else "-"
        lines.append(f"| {workers or 'in the driver'} | {d['generations']} | {d['offspring']} | {d['evaluated']} | "
                     f"{d['driver_seconds']:.2f} | {oos} | {1000 * d['per_candidate']:.1f} | "
                     f"{d['per_candidate'] / n['today']:.2%} | {d['per_candidate'] / n['cheap']:.2%} | {one} | "
                     f"{bf16} | {d['first_generation_s']:.1f} |")
    return lines + ["", *projection(t, n), ""]


def projection(t, n) -> list[str]:
    """Driver seconds per generation against N evaluators x evaluation seconds. A generation of N
    candidates (one per evaluator) costs the driver N x d (d: its time per evaluated candidate, OOS
    in worker processes) and the evaluators one evaluation, t. The engine alternates the two (the
    evaluators wait while the driver prepares the next generation), so the cluster's efficiency is
    t / (t + N d), and the driver is the bottleneck from N = t / d on."""
    d = t["drivers"][max(t["drivers"])]["per_candidate"]
    evals = [("chosen, 1-thread worker", n["cheap_1t"]), ("chosen, both cores", n["cheap"]),
             ("bf16, 1-thread worker", n["cheap_bf16_1t"]), ("bf16, both cores", n["cheap_bf16"])]
    evals = [(name, s) for name, s in evals if s]
    ref_name, ref = next((e for e in evals if e[0] == "bf16, 1-thread worker"), evals[0])  # the campaign's Ray worker
    lines = [f"**Projection to N evaluators.** A generation of N candidates (one per evaluator) costs the driver "
             f"N x d, d = {1000 * d:.1f} ms per evaluated candidate (OOS in {max(t['drivers'])} processes, above), and "
             "the evaluators one evaluation of t seconds. The engine alternates the two (the evaluators wait while "
             "the driver selects, simplifies and caches the next generation), so the cluster's efficiency is "
             "t / (t + N d) and the driver becomes the bottleneck (its seconds per generation equal the "
             "evaluations') at N = t / d:", "",
             "| evaluation | t (s) | d / t | N where driver = evaluation | efficiency at 100 evaluators |",
             "|---|---:|---:|---:|---:|"]
    for name, s in evals:
        lines.append(f"| {name} | {s:.2f} | {d / s:.2%} | {s / d:.0f} | {s / (s + 100 * d):.2f} |")
    lines += ["", f"Per generation against the {ref_name} evaluation (t = {ref:.2f} s):", "",
              "| evaluators N | driver s per generation (N x d) | evaluation s per generation (t) | efficiency "
              "t / (t + N d) |", "|---:|---:|---:|---:|"]
    for workers in (1, 2, 5, 10, 20, 50, 100):
        lines.append(f"| {workers} | {workers * d:.2f} | {ref:.2f} | {ref / (ref + workers * d):.2f} |")
    lines += ["", "A driver whose work overlapped the evaluations (the next candidates prepared while the last ones "
              "run) would keep N evaluators busy up to N = t / d instead of losing t / (t + N d) before it; the engine "
              "does not overlap them yet (a generation's selection needs its fitness)."]
    serial, pooled = t["drivers"].get(0), t["drivers"][max(t["drivers"])]
    if serial and "oos_seconds" in serial and "oos_seconds" in pooled and max(t["drivers"]) > 0:
        oos = serial["oos_seconds"] / max(serial["evaluated"], 1)  # SymPy per evaluated candidate, one process
        rest = (pooled["driver_seconds"] - pooled["oos_seconds"]) / max(pooled["evaluated"], 1)
        lines += ["", f"Where d goes: OOS, {1000 * oos:.1f} ms of SymPy and probes per evaluated candidate in one "
                  f"process, against {1000 * rest:.1f} ms for everything else (selection, variation, de-duplication, "
                  "the fitness cache, checkpoint and logs). OOS parallelises over trees, so a driver node with w OOS "
                  f"processes projects to d(w) = {1000 * rest:.1f} + {1000 * oos:.1f} / w ms (w = "
                  f"{max(t['drivers'])} measured above; more cores than this machine has are a projection):", "",
                  f"| OOS processes w | d(w) ms | N where driver = {ref_name} evaluation | efficiency at 100 |",
                  "|---:|---:|---:|---:|"]
        for w in (1, 2, 4, 8, 16):
            dw = rest + oos / w
            lines.append(f"| {w} | {1000 * dw:.1f} | {ref / dw:.0f} | {ref / (ref + 100 * dw):.2f} |")
    return lines


def _blocks(text: str) -> tuple[list[str], dict[str, list[str]]]:
    """A report's lines before its first section, and its sections by heading ("Targets", "a", ...)."""
    head, blocks, current = [], {}, None
    for line in text.splitlines():
        if line.startswith("## "):
            title = line[3:]
            current = title.split(".")[0] if title[:2].rstrip(".").isalpha() and title[1:2] == "." else title
            blocks[current] = []
        (blocks[current] if current else head).append(line)
    return head, blocks


def merge_reports(old: str, new: str) -> str:
    """The new report, with the sections it did not run — and their targets' rows — kept from the
    old one; each kept section says which run wrote it."""
    old_head, old_blocks = _blocks(old)
    new_head, new_blocks = _blocks(new)
    written = next((ln for ln in old_head if ln.startswith("Written by")), "Written by an earlier run.")
    old_rows = [ln for ln in old_blocks.get("Targets", []) if ln.startswith("| ")]  # same order, new ones last
    targets, row = [], 0
    for ln in new_blocks.get("Targets", []):
        if ln.startswith("| "):
            ln = old_rows[row] if "| not run |" in ln and row < len(old_rows) else ln
            row += 1
        targets.append(ln)
    kept = {k: v if v[2:3] and v[2].startswith("_Kept from an earlier report") else
            [v[0], "", f"_Kept from an earlier report: {written[0].lower()}{written[1:]}_", *v[1:]]
            for k, v in old_blocks.items() if k != "Targets" and k not in new_blocks}
    sections = {**kept, **{k: v for k, v in new_blocks.items() if k != "Targets"}}
    body = [line for key in sorted(sections) for line in sections[key]]
    return "\n".join(new_head + targets + body).rstrip() + "\n"
