"""The user jobs as library functions with explicit arguments; the CLI is a thin face on them."""

from __future__ import annotations

import datetime as dt
from dataclasses import asdict
from pathlib import Path

from prunerzero import __version__
from prunerzero.core.protocol import Protocol
from prunerzero.fitness.session import Session, Trial, count_params
from prunerzero.fitness.spec import EvalSpec
from prunerzero.fitness.speed import SpeedProtocol
from prunerzero.models.corpora import FETCHERS, load_text
from prunerzero.models.loading import model_source, resolve_device, resolve_dtype
from prunerzero.pruning.candidates import Method
from prunerzero.pruning.modes import DEFAULT_MODE, ModeError, get_mode, only_in

def _candidate(mode, spec):
    """(name, formula, key, candidate) for a metric spec or one of the mode's method names. The
    user named `spec` as code: a `path.py[:function]` without an EXPRESSION is imported here (and
    runs), so call this only after `check_inputs`. A `.json` candidate is data and never imports."""
    thing = mode.candidate(spec)
    _check_applies(mode, spec, thing)
    name = thing.name if isinstance(thing, Method) else getattr(thing, "name", spec)
    return name, thing.formula, thing.key, thing


def _check_applies(mode, spec, thing) -> None:
    """A candidate of a kind only one mode applies (its recipe's `kinds`; a metric applies in every
    mode, a method where the mode names it): another mode ends the command before anything loads."""
    only = only_in(thing)
    if only is not None and only != mode.name:
        raise ModeError(f"{spec}: a {type(thing).__name__} candidate applies in mode {only!r}, not {mode.name!r}")
    if isinstance(thing, Method) and thing.name not in mode.methods:
        raise ModeError(f"{spec}: {thing.name!r} is not a method of mode {mode.name!r} "
                        f"(its methods: {', '.join(mode.methods) or 'none'})")


def check_inputs(model: str, corpus: str = "austen", device: str = "auto", dtype: str = "auto") -> None:
    """Fail on a bad model name, corpus, device or dtype before anything loads — and before a
    metric file is imported (importing a file runs it: only once every other input is good)."""
    model_source(model, fetch=False)
    resolve_dtype(dtype, resolve_device(device))
    if corpus not in FETCHERS and not Path(corpus).expanduser().is_file():
        load_text(corpus)  # raises, naming the corpus


def leaderboard_rows(model: str, corpus: str, metrics: list[str], sparsities: list[float] | None = None,
                     patterns: list[str] | None = None, group: str = "row", protocol: Protocol | None = None,
                     split: str = "test", device: str = "auto", dtype: str = "auto", log=print, on_row=None,
                     mode: str = DEFAULT_MODE, targets: list[dict] | None = None,
                     speed: SpeedProtocol | None = None) -> list[dict]:
    """Evaluate every (metric or method, target) of one mode under one protocol; one row each (see
    prunerzero.leaderboard.COLUMNS). Unstructured targets may be given as `sparsities` x
    `patterns` (N:M patterns ignore `sparsities`: their sparsity is 1 - N/M). With `speed`, each
    pruned model's prefill and decode speed is measured beside the dense model's (interleaved)."""
    protocol = protocol or Protocol()
    the_mode = get_mode(mode)
    if targets is None:  # the mode's leaderboard targets from these options (sparsities x patterns: unstructured)
        targets = the_mode.leaderboard_targets({"sparsity": ",".join(repr(float(s)) for s in sparsities or [0.5]),
                                                "pattern": ",".join(patterns or ["unstructured"]), "group": group})
    resolved_targets = [the_mode.make_target(t) for t in targets]  # bad input fails before loading anything
    check_inputs(model, corpus, device, dtype)
    resolved = [_candidate(the_mode, m) for m in metrics]  # last: a metric file may be imported
    ev = Session(EvalSpec(model=model, corpus=corpus, split=split, protocol=protocol, device=device, dtype=dtype,
                          mode=mode, target=targets[0]), log=log)
    dense = ev.measure()
    dense_params = count_params(ev.model)
    log(f"dense perplexity {dense.perplexity:.3f} on {ev.describe_windows()}")
    ev.stats(frozenset().union(*(getattr(t, "needs", ()) for *_, t in resolved)))  # one calibration pass for all
    rows = []
    for name, formula, key, thing in resolved:
        for target in resolved_targets:
            trial = ev.trial(thing, target, speed=speed)
            row = leaderboard_row(ev, trial, (name, formula, key, thing), target, dense.perplexity, dense_params)
            log(f"{name:>14} {mode} {target.describe():>28}: perplexity {trial.perplexity.perplexity:.3f} "
                f"(sparsity {trial.report.sparsity:.4f}, {row['seconds']}s)")
            rows.append(row)
            if on_row:
                on_row(row)
    return rows


