"""Training SkipGPT's routers with the base model frozen, and keeping them.

Stage 1 (routers): every routed sublayer runs behind a hard Gumbel-sigmoid gate (straight-through
gradients, temperature annealed geometrically from `t_start` to `t_end`); the loss is the
next-token loss plus `weight` × (mean gate − (1 − ratio))², a pull of the global keep rate toward
the target. Only the routers' parameters learn; the base model is frozen (gradients flow through
its activations only). Stage 2 (optional, `lora_steps` > 0): LoRA adapters (peft) on the base's
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

from .interventions import applied
from .skipping import Router, install

FORMAT = 1
DATA, META = "routers.safetensors", "routers.json"  # a router set's files, in the cache or beside a saved model


class RouterError(ValueError):
    """Routers that do not fit this model or this request (the message says which)."""


@dataclass(frozen=True)
class TrainConfig:
    ratio: float  # target fraction of (sublayer, token) pairs skipped
    kinds: tuple[str, ...] = ("attention", "mlp")
    steps: int = 300
    batch: int = 4
    seq_len: int = 256
    lr: float = 5e-3
    weight: float = 20.0  # of the sparsity loss
    t_start: float = 1.0
    t_end: float = 0.1
    seed: int = 0
    init: tuple[float, ...] = ()  # initial keep-logit bias per routed sublayer (empty: logit(1 - ratio))
    lora_steps: int = 0
    lora_rank: int = 8
    lora_lr: float = 1e-4
    checkpoint_every: int = 25

    def key(self, model_id: str, data_id: str) -> str:
        data = json.dumps({"model": model_id, "data": data_id, **dataclasses.asdict(self)}, sort_keys=True)
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
        names = [(int(b), str(k)) for b, k in meta["names"]]
        routers = []
        for b, k in names:
            w, bias = tensors.get(f"router.{b}.{k}.proj.weight"), tensors.get(f"router.{b}.{k}.proj.bias")
            if w is None or bias is None:
                raise CorruptCache(f"{path}: no router for block {b} {k}")
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
def routed(structure, kinds) -> list:
    """The sublayers that get routers, in block order (attention before MLP)."""
    return [s for b in structure.blocks for s in b.sublayers if s.kind in kinds]


def default_bias(ratio: float) -> float:
    keep = min(max(1.0 - ratio, 1e-3), 1 - 1e-3)
    return math.log(keep / (1 - keep))


def load_or_train(ctx, cfg: TrainConfig, model_id: str, log=print) -> RouterSet:
    """The routers for `cfg` from the cache, else trained (resuming a checkpoint if one exists).
    The cache key holds the model's identity, the configuration and the training tokens."""
    if ctx.train_windows is None:
        raise RouterError("router training needs the corpus's train split (a context built by an Evaluator)")
    windows = ctx.train_windows(cfg.steps * cfg.batch, cfg.seq_len, cfg.seed)
    data_id = sha256(windows.numpy().tobytes())[:16]
    folder = cache_dir("routers", cfg.key(model_id, data_id))
    if (folder / META).is_file():
        try:
            found = RouterSet.load(folder)
            log(f"routers: cached at {folder}")
            return found
        except CorruptCache as e:
            set_aside(folder / META, str(e), log, then="retraining")
    result = train(ctx, cfg, windows, folder, log)
    result.meta |= {"model_id": model_id, "data_id": data_id}
    result.save(folder)
    for name in ("checkpoint.safetensors", "checkpoint.json"):
        (folder / name).unlink(missing_ok=True)
    return result


