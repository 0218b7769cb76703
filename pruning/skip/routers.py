"""Training SkipGPT's routers with the base model frozen, and keeping them.

Stage 1 (routers): every routed sublayer runs behind a hard gate with straight-through gradients
(temperature annealed geometrically from `t_start` to `t_end`); logistic (Gumbel-sigmoid) noise
explores during the first `explore` share of the steps and is annealed to zero, so that the rest
trains the deterministic decisions that inference takes. The loss is the next-token loss plus
`weight` × (kept share − (1 − ratio))², the kept share weighing each sublayer by its cost (`budget`:
one per module, SkipGPT's count, or the FLOPs a skipped token saves there). Only the routers'
parameters learn; the base model is frozen (gradients flow through its activations only). Every
`eval_every` steps the deterministic routers, their threshold set for the exact ratio, are scored
on held-out train windows; the best set seen — the initial one included — is the result, so
training never returns routers worse on those tokens than the ranking they started from. Stage 2 (optional, `lora_steps` > 0): LoRA adapters (peft) on the base's
linear layers, trained with the routers frozen and their hard decisions applied, then merged.

Training windows are drawn from the corpus's train split by the seed, one batch per step, so a run
is a pure function of (model, corpus, config). It checkpoints every `checkpoint_every` steps
(router and optimiser tensors, the gate noise generator, the step) as checksummed safetensors +
JSON — never a pickle — and a killed run resumes from its checkpoint to the same routers it would
have reached (tested). Finished routers are cached under the prunerzero cache by that key.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load, save

from prunerzero.core.integrity import CorruptCache, set_aside, sha256
from prunerzero.core.paths import atomic_write_bytes, atomic_write_text, cache_dir

from ..interventions import applied
from .lora import train_lora
from .skipping import Router, budget_share, calibrate_threshold, install, routed

FORMAT = 1
ALGORITHM = 2  # of training: part of the cache key, so routers trained another way are not taken for these
BUDGETS = ("modules", "flops")
DATA, META = "routers.safetensors", "routers.json"  # a router set's files, in the cache or beside a saved model


class RouterError(ValueError):
    """Routers that do not fit this model or this request (the message says which)."""


@dataclass(frozen=True, kw_only=True)
class Training:
    """How routers are trained: the fields a skip target sets (`--set steps=…`) and TrainConfig
    carries, declared once (keyword-only, so both add their own positional fields first)."""

    steps: int = 300
    batch: int = 2
    seq_len: int = 256
    lr: float = 5e-3
    weight: float = 20.0  # of the sparsity loss
    t_start: float = 1.0
    t_end: float = 0.1
    explore: float = 0.3  # share of the steps with gate noise (annealed 1 -> 0); then deterministic
    budget: str = "modules"  # what the ratio counts: "modules" (each sublayer alike, SkipGPT) or "flops"
    holdout: int = 4  # held-out train windows that choose the best routers seen
    eval_every: int = 25
    seed: int = 0
    lora_steps: int = 0
    lora_rank: int = 8
    lora_lr: float = 1e-4


@dataclass(frozen=True)
class TrainConfig(Training):
    ratio: float  # target fraction of (sublayer, token) pairs skipped
    kinds: tuple[str, ...] = ("attention", "mlp")
    init: tuple[float, ...] = ()  # initial keep-logit bias per routed sublayer (empty: logit(1 - ratio))
    checkpoint_every: int = 25

    def key(self, model_id: str, data_id: str) -> str:
        data = json.dumps({"model": model_id, "data": data_id, "algorithm": ALGORITHM, **dataclasses.asdict(self)},
                          sort_keys=True)
        return hashlib.sha256(data.encode()).hexdigest()[:16]


@dataclass
class RouterSet:
    """Trained routers: one per routed sublayer (block, kind), and LoRA deltas if any."""

    names: list[tuple[int, str]]
    routers: list[Router]
    meta: dict
    lora: dict[str, torch.Tensor] = dataclasses.field(default_factory=dict)  # unit name -> ΔW
    path: Path | None = None  # the folder it was saved in or loaded from (`SkipTarget.routers` takes it)

    def tensors(self) -> dict[str, torch.Tensor]:
        out = {f"router.{b}.{k}.{p}": v.detach().cpu().contiguous()
               for (b, k), r in zip(self.names, self.routers) for p, v in r.state_dict().items()}
        return out | {f"lora.{name}": d.contiguous() for name, d in self.lora.items()}

    def save(self, path: Path) -> None:
        data = save(self.tensors())
        self.meta["sha256"] = sha256(data)  # the set's identity: reports and saved models name it
        atomic_write_bytes(Path(path) / DATA, data)
        atomic_write_text(Path(path) / META, json.dumps(self.meta, indent=1))
        self.path = Path(path)

    @classmethod
    def load(cls, path: Path) -> "RouterSet":
        meta, tensors = _read_verified(Path(path) / DATA, Path(path) / META)
        if meta.get("format") != FORMAT or "names" not in meta:
            raise CorruptCache(f"{path}: not routers this version wrote")
        names = _names(meta["names"], Path(path) / META)
        routers = []
        for b, k in names:
            w, bias = tensors.get(f"router.{b}.{k}.proj.weight"), tensors.get(f"router.{b}.{k}.proj.bias")
            if w is None or bias is None:
                raise CorruptCache(f"{path}: no router for block {b} {k}")
            if w.ndim != 2 or w.shape[0] != 1 or bias.shape != (1,):
                raise CorruptCache(f"{path}: the router for block {b} {k} has shape {tuple(w.shape)}, not (1, hidden)")
            r = Router(w.shape[1])
            r.load_state_dict({"proj.weight": w, "proj.bias": bias})
            routers.append(r)
        lora = {k[5:]: v for k, v in tensors.items() if k.startswith("lora.")}
        return cls(names, routers, meta, lora, Path(path))

    def check_fits(self, model_id: str, hidden: int, blocks: int, where: str) -> None:
        if self.meta.get("model_id") != model_id:
            raise RouterError(f"{where}: routers trained for model {self.meta.get('model_name', '?')} "
                              f"({self.meta.get('model_id', '?')[:40]}), not this one ({model_id[:40]})")
        if any(r.proj.weight.shape[1] != hidden for r in self.routers) or any(b >= blocks for b, _ in self.names):
            raise RouterError(f"{where}: routers of hidden size {self.routers[0].proj.weight.shape[1]} "
                              f"do not fit this model's {hidden} x {blocks} blocks")


def _names(names, where: Path) -> list[tuple[int, str]]:
    """The routed sublayers a router file lists: [block, kind] pairs, distinct (the JSON is outside
    the checksum, which covers the tensors)."""
    if not isinstance(names, list) or not all(isinstance(n, list) and len(n) == 2 and type(n[0]) is int
                                              and n[0] >= 0 and n[1] in ("attention", "mlp") for n in names):
        raise CorruptCache(f"{where}: field 'names' must be a list of [block, \"attention\" | \"mlp\"] pairs, "
                           f"got {names!r:.80}")
    out = [(b, k) for b, k in names]
    if len(set(out)) != len(out):
        raise CorruptCache(f"{where}: field 'names' lists a sublayer twice")
    return out


def _read_verified(data_path: Path, meta_path: Path) -> tuple[dict, dict[str, torch.Tensor]]:
    try:
        data, meta = data_path.read_bytes(), json.loads(meta_path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CorruptCache(f"unreadable: {type(e).__name__}: {e}") from None
    if not isinstance(meta, dict) or meta.get("sha256") != sha256(data):
        raise CorruptCache(f"checksum mismatch: {data_path.name} is not the file {meta_path.name} describes")
    try:
        tensors = load(data)
    except Exception as e:  # safetensors' own error types for a bad header
        raise CorruptCache(f"does not parse: {e}") from None
    if not all(torch.isfinite(t).all() for t in tensors.values() if t.is_floating_point()):
        raise CorruptCache(f"{data_path.name}: non-finite values")
    return meta, tensors


# ------------------------------------------------------------------ training
def default_bias(ratio: float) -> float:
    keep = min(max(1.0 - ratio, 1e-3), 1 - 1e-3)
    return math.log(keep / (1 - keep))


def sublayer_costs(structure, subs, budget: str) -> list[float]:
    """What skipping one token saves in each routed sublayer, mean 1: every module alike
    (`modules`), or the multiply-adds it skips (`flops`: an attention's q and o projections — its
    keys and values are still computed — and an MLP's three matrices)."""
    if budget not in BUDGETS:
        raise RouterError(f"unknown skip budget {budget!r}: use one of {', '.join(BUDGETS)}")
    if budget == "modules":
        return [1.0] * len(subs)
    attentions = {a.block: a for a in structure.attentions}
    mlps = {m.block: m for m in structure.mlps}
    size = lambda *units: float(sum(math.prod(u.shape) for u in units))  # noqa: E731
    raw = [size(attentions[s.block].q, attentions[s.block].o) if s.kind == "attention"
           else size(mlps[s.block].gate, mlps[s.block].up, mlps[s.block].down) for s in subs]
    return [c * len(raw) / sum(raw) for c in raw]


def load_or_train(ctx, cfg: TrainConfig, model_id: str, log=print) -> RouterSet:
    """The routers for `cfg` from the cache, else trained (resuming a checkpoint if one exists).
    The cache key holds the model's identity, the configuration and the training tokens."""
    if ctx.train_windows is None:
        raise RouterError("router training needs the corpus's train split (a context built by an Evaluator)")
    windows = ctx.train_windows(cfg.steps * cfg.batch, cfg.seq_len, cfg.seed)
    holdout = ctx.train_windows(cfg.holdout, cfg.seq_len, cfg.seed + 1) if cfg.holdout else windows[:0]
    data_id = sha256(windows.numpy().tobytes() + holdout.numpy().tobytes())[:16]
    folder = cache_dir("routers", cfg.key(model_id, data_id))
    if (folder / META).is_file():
        try:
            found = RouterSet.load(folder)
            log(f"routers: cached at {folder}")
            return found
        except CorruptCache as e:
            set_aside(folder / META, str(e), log, then="retraining")
    result = train(ctx, cfg, windows, holdout, folder, log)
    result.meta |= {"model_id": model_id, "data_id": data_id}
    result.save(folder)
    for name in ("checkpoint.safetensors", "checkpoint.json"):
        (folder / name).unlink(missing_ok=True)
    return result


@dataclass
class Best:
    """The best routers seen on the held-out windows (loss, step, their tensors)."""

    loss: float = math.inf
    step: int = -1
    tensors: dict = dataclasses.field(default_factory=dict)


def train(ctx, cfg: TrainConfig, windows: torch.Tensor, holdout: torch.Tensor, folder: Path, log=print) -> RouterSet:
    subs = routed(ctx.structure, cfg.kinds)
    if cfg.init and len(cfg.init) != len(subs):
        raise RouterError(f"init gives {len(cfg.init)} biases for {len(subs)} routed sublayers")
    hidden = ctx.model.get_input_embeddings().weight.shape[1]
    routers = [Router(hidden, cfg.init[i] if cfg.init else default_bias(cfg.ratio)).to(ctx.device)
               for i in range(len(subs))]
    costs = sublayer_costs(ctx.structure, subs, cfg.budget)
    opt = torch.optim.Adam([p for r in routers for p in r.parameters()], lr=cfg.lr)
    gen = torch.Generator().manual_seed(cfg.seed)
    start, history, best, before = _resume(folder, cfg, routers, opt, gen, log)
    untimed = start if before is None else 0  # a checkpoint of an earlier version kept no seconds
    t0 = time.perf_counter() - (before or 0.0)  # the steps before a resume count
    with applied() as edits:
        wrapped = [install(edits, s, r, "train", cost=c) for s, r, c in zip(subs, routers, costs)]
        for w in wrapped:
            w.generator = gen
        if start == 0:
            best = _consider(best, ctx, wrapped, routers, holdout, cfg, 0, log)
        for step in range(start, cfg.steps):
            _anneal(wrapped, cfg, step)
            lm, keep = _step(ctx, cfg, wrapped, opt, windows[step * cfg.batch:(step + 1) * cfg.batch])
            history.append([round(lm, 5), round(keep, 5)])
            done = step + 1
            if done % 10 == 0 or done == cfg.steps:
                rate = (time.perf_counter() - t0) / (done - untimed)
                log(f"routers: step {done}/{cfg.steps} loss {lm:.3f} kept {keep:.3f} (target {1 - cfg.ratio:.3f}) "
                    f"temperature {wrapped[0].temperature:.3f} noise {wrapped[0].noise:.2f} "
                    f"{rate:.1f}s/step, {rate * (cfg.steps - done) / 60:.1f} min left")
            if done % cfg.eval_every == 0 or done == cfg.steps:
                best = _consider(best, ctx, wrapped, routers, holdout, cfg, done, log)
            if done % cfg.checkpoint_every == 0 and done < cfg.steps:
                _checkpoint(folder, cfg, routers, opt, gen, done, history, best, time.perf_counter() - t0)
    if best.tensors:  # else no routers seen met the budget on held-out tokens: the last ones
        for r, state in zip(routers, _unflatten(best.tensors, len(routers))):
            r.load_state_dict(state)
    seconds = time.perf_counter() - t0
    names = [(s.block, s.kind) for s in subs]
    meta = {"format": FORMAT, "names": names, "config": dataclasses.asdict(cfg), "train_seconds": round(seconds, 1),
            "resumed_at": start, "untimed_steps": untimed, "history": history, "costs": costs,
            "best": {"step": best.step, "holdout_loss": round(best.loss, 6)} if best.tensors else {"step": cfg.steps}}
    log(f"routers: kept the routers of step {meta['best']['step']}" +
        (f" (held-out loss {best.loss:.4f})" if best.tensors else " (none seen met the budget on held-out tokens)"))
    result = RouterSet(names, [r.cpu() for r in routers], meta)
    if cfg.lora_steps:

        result.lora, result.meta["lora_seconds"] = train_lora(ctx, cfg, result, windows, log)
    return result


def _anneal(wrapped, cfg: TrainConfig, step: int) -> None:
    frac = step / max(cfg.steps - 1, 1)
    noise = max(0.0, 1.0 - frac / cfg.explore) if cfg.explore > 0 else 0.0
    for w in wrapped:
        w.temperature = cfg.t_start * (cfg.t_end / cfg.t_start) ** frac
        w.noise = noise


def _step(ctx, cfg: TrainConfig, wrapped, opt, ids: torch.Tensor) -> tuple[float, float]:
    """One optimiser step of the routers: next-token loss + the pull of the kept share to target."""
    with torch.enable_grad():
        lm = ctx.model(ids.to(ctx.device), labels=ids.to(ctx.device), use_cache=False).loss
        kept = sum(w.cost * torch.cat([g.flatten() for g in w.gates]).mean() for w in wrapped) / sum(
            w.cost for w in wrapped)
        loss = lm + cfg.weight * (kept - (1 - cfg.ratio)) ** 2
        opt.zero_grad(set_to_none=True)
        loss.backward()
    opt.step()
    for w in wrapped:
        w.gates.clear()
    return float(lm.detach()), float(kept.detach())


@torch.no_grad()
def _consider(best: Best, ctx, wrapped, routers, holdout: torch.Tensor, cfg: TrainConfig, step: int, log) -> Best:
    """Score the routers as inference runs them (deterministic, threshold set for the exact
    ratio on the held-out windows) and keep them if they are the best seen."""
    if not len(holdout):
        return Best(0.0, step, _flatten(routers))
    ids = holdout.to(ctx.device)
    for w in wrapped:
        w.execution = "multiply"
    try:
        calibrate_threshold(ctx.model, wrapped, ids, cfg.ratio, rounds=2)
        share = budget_share(wrapped)
        loss = float(ctx.model(ids, labels=ids, use_cache=False).loss)
    finally:
        for w in wrapped:
            w.execution, w.threshold = "train", 0.0
    if abs(share - cfg.ratio) > max(0.02, 0.1 * cfg.ratio):  # tied logits: no threshold skips the budget
        log(f"routers: at step {step} no threshold skips {cfg.ratio:g} of the budget (nearest {share:.3f}): not kept")
        return best
    better = loss < best.loss
    log(f"routers: held-out loss {loss:.4f} at step {step}" + (" (best so far)" if better else ""))
    return Best(loss, step, _flatten(routers)) if better else best


def _flatten(routers) -> dict[str, torch.Tensor]:
    return {f"r{i}.{k}": v.detach().cpu().clone() for i, r in enumerate(routers) for k, v in r.state_dict().items()}


def _unflatten(tensors: dict[str, torch.Tensor], n: int) -> list[dict[str, torch.Tensor]]:
    return [{k.split(".", 1)[1]: v for k, v in tensors.items() if k.split(".", 1)[0] == f"r{i}"} for i in range(n)]


def _state(cfg, routers, opt, gen, step, history, best: Best) -> tuple[dict, dict]:
    tensors = {k: v.contiguous() for k, v in _flatten(routers).items()}
    tensors |= {f"best.{k}": v.contiguous() for k, v in best.tensors.items()}
    state = opt.state_dict()
    for pid, s in state["state"].items():
        for k, v in s.items():
            tensors[f"opt.{pid}.{k}"] = torch.as_tensor(v).detach().cpu().contiguous()
    tensors["generator"] = gen.get_state()
    meta = {"format": FORMAT, "config": dataclasses.asdict(cfg), "step": step, "history": history,
            "param_groups": state["param_groups"], "best": [best.loss, best.step]}
    return meta, tensors


def _checkpoint(folder: Path, cfg, routers, opt, gen, step, history, best: Best, seconds: float) -> None:
    meta, tensors = _state(cfg, routers, opt, gen, step, history, best)
    data = save(tensors)
    atomic_write_bytes(folder / "checkpoint.safetensors", data)
    atomic_write_text(folder / "checkpoint.json", json.dumps({**meta, "seconds": round(seconds, 1),
                                                             "sha256": sha256(data)}))


def _resume(folder: Path, cfg, routers, opt, gen, log) -> tuple[int, list, Best, float | None]:
    """Continue from a checkpoint of the same configuration (its step, history, best and the
    seconds spent before it); a damaged one is set aside."""
    if not (folder / "checkpoint.json").is_file():
        return 0, [], Best(), 0.0
    try:
        meta, tensors = _read_verified(folder / "checkpoint.safetensors", folder / "checkpoint.json")
        if meta.get("config") != json.loads(json.dumps(dataclasses.asdict(cfg))):
            raise CorruptCache("its configuration differs")
        for r, state in zip(routers, _unflatten(tensors, len(routers))):
            r.load_state_dict(state)
        state = {"param_groups": meta["param_groups"], "state": {}}
        for key, v in tensors.items():
            if key.startswith("opt."):
                _, pid, name = key.split(".", 2)
                state["state"].setdefault(int(pid), {})[name] = v
        opt.load_state_dict(state)
        gen.set_state(tensors["generator"])
        loss, step = meta["best"]
        best = Best(float(loss), int(step), {k[5:]: v for k, v in tensors.items() if k.startswith("best.")})
    except (CorruptCache, KeyError, ValueError, TypeError, RuntimeError) as e:
        set_aside(folder / "checkpoint.json", str(e), log, then="training from the start")
        return 0, [], Best(), 0.0
    log(f"routers: resuming from step {meta['step']} ({folder / 'checkpoint.json'})")
    return int(meta["step"]), [list(h) for h in meta["history"]], best, meta.get("seconds")