def leaderboard_row(session: Session, trial: Trial, candidate: tuple, target, dense_perplexity: float,
                    dense_params: int) -> dict:
    """One leaderboard row (prunerzero.leaderboard.COLUMNS, `target`: the whole target, and the
    mode's own measurements from `report.extra`) of a trial on this session — the one path by
    which the CLI and the benchmark scripts write rows. `candidate`: (name, formula, key, thing)."""
    name, formula, key, thing = candidate
    protocol, spec = session.spec.protocol, session.spec
    report, ppl = trial.report, trial.perplexity
    return {
        "metric": name, "formula": formula, "key": key, "model": spec.model, "corpus": spec.corpus,
        "protocol": protocol.describe(), "protocol_id": protocol.fingerprint(),
        "stats_mode": getattr(thing, "stats_mode", "") or protocol.stats_mode, "split": spec.split,
        "mode": spec.mode, "budget": target.describe(), "target": session.mode.identity(target),
        "sparsity": round(getattr(target, "expected_sparsity", float("nan")), 6),
        "pattern": getattr(target, "pattern", ""), "group": getattr(target, "group", ""),
        "perplexity": ppl.perplexity, "dense_perplexity": dense_perplexity,
        "achieved_sparsity": report.sparsity, "params": trial.params, "dense_params": dense_params,
        **trial.speed, **report.extra,
        "calib_tokens": int(session.calibration.numel()), "eval_tokens": ppl.tokens, "seed": protocol.seed,
        "version": __version__, "device": session.device_name(), "seconds": round(trial.seconds, 2),
        "timestamp": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
    }


def prune_and_save(model: str, metric: str, target, out: Path, corpus: str = "austen",
                   protocol: Protocol | None = None, device: str = "auto", dtype: str = "auto",
                   measure: bool = True, log=print, mode: str = DEFAULT_MODE) -> dict:
    """Prune a model with a metric or one of the mode's methods and save it so `from_pretrained`
    loads it (or, for a mode that changes the model's shape, as that mode saves it); the
    per-unit report goes beside it as prune_report.csv."""
    protocol = protocol or Protocol()
    the_mode = get_mode(mode)
    target = target if not isinstance(target, dict) else the_mode.make_target(target)
    check_inputs(model, corpus, device, dtype)
    name, formula, key, thing = _candidate(the_mode, metric)  # last: a metric file may be imported
    ev = Session(EvalSpec(model=model, corpus=corpus, split="test", protocol=protocol, device=device, dtype=dtype,
                          mode=mode, target=asdict(target)), log=log)
    windows = f"{len(ev.windows)} test windows x {ev.windows.shape[1]} tokens"
    if measure:
        log(f"measuring the dense perplexity on {windows}")
    dense = ev.measure() if measure else None
    log(f"pruning: {mode}, {name}, {target.describe()}")
    report = ev.prune(thing)
    if measure:
        log(f"measuring the pruned perplexity on {windows}")
    pruned = ev.measure() if measure else None
    out = Path(out)
    log(f"saving to {out}")
    if the_mode.save is not None:
        the_mode.save(ev.ctx, report, out)
    else:
        ev.model.save_pretrained(out)
    ev.lm.tokenizer.save_pretrained(out)
    report.table().to_csv(out / "prune_report.csv", index=False)
    # the tokens the perplexities read: their count and corpus (the windows were named when measuring began)
    tokens = f"{pruned.tokens} test tokens of {corpus}" if measure else None
    achieved = the_mode.measure(report)  # the budget in the mode's own unit, not a weight sparsity for every mode
    summary = {"metric": name, "formula": formula, "key": key, "mode": mode, "target": asdict(target),
               "budget": target.describe(), "achieved": achieved, "achieved_sparsity": report.sparsity,
               "out": str(out), "dense_perplexity": dense.perplexity if dense else None,
               "perplexity": pruned.perplexity if pruned else None, "measured_on": tokens}
    log(f"pruned {model} with {name} ({mode}: {target.describe()}): {achieved}"
        + (f"; {corpus} perplexity {dense.perplexity:.3f} -> {pruned.perplexity:.3f} on {pruned.tokens} test tokens"
           if measure else "") + f"; saved to {out}")
    return summary
