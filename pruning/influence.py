"""How much each block or sublayer matters, measured on calibration tokens: ShortGPT's block
influence (1 − cos of a block's input and output), the same per sublayer, and the loss a
sublayer's removal costs.

The removal loss puts a metric's unit scores in loss units (structured mode, `scale =
"removal"`): within a sublayer the metric decides which heads or channels matter, and the
sublayer's measured removal loss decides how much all of them together are worth against the
units of other sublayers — which a sum of metric scores cannot say (Wanda's |W|·‖X‖ of an
attention head and of an MLP channel are not in one unit).
"""

from __future__ import annotations

import numpy as np
import torch

from prunerzero.core.integrity import CorruptCache, read_checked_json, set_aside, sha256, write_checked_json
from prunerzero.core.paths import cache_dir

from .interventions import applied
from .removal import remove_sublayer, replay_prefix

STRIDE = 4  # the removal loss reads every 4th position (see _loss)


def block_influence(ctx) -> np.ndarray:
    """BI per block, averaged over the calibration tokens (once per model)."""
    return ctx.remember("block_influence", lambda: _block_influence(ctx))


@torch.no_grad()
def _block_influence(ctx) -> np.ndarray:
    blocks = ctx.adapter.blocks
    total = np.zeros(len(blocks))
    count = 0
    handles = []
    for i, block in enumerate(blocks):
        def hook(mod, args, kwargs, out, i=i):
            x = args[0] if args else kwargs["hidden_states"]
            y = out[0] if isinstance(out, tuple) else out
            total[i] += float((1 - torch.nn.functional.cosine_similarity(x.float(), y.float(), dim=-1)).sum())
        handles.append(block.register_forward_hook(hook, with_kwargs=True))
    try:
        for window in ctx.calibration:
            ctx.model(window[None].to(ctx.device), use_cache=False)
            count += window.numel()
    finally:
        for h in handles:
            h.remove()
    return total / max(count, 1)


def sublayer_influence(ctx) -> np.ndarray:
    """(blocks, 2): ShortGPT's influence of each block's attention (0) and MLP (1) — 1 − cos of
    the residual stream before and after that sublayer's contribution (once per model)."""
    return ctx.remember("sublayer_influence", lambda: _sublayer_influence(ctx))


@torch.no_grad()
def _sublayer_influence(ctx) -> np.ndarray:
    """The stream between attention and MLP is not visible from outside a block in every family
    (Gemma-3 normalises the MLP's input and output), so each block is run a second time on the same
    inputs with its MLP removed: that output is the stream after attention alone."""
    total = np.zeros((len(ctx.structure.blocks), 2))
    inner = [False]
    handles = []

    def one_minus_cos(a, b):
        return float((1 - torch.nn.functional.cosine_similarity(a.float(), b.float(), dim=-1)).sum())

    for block in ctx.structure.blocks:
        mlp = next(s for s in block.sublayers if s.kind == "mlp")

        def hook(mod, args, kwargs, out, i=block.index, mlp=mlp):
            if inner[0]:
                return
            inner[0] = True
            try:
                with applied() as edits:
                    remove_sublayer(edits, mlp)
                    mid = mod(*args, **kwargs)
            finally:
                inner[0] = False
            first = lambda y: y[0] if isinstance(y, tuple) else y  # noqa: E731
            x = args[0] if args else kwargs["hidden_states"]
            total[i, 0] += one_minus_cos(x, first(mid))
            total[i, 1] += one_minus_cos(first(mid), first(out))
        handles.append(block.module.register_forward_hook(hook, with_kwargs=True))
    count = 0
    try:
        for window in ctx.calibration:
            ctx.model(window[None].to(ctx.device), use_cache=False)
            count += window.numel()
    finally:
        for h in handles:
            h.remove()
    return total / max(count, 1)


@torch.no_grad()
def _loss(model, ids: torch.Tensor, stride: int = STRIDE) -> float:
    """Next-token loss at every `stride`-th position: the LM head (49k × 576 for smollm2) costs
    more than the blocks on CPU, and a removal's effect shows at any position."""
    pos = torch.arange(0, ids.shape[1] - 1, stride, device=ids.device)
    logits = model(ids, use_cache=False, logits_to_keep=pos).logits
    return float(torch.nn.functional.cross_entropy(logits.flatten(0, 1).float(), ids[:, pos + 1].flatten()))


