"""ShortGPT's baseline: remove whole blocks in order of least block influence, BI = 1 − cos(input,
output) of the block's hidden states averaged over calibration tokens, until the latency table
predicts the budget is met."""

from __future__ import annotations

import time

import numpy as np

from ..influence import block_influence
from .selection import Selection, SelectionError


def shortgpt_plan(ctx, table, target) -> tuple[list[dict], Selection]:
    t0 = time.perf_counter()
    bi = block_influence(ctx)
    phase = target.phase
    n = len(bi)
    opts = table.options(phase)
    attn, mlp = opts.full
    dense = table.dense_latency(phase)
    removed = [False] * n
    for b in np.argsort(bi, kind="stable"):
        if opts.latency(attn, mlp, removed) <= target.latency * dense:
            break
        attn[b], mlp[b], removed[b] = 0, 0, True
    latency = opts.latency(attn, mlp, removed)
    if latency > target.latency * dense:
        raise SelectionError(f"ShortGPT cannot reach {target.latency:g}x the dense latency")
    attention, width = ctx.structure.attentions[0], ctx.structure.mlps[0].width
    all_heads = [list(range(k * attention.group_size, (k + 1) * attention.group_size))
                 for k in range(attention.n_kv_heads)]
    plan = [{"heads": None if gone else all_heads, "channels": None if gone else list(range(width)), "removed": gone}
            for gone in removed]
    sel = Selection(attn, mlp, removed, -float(bi[np.asarray(removed, bool)].sum()), latency, "shortgpt",
                    time.perf_counter() - t0)
    return plan, sel
