"""Self-speculative decoding on smollm2-135m: each draft kind against plain dense `generate`,
interleaved prompt by prompt, greedy → results/DRAFTS.md (+ DRAFTS.json).

    flock /tmp/pz-heavy.lock python experiments/draft_bench.py            # ~15-25 min on 2 CPU cores

For every prompt (128 tokens from the test split of austen and of mobydick) it times, in turn:
the dense model's prefill (1 new token), plain dense generation of --new tokens, and each draft's
assisted generation of --new tokens. Decode tokens/s = (new − 1) / (time − the prompt's prefill
time), the same prefill subtracted from every method. Output identical = the same tokens as plain
dense generation, token for token.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from pathlib import Path

import torch

import prunerzero.pruning.modes  # noqa: F401  (registers the reshaped loaders)
from prunerzero.core.paths import atomic_write_text, cache_dir
from prunerzero.core.protocol import Protocol
from prunerzero.fitness.speed import machine
from prunerzero.generate import calibration_windows, generate
from prunerzero.jobs import prune_and_save
from prunerzero.models.corpora import CorpusError, load_tokenized
from prunerzero.drafting import load_draft
from prunerzero.models.loading import load_model

DRAFTS = "shortgpt:4,shortgpt:8,shortgpt:8+head:4096,shortgpt:12+head:4096,saved-skip25,lookup:10"


def prompts(tokenizer, corpora: list[str], per_corpus: int, length: int) -> tuple[list[tuple[str, torch.Tensor]], list[str]]:
    out, notes = [], []
    for name in corpora:
        try:
            test = load_tokenized(name, tokenizer).splits["test"]
        except CorpusError as e:
            notes.append(f"corpus {name} unavailable: {e}")
            continue
        step = (len(test) - length) // per_corpus
        out += [(name, test[i * step:i * step + length][None]) for i in range(per_corpus)]
    return out, notes


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--drafts", default=DRAFTS, help="comma-separated: view specs, saved-skip25 (a skip-mode "
                    "static model saved by prune_and_save), a model directory, lookup:N (prompt lookup)")
    ap.add_argument("--corpora", default="austen,mobydick")
    ap.add_argument("--prompts", type=int, default=4, help="per corpus")
    ap.add_argument("--prompt-len", type=int, default=128)
    ap.add_argument("--new", type=int, default=128)
    ap.add_argument("--draft-tokens", type=int, default=4)
    ap.add_argument("--confidence", type=float, default=0.4)
    ap.add_argument("--cost-prompts", type=int, default=2, help="prompts on which each draft model also "
                    "generates alone, for its cost ratio (dense decode time / draft decode time per token)")
    ap.add_argument("--out", default="results/DRAFTS.md")
    args = ap.parse_args()
    load_start = os.getloadavg()
    dense = load_model("smollm2-135m", device="cpu")
    windows = calibration_windows("austen", dense.tokenizer, 4, 256)
    work, notes = prompts(dense.tokenizer, args.corpora.split(","), args.prompts, args.prompt_len)
    drafts = {}
    for spec in args.drafts.split(","):
        if spec.startswith("lookup:"):
            drafts[spec] = ("lookup", int(spec.split(":")[1]), "prompt lookup (transformers; no model: n-gram match)")
            continue
        if spec == "saved-skip25":
            out = cache_dir("drafts") / "skip25-shortgpt"  # a model (466 MB): the cache, not the tree
            if not (out / "prunerzero_skip.json").is_file():
                prune_and_save("smollm2-135m", "shortgpt", {"ratio": 0.25}, out, corpus="austen",
                               protocol=Protocol(seq_len=256, calib_windows=8, eval_windows=2), device="cpu",
                               measure=False, log=print, mode="skip")
            d = load_draft(str(out), dense)
            drafts[spec] = ("model", d.model, f"saved skip model: ShortGPT static, 25% of sublayers removed ({out})")
            continue
        d = load_draft(spec, dense, lambda: windows, print)
        drafts[spec] = ("model", d.model, d.description)
    print(f"{len(work)} prompts; drafts: {', '.join(drafts)}", flush=True)
    rows = []
    options = dict(draft_tokens=args.draft_tokens, confidence=args.confidence or None, stop_at_eos=False)
    generate(dense.model, work[0][1], 4, stop_at_eos=False)  # warm-up
    for p, (corpus, ids) in enumerate(work):
        prefill = generate(dense.model, ids, 1, stop_at_eos=False).seconds
        plain = generate(dense.model, ids, args.new, stop_at_eos=False)
        rows.append({"prompt": p, "corpus": corpus, "draft": "dense", "seconds": plain.seconds, "prefill": prefill,
                     "decode_tps": (args.new - 1) / (plain.seconds - prefill), "identical": True,
                     "drafted": 0, "accepted": 0, "rounds": plain.rounds})
        base = rows[-1]["decode_tps"]
        for spec, (kind, thing, _) in drafts.items():
            if kind == "lookup":
                g = generate(dense.model, ids, args.new, lookup=thing, stop_at_eos=False)
            else:
                g = generate(dense.model, ids, args.new, thing, **options)
            rows.append({"prompt": p, "corpus": corpus, "draft": spec, "seconds": g.seconds, "prefill": prefill,
                         "decode_tps": (args.new - 1) / (g.seconds - prefill), "identical": g.tokens == plain.tokens,
                         "drafted": g.drafted, "accepted": g.accepted, "rounds": g.rounds, "alone_tps": None})
            if kind == "model" and p < args.cost_prompts:
                alone_prefill = generate(thing, ids, 1, stop_at_eos=False).seconds
                alone = generate(thing, ids, args.new, stop_at_eos=False).seconds
                rows[-1]["alone_tps"] = (args.new - 1) / (alone - alone_prefill)
            print(f"prompt {p} ({corpus}) {spec}: {rows[-1]['decode_tps']:.2f} tok/s against dense {base:.2f}, "
                  f"accepted {g.accepted}/{g.drafted}, rounds {g.rounds}, identical {g.tokens == plain.tokens}", flush=True)
    load_end = os.getloadavg()
    report(rows, drafts, args, notes, machine(), load_start, load_end)


def report(rows, drafts, args, notes, where, load_start, load_end) -> None:
    dense = {r["prompt"]: r["decode_tps"] for r in rows if r["draft"] == "dense"}
    summary = []
    for spec in ["dense", *drafts]:
        rs = [r for r in rows if r["draft"] == spec]
        ratios = [r["decode_tps"] / dense[r["prompt"]] for r in rs]
        drafted, accepted = sum(r["drafted"] for r in rs), sum(r["accepted"] for r in rs)
        summary.append({"draft": spec, "what": "plain dense generate" if spec == "dense" else drafts[spec][2],
                        "decode_tps_median": statistics.median(r["decode_tps"] for r in rs),
                        "ratio_median": statistics.median(ratios),
                        "acceptance": accepted / drafted if drafted else None,
                        "tokens_per_round": args.new / statistics.mean(r["rounds"] for r in rs),
                        "identical": sum(r["identical"] for r in rs), "prompts": len(rs),
                        "cost_ratio": statistics.median(dense[r["prompt"]] / r["alone_tps"] for r in rs if r["alone_tps"])
                        if any(r.get("alone_tps") for r in rs) else None})
    lines = [
        "# Self-speculative decoding: pruned drafts for the dense smollm2-135m",
        "",
        f"`flock /tmp/pz-heavy.lock python experiments/draft_bench.py` ({time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}). "
        f"Machine: {where}; load average {load_start[0]:.2f} at the start, {load_end[0]:.2f} at the end "
        "(shared with other workers). fp32, greedy, batch 1.",
        "",
        f"{len(dense)} prompts of {args.prompt_len} tokens (test splits: {args.corpora}), {args.new} new tokens each "
        f"(EOS ignored); per prompt, interleaved: dense prefill, plain dense `generate`, then each draft through "
        f"transformers' assisted generation (first draft length {args.draft_tokens}, `heuristic_transient` "
        f"schedule, confidence threshold {args.confidence}). Decode tokens/s = ({args.new} − 1) / (time − that "
        "prompt's dense prefill time); ratio = against plain dense on the same prompt (median over prompts); "
        "acceptance = drafted tokens the dense model kept / drafted tokens; tokens per round = new tokens per "
        "dense forward; draft cost = the draft's own decode time per token / the dense model's (the draft "
        f"generating alone, first {args.cost_prompts} prompts).",
        *(f"\n{n}" for n in notes),
        "",
        "| draft | what | decode tokens/s (median) | ratio to dense | acceptance | tokens per dense forward | draft cost | output identical |",
        "|---|---|---:|---:|---:|---:|---:|---|",
    ]
    for s in summary:
        acc = "—" if s["acceptance"] is None else f"{s['acceptance']:.3f}"
        same = "yes" if s["identical"] == s["prompts"] else f"NO ({s['identical']}/{s['prompts']})"
        lines.append(f"| `{s['draft']}` | {s['what']} | {s['decode_tps_median']:.2f} | {s['ratio_median']:.3f}x | "
                     f"{acc} | {s['tokens_per_round']:.2f} | "
                     f"{'—' if s['cost_ratio'] is None else format(s['cost_ratio'], '.3f')} | {same} |")
    lines += ["", "Per prompt (decode tokens/s):", "",
              "| prompt | corpus | " + " | ".join(f"`{d}`" for d in ["dense", *drafts]) + " |",
              "|---|---|" + "---:|" * (len(drafts) + 1)]
    for p in sorted(dense):
        rs = {r["draft"]: r for r in rows if r["prompt"] == p}
        lines.append(f"| {p} | {rs['dense']['corpus']} | " + " | ".join(f"{rs[d]['decode_tps']:.2f}" for d in ["dense", *drafts]) + " |")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out, "\n".join(lines) + "\n")
    atomic_write_text(out.with_suffix(".json"), json.dumps({"summary": summary, "rows": rows, "machine": where,
                                                            "load": [load_start, load_end]}, indent=1) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
