"""The user jobs as library functions with explicit arguments; the CLI is a thin face on them."""

from __future__ import annotations

import copy
import datetime as dt
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from prunerzero import __version__
from prunerzero.core.protocol import Protocol
from prunerzero.fitness import speed as speed_of
from prunerzero.fitness.evaluator import EvalSpec, Evaluator
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


def _device_name(ev: Evaluator) -> str:
    dev = ev.lm.device
    if dev.type == "cuda":
        return f"{torch.cuda.get_device_name(dev)} ({str(ev.lm.dtype).replace('torch.', '')})"
    return f"cpu x{torch.get_num_threads()} ({str(ev.lm.dtype).replace('torch.', '')})"


def count_params(model) -> int:
    return sum(p.numel() for p in model.parameters())


@dataclass(frozen=True)
class SpeedProtocol:
    """How speed is measured beside perplexity: prefill of (batch, seq_len) test tokens and
    `decode_tokens` greedy tokens with the KV cache after it, `repeats` interleaved repeats."""

    batch: int = 1
    seq_len: int = 256
    repeats: int = 5
    decode_tokens: int = 16

    def columns(self, dense, pruned, windows) -> dict:
        ids = windows[: self.batch, : self.seq_len]
        if ids.shape != (self.batch, self.seq_len):
            raise ValueError(f"speed needs {self.batch} windows of {self.seq_len} tokens; the split gives {tuple(windows.shape)}")
        got = speed_of.compare({"dense": dense, "pruned": pruned}, ids, self.repeats, 1, self.decode_tokens)
        d, p = got["dense"], got["pruned"]
        return {"latency_ms": p.prefill_ms, "dense_latency_ms": d.prefill_ms,
                "tokens_per_s": p.prefill_tokens_per_s, "dense_tokens_per_s": d.prefill_tokens_per_s,
                "decode_tokens_per_s": p.decode_tokens_per_s, "dense_decode_tokens_per_s": d.decode_tokens_per_s}


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
    ev = Evaluator(EvalSpec(model=model, corpus=corpus, split=split, protocol=protocol, device=device, dtype=dtype,
                            mode=mode, target=targets[0]), log=log)
    dense = ev.measure()
    dense_params = count_params(ev.model)
    log(f"dense perplexity {dense.perplexity:.3f} on {dense.tokens} {split} tokens")
    ev.stats(frozenset().union(*(getattr(t, "needs", ()) for *_, t in resolved)))  # one calibration pass for all
    rows = []
    for name, formula, key, thing in resolved:
        for target in resolved_targets:
            t0 = time.perf_counter()
            try:
                report = ev.prune(thing, target)
                ppl = ev.measure()
                params = count_params(ev.model)
                pruned = copy.deepcopy(ev.model) if speed else None
            finally:
                ev.restore()
            timing = speed.columns(ev.model, pruned, ev.windows) if speed else {}
            row = {
                "metric": name, "formula": formula, "key": key, "model": model, "corpus": corpus,
                "protocol": protocol.describe(), "protocol_id": protocol.fingerprint(),
                "stats_mode": getattr(thing, "stats_mode", "") or protocol.stats_mode, "split": split,
                "mode": mode, "budget": target.describe(), "target": the_mode.identity(target),
                "sparsity": round(getattr(target, "expected_sparsity", float("nan")), 6),
                "pattern": getattr(target, "pattern", ""), "group": getattr(target, "group", ""),
                "perplexity": ppl.perplexity, "dense_perplexity": dense.perplexity,
                "achieved_sparsity": report.sparsity, "params": params, "dense_params": dense_params,
                **timing, **report.extra,
                "calib_tokens": int(ev.calibration.numel()), "eval_tokens": ppl.tokens, "seed": protocol.seed,
                "version": __version__, "device": _device_name(ev), "seconds": round(time.perf_counter() - t0, 2),
                "timestamp": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
            }
            log(f"{name:>14} {mode} {target.describe():>28}: perplexity {ppl.perplexity:.3f} "
                f"(sparsity {report.sparsity:.4f}, {row['seconds']}s)")
            rows.append(row)
            if on_row:
                on_row(row)
    return rows


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
    ev = Evaluator(EvalSpec(model=model, corpus=corpus, split="test", protocol=protocol, device=device, dtype=dtype,
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
    summary = {"metric": name, "formula": formula, "key": key, "mode": mode, "target": asdict(target),
               "budget": target.describe(), "achieved_sparsity": report.sparsity, "out": str(out),
               "dense_perplexity": dense.perplexity if dense else None,
               "perplexity": pruned.perplexity if pruned else None}
    log(f"pruned {model} with {name} ({mode}: {target.describe()}): sparsity {report.sparsity:.4f}"
        + (f", perplexity {dense.perplexity:.3f} -> {pruned.perplexity:.3f} on {pruned.tokens} test tokens"
           if measure else "") + f"; saved to {out}")
    return summary
