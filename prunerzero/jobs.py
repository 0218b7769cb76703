"""The user jobs as library functions with explicit arguments; the CLI is a thin face on them."""

from __future__ import annotations

import datetime as dt
import time
from dataclasses import asdict
from prunerzero import __version__
from pathlib import Path

from prunerzero.fitness.evaluator import EvalSpec, Evaluator
from prunerzero.primitives.metric import resolve_metric
from prunerzero.protocol import Protocol
from prunerzero.pruning.methods import resolve_method
from prunerzero.pruning.target import PruneTarget


def _metric_or_method(spec: str):
    """(name, formula, key, thing to prune with) for a metric spec or a method name."""
    if resolve_method(spec) is not None:
        name = spec.strip().lower()
        return name, f"<method {name}>", f"method:{name}", name
    metric = resolve_metric(spec)
    return metric.name, metric.formula, metric.key, metric


def _device_name(ev: Evaluator) -> str:
    import torch

    dev = ev.lm.device
    if dev.type == "cuda":
        return f"{torch.cuda.get_device_name(dev)} ({str(ev.lm.dtype).replace('torch.', '')})"
    return f"cpu x{torch.get_num_threads()} ({str(ev.lm.dtype).replace('torch.', '')})"


def leaderboard_rows(model: str, corpus: str, metrics: list[str], sparsities: list[float], patterns: list[str],
                     group: str = "row", protocol: Protocol | None = None, split: str = "test",
                     device: str = "auto", dtype: str = "auto", log=print, on_row=None) -> list[dict]:
    """Evaluate every (metric, pattern, sparsity) under one protocol; one row each (see
    prunerzero.leaderboard.COLUMNS). N:M patterns ignore `sparsities` (their sparsity is 1 - N/M)."""
    protocol = protocol or Protocol()
    resolved = [_metric_or_method(m) for m in metrics]  # fail on a bad metric before loading anything
    targets = _targets(sparsities, patterns, group)
    ev = Evaluator(EvalSpec(model=model, corpus=corpus, split=split, protocol=protocol, device=device, dtype=dtype),
                   log=log)
    dense = ev.measure()
    log(f"dense perplexity {dense.perplexity:.3f} on {dense.tokens} {split} tokens")
    ev.stats(frozenset().union(*(getattr(t, "needs", ()) for *_, t in resolved)))  # one calibration pass for all
    rows = []
    for name, formula, key, thing in resolved:
        for target in targets:
            t0 = time.perf_counter()
            try:
                report = ev.prune(thing, target)
                ppl = ev.measure()
            finally:
                ev.restore()
            row = {
                "metric": name, "formula": formula, "key": key, "model": model, "corpus": corpus,
                "protocol": protocol.describe(), "protocol_id": protocol.fingerprint(),
                "stats_mode": "sequential" if resolve_method(thing) else protocol.stats_mode, "split": split,
                "sparsity": round(target.expected_sparsity, 6), "pattern": target.pattern, "group": target.group,
                "perplexity": ppl.perplexity, "dense_perplexity": dense.perplexity,
                "achieved_sparsity": report.sparsity, "calib_tokens": int(ev.calibration.numel()),
                "eval_tokens": ppl.tokens, "seed": protocol.seed, "version": __version__,
                "device": _device_name(ev), "seconds": round(time.perf_counter() - t0, 2),
                "timestamp": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
            }
            log(f"{name:>14} {target.describe():>28}: perplexity {ppl.perplexity:.3f} "
                f"(sparsity {report.sparsity:.4f}, {row['seconds']}s)")
            rows.append(row)
            if on_row:
                on_row(row)
    return rows


def _targets(sparsities, patterns, group) -> list[PruneTarget]:
    out = []
    for pattern in patterns:
        if pattern.strip().lower() == "unstructured":
            out += [PruneTarget(s, "unstructured", group) for s in sparsities]
        else:
            out.append(PruneTarget(0.0, pattern, group))
    return out


def prune_and_save(model: str, metric: str, target: PruneTarget, out: Path, corpus: str = "austen",
                   protocol: Protocol | None = None, device: str = "auto", dtype: str = "auto",
                   measure: bool = True, log=print) -> dict:
    """Prune a model with a metric or method and save it so `from_pretrained` loads it;
    the per-unit sparsity report goes beside it as prune_report.csv."""
    protocol = protocol or Protocol()
    name, formula, key, thing = _metric_or_method(metric)
    ev = Evaluator(EvalSpec(model=model, corpus=corpus, split="test", protocol=protocol, device=device, dtype=dtype),
                   log=log)
    dense = ev.measure() if measure else None
    report = ev.prune(thing, target)
    pruned = ev.measure() if measure else None
    out = Path(out)
    ev.model.save_pretrained(out)
    ev.lm.tokenizer.save_pretrained(out)
    report.table().to_csv(out / "prune_report.csv", index=False)
    summary = {"metric": name, "formula": formula, "key": key, "target": asdict(target),
               "achieved_sparsity": report.sparsity, "out": str(out),
               "dense_perplexity": dense.perplexity if dense else None,
               "perplexity": pruned.perplexity if pruned else None}
    log(f"pruned {model} with {name} ({target.describe()}): sparsity {report.sparsity:.4f}"
        + (f", perplexity {dense.perplexity:.3f} -> {pruned.perplexity:.3f}" if measure else "") + f"; saved to {out}")
    return summary