def train(ctx, cfg: TrainConfig, windows: torch.Tensor, folder: Path, log=print) -> RouterSet:
    subs = routed(ctx.structure, cfg.kinds)
    if cfg.init and len(cfg.init) != len(subs):
        raise RouterError(f"init gives {len(cfg.init)} biases for {len(subs)} routed sublayers")
    hidden = ctx.model.get_input_embeddings().weight.shape[1]
    routers = [Router(hidden, cfg.init[i] if cfg.init else default_bias(cfg.ratio)).to(ctx.device)
               for i in range(len(subs))]
    params = [p for r in routers for p in r.parameters()]
    opt = torch.optim.Adam(params, lr=cfg.lr)
    gen = torch.Generator().manual_seed(cfg.seed)
    start, history = _resume(folder, cfg, routers, opt, gen, log)
    t0 = time.perf_counter()
    with applied() as edits:
        wrapped = [install(edits, s, r, "train") for s, r in zip(subs, routers)]
        for w in wrapped:
            w.generator = gen
        for step in range(start, cfg.steps):
            frac = step / max(cfg.steps - 1, 1)
            for w in wrapped:
                w.temperature = cfg.t_start * (cfg.t_end / cfg.t_start) ** frac
            ids = windows[step * cfg.batch:(step + 1) * cfg.batch].to(ctx.device)
            with torch.enable_grad():
                lm = ctx.model(ids, labels=ids, use_cache=False).loss
                keep = torch.cat([g.flatten() for w in wrapped for g in w.gates]).mean()
                loss = lm + cfg.weight * (keep - (1 - cfg.ratio)) ** 2
                opt.zero_grad(set_to_none=True)
                loss.backward()
            opt.step()
            for w in wrapped:
                w.gates.clear()
            history.append([round(float(lm.detach()), 5), round(float(keep.detach()), 5)])
            done = step + 1
            if done % 10 == 0 or done == cfg.steps:
                rate = (time.perf_counter() - t0) / (done - start)
                log(f"routers: step {done}/{cfg.steps} loss {history[-1][0]:.3f} keep {history[-1][1]:.3f} "
                    f"(target {1 - cfg.ratio:.3f}) temperature {wrapped[0].temperature:.3f} "
                    f"{rate:.1f}s/step, {rate * (cfg.steps - done) / 60:.1f} min left")
            if done % cfg.checkpoint_every == 0 and done < cfg.steps:
                _checkpoint(folder, cfg, routers, opt, gen, done, history)
    seconds = time.perf_counter() - t0
    names = [(s.block, s.kind) for s in subs]
    meta = {"format": FORMAT, "names": names, "config": dataclasses.asdict(cfg), "train_seconds": round(seconds, 1),
            "resumed_at": start, "history": history}
    result = RouterSet(names, [r.cpu() for r in routers], meta)
    if cfg.lora_steps:
        from .lora import train_lora

        result.lora, result.meta["lora_seconds"] = train_lora(ctx, cfg, result, windows, log)
    return result


def _state(cfg, routers, opt, gen, step, history) -> tuple[dict, dict]:
    tensors = {f"r{i}.{k}": v.detach().cpu().contiguous() for i, r in enumerate(routers) for k, v in r.state_dict().items()}
    state = opt.state_dict()
    for pid, s in state["state"].items():
        for k, v in s.items():
            tensors[f"opt.{pid}.{k}"] = torch.as_tensor(v).detach().cpu().contiguous()
    tensors["generator"] = gen.get_state()
    meta = {"format": FORMAT, "config": dataclasses.asdict(cfg), "step": step, "history": history,
            "param_groups": state["param_groups"]}
    return meta, tensors


def _checkpoint(folder: Path, cfg, routers, opt, gen, step, history) -> None:
    meta, tensors = _state(cfg, routers, opt, gen, step, history)
    data = save(tensors)
    atomic_write_bytes(folder / "checkpoint.safetensors", data)
    atomic_write_text(folder / "checkpoint.json", json.dumps({**meta, "sha256": sha256(data)}))


def _resume(folder: Path, cfg, routers, opt, gen, log) -> tuple[int, list]:
    """Continue from a checkpoint of the same configuration; a damaged one is set aside."""
    if not (folder / "checkpoint.json").is_file():
        return 0, []
    try:
        meta, tensors = _read_verified(folder / "checkpoint.safetensors", folder / "checkpoint.json")
        if meta.get("config") != json.loads(json.dumps(dataclasses.asdict(cfg))):
            raise CorruptCache("its configuration differs")
        for i, r in enumerate(routers):
            r.load_state_dict({k: tensors[f"r{i}.{k}"] for k in r.state_dict()})
        state = {"param_groups": meta["param_groups"], "state": {}}
        for key, v in tensors.items():
            if key.startswith("opt."):
                _, pid, name = key.split(".", 2)
                state["state"].setdefault(int(pid), {})[name] = v
        opt.load_state_dict(state)
        gen.set_state(tensors["generator"])
    except (CorruptCache, KeyError, ValueError, RuntimeError) as e:
        set_aside(folder / "checkpoint.json", str(e), log, then="training from the start")
        return 0, []
    log(f"routers: resuming from step {meta['step']} ({folder / 'checkpoint.json'})")
    return int(meta["step"]), [list(h) for h in meta["history"]]