def removal_losses(ctx, windows: int = 4, tokens: int = 256) -> np.ndarray:
    """(blocks, 2): the calibration loss's rise when each block's attention (0) or MLP (1) alone
    is removed, on the first `windows` calibration windows cut to `tokens` — once per model and
    tokens, kept in the prunerzero cache (2 forwards per block: minutes on a CPU)."""
    return ctx.remember(("removal_losses", windows, tokens), lambda: _cached_removal_losses(ctx, windows, tokens))


def _cached_removal_losses(ctx, windows: int, tokens: int) -> np.ndarray:
    ids = ctx.calibration[:windows, :tokens]
    key = sha256(f"{ctx.identity()}|{sha256(ids.numpy().tobytes())}|{ids.shape}|{STRIDE}".encode())[:16]
    path = cache_dir("influence") / f"removal-{key}.json"
    shape = (len(ctx.structure.blocks), 2)
    if path.exists():
        try:
            out = np.asarray(read_checked_json(path), dtype=float)
            if out.shape != shape or not np.isfinite(out).all():
                raise CorruptCache(f"{out.shape} values, not the model's finite {shape}")
            return out
        except CorruptCache as e:
            set_aside(path, f"removal losses: {e}", ctx.log)
    out = _removal_losses(ctx, windows, tokens)
    write_checked_json(path, out.tolist(), model=ctx.identity(), tokens=list(ids.shape))
    return out


@torch.no_grad()
def _removal_losses(ctx, windows: int, tokens: int) -> np.ndarray:
    """A removal at block i changes nothing before it: each removal's forward starts from the
    dense forward's output of block i-1 (recorded once), which halves the work on average and
    gives the same numbers as a whole forward (the same inputs meet the same blocks)."""
    ids = ctx.calibration[:windows, :tokens].to(ctx.device)
    outputs: list[torch.Tensor] = []
    base = _recorded(ctx.model, ctx.adapter.blocks, ids, outputs)
    out = np.zeros((len(ctx.structure.blocks), 2))
    for block in ctx.structure.blocks:
        for k, sublayer in enumerate(block.sublayers[:2]):
            with applied() as edits:
                replay_prefix(edits, ctx.adapter.blocks, block.index, outputs)
                remove_sublayer(edits, sublayer)
                out[block.index, k] = _loss(ctx.model, ids) - base
    ctx.log(f"removal losses of {out.size} sublayers measured on {ids.numel()} tokens")
    return out


def _recorded(model, blocks, ids: torch.Tensor, outputs: list) -> float:
    """The dense loss, with each block's output appended to `outputs` on the way."""
    def keep(mod, args, out):
        outputs.append(out[0] if isinstance(out, tuple) else out)
    handles = [block.register_forward_hook(keep) for block in blocks]
    try:
        return _loss(model, ids)
    finally:
        for h in handles:
            h.remove()


def scale_to_losses(imp: dict[str, np.ndarray], losses: np.ndarray) -> dict[str, np.ndarray]:
    """Unit importances rescaled so each sublayer's units (clamped at 0) sum to its removal loss
    (also clamped at 0: a sublayer whose removal helps is worth nothing)."""
    out = {}
    attn = np.clip(np.concatenate([imp["head"], imp["kv"]], 1), 0, None)
    share = attn / np.where(attn.sum(1, keepdims=True) > 0, attn.sum(1, keepdims=True), 1)
    scaled = share * np.clip(losses[:, :1], 0, None)
    out["head"], out["kv"] = scaled[:, :imp["head"].shape[1]], scaled[:, imp["head"].shape[1]:]
    mlp = np.clip(imp["channel"], 0, None)
    out["channel"] = mlp / np.where(mlp.sum(1, keepdims=True) > 0, mlp.sum(1, keepdims=True), 1) \
        * np.clip(losses[:, 1:], 0, None)
    return out
