"""`prunerzero generate`: a thin face over prunerzero.generate. Mount it with `register(app)`."""

from __future__ import annotations

from typing import Annotated, Optional

import typer

from prunerzero.console import friendly_errors
from prunerzero.generate import SCHEDULES, generate_job

DRAFT_HELP = ("The draft that proposes tokens for the dense model to verify: a saved pruned model directory "
              "(any mode) or a layer view of the dense model sharing its weights: layers:0-9,20-29, "
              "shortgpt:N (drop the N blocks of least block influence) or sweep:N (drop N blocks greedily by "
              "agreement with the dense model), optionally +head:V (the draft's head over the V most frequent "
              "tokens). Without it: plain dense generation.")


def generate_cmd(
    prompt: Annotated[str, typer.Option(help="The text to continue.")],
    model: Annotated[str, typer.Option(help="The dense model that verifies: zoo name, directory or hub id.")] = "smollm2-135m",
    draft: Annotated[Optional[str], typer.Option(help=DRAFT_HELP)] = None,
    max_new_tokens: Annotated[int, typer.Option(min=1, help="Tokens to generate.")] = 64,
    sample: Annotated[bool, typer.Option(help="Sample (the dense distribution, by the rejection rule) instead of greedy.")] = False,
    temperature: Annotated[float, typer.Option(min=0.0, help="Sampling temperature.")] = 1.0,
    top_k: Annotated[Optional[int], typer.Option(min=1, help="Sample among the k most likely tokens.")] = None,
    top_p: Annotated[Optional[float], typer.Option(min=0.0, max=1.0, help="Nucleus sampling.")] = None,
    seed: Annotated[int, typer.Option(help="Seed of the sampling.")] = 0,
    draft_tokens: Annotated[int, typer.Option(min=1, help="First draft length (then adapted by --schedule).")] = 4,
    schedule: Annotated[str, typer.Option(help="heuristic_transient (+2 after a fully accepted draft, -1 otherwise; "
                                               "reset every call), heuristic (kept across calls) or constant.")] = "heuristic_transient",
    confidence: Annotated[float, typer.Option(min=0.0, max=1.0, help="The draft stops where its top probability falls "
                                                                   "below this (0: never).")] = 0.4,
    compare: Annotated[bool, typer.Option(help="Also run plain dense generation: its tokens/s, and for greedy whether "
                                               "the output is identical.")] = False,
    corpus: Annotated[str, typer.Option(help="Calibration text for shortgpt:/sweep:/+head: views.")] = "austen",
    device: Annotated[str, typer.Option(help="auto, cpu, cuda, cuda:1 ...")] = "auto",
    dtype: Annotated[str, typer.Option(help="auto (bf16 on GPU, fp32 on CPU), float32, bfloat16, float16.")] = "auto",
) -> None:
    """Generate with the dense model, drafted by a pruned model (self-speculative decoding): the
    greedy output is the dense model's, token for token; prints the text, tokens/s and the
    draft's acceptance rate."""
    if schedule not in SCHEDULES:
        raise typer.BadParameter(f"use one of {', '.join(SCHEDULES)}", param_hint="--schedule")
    r = generate_job(model, draft, prompt, max_new_tokens, sample=sample, temperature=temperature, top_k=top_k,
                     top_p=top_p, seed=seed, draft_tokens=draft_tokens, schedule=schedule,
                     confidence=confidence or None, compare=compare, corpus=corpus, device=device, dtype=dtype,
                     log=lambda msg: typer.echo(msg, err=True))
    typer.echo(r["text"])
    line = f"{r['tokens']} tokens in {r['seconds']:.2f} s: {r['tokens_per_s']:.2f} tokens/s"
    if r["draft"]:
        line += (f"; acceptance {r['acceptance']:.3f} ({r['accepted']} of {r['drafted']} drafted tokens kept, "
                 f"{r['rounds']} dense forwards)")
    typer.echo(line, err=True)
    if "speedup" in r:
        same = "" if r["identical"] is None else f"; output identical to dense: {'yes' if r['identical'] else 'NO'}"
        typer.echo(f"dense alone: {r['dense_tokens_per_s']:.2f} tokens/s; speed-up {r['speedup']:.2f}x{same}", err=True)


def register(app: typer.Typer) -> None:
    """Add `generate` to the main app."""
    app.command("generate")(friendly_errors(generate_cmd))
