"""Recovery without training: after heads or channels are cut, the projection that reads them (o_proj
after heads, down_proj after MLP channels) is refit by least squares so that, on calibration data,
it reproduces the dense sublayer's output from the units kept (the layer-wise reconstruction of
FLAP and ZipLM, in closed form):

    W' = argmin ‖X W_denseᵀ − X_k W'ᵀ‖²  →  W'ᵀ = (G_kk + λI)⁻¹ G_k: W_denseᵀ,   G = XᵀX

G is the Gram matrix of the projection's inputs on the dense model's calibration tokens (one-shot),
accumulated once per model in float64.
"""

from __future__ import annotations

import torch

from ..interventions import Edits
from ..slicing import head_rows

DAMP = 1e-2  # λ as a fraction of the mean of G's diagonal (SparseGPT's percdamp)


@torch.no_grad()
def collect_grams(ctx) -> dict[str, torch.Tensor]:
    """XᵀX of every o_proj's and down_proj's input over the calibration windows."""
    s = ctx.structure
    targets = [a.o for a in s.attentions] + [m.down for m in s.mlps]
    grams: dict[str, torch.Tensor] = {}
    handles = []
    for unit in targets:
        def hook(mod, args, name=unit.name):
            x = args[0].reshape(-1, args[0].shape[-1]).double()
            grams[name] = grams.get(name, 0) + x.T @ x
        handles.append(ctx.model.get_submodule(unit.name).register_forward_pre_hook(hook))
    try:
        for window in ctx.calibration:
            ctx.model(window[None].to(ctx.device), use_cache=False)
    finally:
        for h in handles:
            h.remove()
    return grams


def refit(weight: torch.Tensor, gram: torch.Tensor, keep: list[int]) -> torch.Tensor:
    """The (out, len(keep)) least-squares refit of a dense (out, in) projection to its kept inputs."""
    idx = torch.as_tensor(keep, device=gram.device)
    g_kk = gram.index_select(0, idx).index_select(1, idx)
    damp = DAMP * g_kk.diagonal().mean().clamp(min=1e-12)
    rhs = gram.index_select(0, idx) @ weight.double().T.to(gram.device)
    solution = torch.linalg.solve(g_kk + damp * torch.eye(len(keep), dtype=g_kk.dtype, device=g_kk.device), rhs)
    return solution.T.to(weight.dtype).contiguous()


def refit_following(edits: Edits, structure, plan: list[dict], grams: dict[str, torch.Tensor]) -> None:
    """Refit o_proj and down_proj of every block whose heads or channels were cut (not removed)."""
    for block, step in zip(structure.blocks, plan):
        if step["removed"]:
            continue
        attn, mlp = block.attention, block.mlp
        heads = step["heads"]
        if heads is not None and sum(map(len, heads)) < attn.n_heads:
            q_heads = [h for kv in range(attn.n_kv_heads) for h in sorted(heads[kv])]
            _set(edits, structure.model, attn.o, refit(attn.o.weight, grams[attn.o.name], head_rows(attn, q_heads)))
        channels = step["channels"]
        if channels is not None and len(channels) < mlp.width:
            _set(edits, structure.model, mlp.down, refit(mlp.down.weight, grams[mlp.down.name], sorted(channels)))


def _set(edits: Edits, model, unit, weight: torch.Tensor) -> None:
    edits.set_param(model.get_submodule(unit.name), "weight", weight)
