"""Fitting the derived MoE's weights to the dense model (models/moefy.py builds the MoE).

Two fits, one per recipe version:

- version 1, *teacher-forced routers*: each layer's router is fitted on the dense model's own MLP
  inputs, everything else frozen (`fit_router`). Each layer's error is small on its own inputs,
  but the MoE never sees those inputs: errors compound through the depth (top-2: 94.90 test
  perplexity against the dense 40.17, results/EXPERTS.md).
- version 2, *sequential*: layer by layer on the MoE's own hidden states (the layers before are
  already converted, as the sequential Wanda / SparseGPT schedule), with the dense MLP's output
  on that same input as the target. Per layer: the router is fitted as in version 1, then the
  experts' down projections (shared and routed) are refitted by one ridge least-squares solve
  given the routing (`refit_down`: the features are each neuron's activation times the weight
  its expert gets — softmax probability for a chosen routed expert, 0 otherwise, sigmoid(0) for
  the shared one — so the solve is exact for the routing the model will run), optionally
  alternated with the router (`rounds`).

Qwen2-MoE's scales (norm_topk_prob false): a routed expert's output is weighted by its softmax
probability, so a routed down_proj stores E × its share of the dense down projection (uniform
routing: 1/E × E); the shared expert's gate is zero, sigmoid(0) = 1/2, so its down_proj stores 2×.
The refit writes the weights the module multiplies by those factors, so the scales stay absorbed.
"""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn


# ------------------------------------------------------------------ routing, as Qwen2-MoE computes it
def routed(logits: torch.Tensor, outputs: torch.Tensor, top_k: int) -> torch.Tensor:
    """The routed experts' output as Qwen2-MoE computes it (norm_topk_prob false): the top-k
    softmax probabilities times the experts, whose absorbed scale is E."""
    probs = logits.float().softmax(-1)
    val, idx = probs.topk(top_k, dim=-1)
    picked = outputs.gather(1, idx[..., None].expand(-1, -1, outputs.shape[-1]))
    return outputs.shape[1] * (val[..., None] * picked).sum(1)


def routing_weights(logits: torch.Tensor, top_k: int) -> torch.Tensor:
    """(tokens, E): each expert's weight in the output — its softmax probability if among the
    top-k, else 0 (what Qwen2-MoE multiplies an expert's down projection by)."""
    probs = logits.float().softmax(-1)
    val, idx = probs.topk(top_k, dim=-1)
    return torch.zeros_like(probs).scatter_(1, idx, val)


def relative_error(out: torch.Tensor, target: torch.Tensor, whole: torch.Tensor | None = None) -> float:
    """‖out − target‖² / ‖whole‖² (whole: the dense MLP's output; default the target)."""
    whole = target if whole is None else whole
    return float((out - target).square().sum() / whole.square().sum().clamp_min(1e-30))


def fit_router(x: torch.Tensor, outputs: torch.Tensor, top_k: int, steps: int, lr: float,
               target: torch.Tensor | None = None, init: torch.Tensor | None = None) -> torch.Tensor:
    """A router (E, H) for one layer, everything else frozen: least squares onto each token's
    centred log expert-output norms (which experts carry this token), scaled down so that the
    probabilities start near 1/E (the chosen experts' plain sum) — or `init` —, then Adam
    through the real top-k path on the reconstruction error of `target` (default: the routed
    part of the dense output, the experts' sum)."""
    target = outputs.sum(1) if target is None else target
    if init is None:
        scores = outputs.norm(dim=-1).clamp_min(1e-12).log()
        scores = scores - scores.mean(-1, keepdim=True)
        w = torch.linalg.lstsq(x, scores).solution.T.contiguous()  # (E, H)
        w = w * (0.1 / (x @ w.T).std().clamp_min(1e-12))  # same order of experts, nearly uniform probabilities
    else:
        w = init.detach().clone()
    if top_k == outputs.shape[1] or steps == 0:
        return w
    w.requires_grad_(True)
    opt = torch.optim.Adam([w], lr=lr)
    best, best_err = w.detach().clone(), relative_error(routed(x @ w.detach().T, outputs, top_k), target)
    for _ in range(steps):
        opt.zero_grad()
        loss = (routed(x @ w.T, outputs, top_k) - target).square().sum() / target.square().sum()
        loss.backward()
        opt.step()
        if float(loss.detach()) < best_err:
            best, best_err = w.detach().clone(), float(loss.detach())
    return best


# ------------------------------------------------------------------ one Qwen2-MoE block, read as features
def block_activations(block: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(shared (tokens, S) times the shared gate's sigmoid, routed (tokens, E, I)): every
    neuron's activation in `block` (a Qwen2MoeSparseMoeBlock) on inputs x (tokens, H)."""
    experts = block.experts
    gate, up = torch.einsum("th,eoh->teo", x, experts.gate_up_proj.float()).chunk(2, dim=-1)
    acts = experts.act_fn(gate) * up
    se = block.shared_expert
    shared = se.act_fn(se.gate_proj(x)) * se.up_proj(x) if se.gate_proj.out_features else x[:, :0]
    return shared * torch.sigmoid(block.shared_expert_gate(x)), acts


def expert_outputs_of(block: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(shared output (tokens, H), routed (tokens, E, H) each divided by E): the shares `routed`
    multiplies back by E times the routing probability."""
    shared, acts = block_activations(block, x)
    down = block.experts.down_proj.float()  # (E, H, I)
    outs = torch.einsum("tei,ehi->teh", acts, down) / down.shape[0]
    return shared @ block.shared_expert.down_proj.weight.float().T, outs


@torch.no_grad()
def refit_down(block: nn.Module, x: torch.Tensor, y: torch.Tensor, top_k: int, ridge: float) -> None:
    """Refit `block`'s down projections (shared and routed) so that its output on x under its own
    top-k routing is y, by one least-squares solve with a ridge toward the current weights
    (λ = ridge × mean diagonal of the Gram matrix: neurons a token rarely reaches stay put)."""
    shared, acts = block_activations(block, x)
    wts = routing_weights(block.gate(x)[0], top_k)  # router logits → (tokens, E)
    phi = torch.cat([shared, (acts * wts[..., None]).flatten(1)], 1).double()
    E, H, I = block.experts.down_proj.shape
    s = shared.shape[1]
    w0 = torch.cat([block.shared_expert.down_proj.weight.T,
                    block.experts.down_proj.permute(0, 2, 1).reshape(E * I, H)]).double()  # (S + E·I, H)
    gram = phi.T @ phi
    lam = ridge * gram.diagonal().mean().clamp_min(1e-12)
    rhs = phi.T @ y.double() + lam * w0
    w = torch.linalg.solve(gram + lam * torch.eye(len(gram), dtype=gram.dtype), rhs).float()
    if s:
        block.shared_expert.down_proj.weight.copy_(w[:s].T)
    block.experts.down_proj.copy_(w[s:].reshape(E, I, H).permute(0, 2, 1))


def block_output(block: nn.Module, x: torch.Tensor, top_k: int) -> torch.Tensor:
    """What `block` computes on x (tokens, H) with top-k routing, from the features (for fits)."""
    shared, outs = expert_outputs_of(block, x)
    return shared + routed(block.gate(x)[0], outs, top_k)


# ------------------------------------------------------------------ the sequential schedule
TARGETS = ("mlp", "stream")


class _Stop(Exception):
    """Raised by the hook that records the first block's inputs: the rest of the forward is not needed."""


@torch.no_grad()
def block_inputs(model: nn.Module, windows: torch.Tensor, batch: int) -> tuple[list[torch.Tensor], list[dict]]:
    """The hidden states entering the first decoder layer, and the keyword arguments the model
    passes its layers (position embeddings, causal mask), per batch of windows."""
    hidden, kwargs = [], []

    def hook(module, args, kw):
        kw = dict(kw)
        hidden.append(args[0] if args else kw.pop("hidden_states"))
        kw.pop("past_key_values", None)
        kwargs.append(kw | {"use_cache": False})
        raise _Stop

    handle = model.model.layers[0].register_forward_pre_hook(hook, with_kwargs=True)
    try:
        for i in range(0, len(windows), batch):
            try:
                model.model(windows[i:i + batch], use_cache=False)
            except _Stop:
                pass
    finally:
        handle.remove()
    return hidden, kwargs


@torch.no_grad()
def layer_mlp_input(layer: nn.Module, hidden: list[torch.Tensor], kwargs: list[dict]) -> tuple[torch.Tensor, torch.Tensor]:
    """((tokens, H) the MLP input of `layer` (after attention and its norm), (tokens, H) the
    residual stream the MLP adds to) on each batch's hidden states: the MLP is swapped for a
    recorder that outputs zeros, so the layer's output is that residual."""
    recorder = _Recorder()
    mlp, layer.mlp = layer.mlp, recorder
    try:
        resid = run_layer(layer, hidden, kwargs)
    finally:
        layer.mlp = mlp
    return torch.cat(recorder.inputs).float(), torch.cat([r.flatten(0, -2) for r in resid]).float()


class _Recorder(nn.Module):
    """Stands in for an MLP: keeps its inputs (tokens, H), outputs zeros."""

    def __init__(self) -> None:
        super().__init__()
        self.inputs: list[torch.Tensor] = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.inputs.append(x.flatten(0, -2))
        return torch.zeros_like(x)


def run_layer(layer: nn.Module, hidden: list[torch.Tensor], kwargs: list[dict]) -> list[torch.Tensor]:
    outs = [layer(h, **kw) for h, kw in zip(hidden, kwargs)]
    return [o[0] if isinstance(o, (tuple, list)) else o for o in outs]


@torch.no_grad()
def fit_sequential(moe: nn.Module, dense: nn.Module, windows: torch.Tensor, top_k: int,
                   router_steps: int, router_lr: float, ridge: float, rounds: int, target: str = "mlp",
                   batch: int = 8, log: Callable[[str], None] = lambda msg: None) -> list[float]:
    """Fit every layer's router and down projections in order, each on the MoE's own MLP inputs
    (the layers before already fitted). The target: `mlp`, the dense MLP on those inputs;
    `stream`, what makes the MoE's residual stream after the layer the dense model's (the MLP
    also corrects the drift of the layers before). `ridge` < 0: routers only. Returns each
    layer's relative MLP error."""
    if target not in TARGETS:
        raise ValueError(f"unknown fit target {target!r}: use one of {TARGETS}")
    hidden, kwargs = block_inputs(moe, windows, batch)
    dense_hidden = list(hidden)  # the same embeddings: the layers differ only in their MLPs
    errors = []
    for b, layer in enumerate(moe.model.layers):
        x, resid = layer_mlp_input(layer, hidden, kwargs)
        if target == "stream":
            dense_hidden = run_layer(dense.model.layers[b], dense_hidden, kwargs)
            y = torch.cat([h.flatten(0, -2) for h in dense_hidden]).float() - resid
        else:
            y = dense.model.layers[b].mlp(x)
        errors.append(fit_layer(layer.mlp, x, y, top_k, router_steps, router_lr, ridge, rounds))
        log(f"layer {b}: router{' and down projections' if ridge >= 0 else ''} fitted on the MoE's own "
            f"inputs, relative MLP error {errors[-1]:.3f}")
        hidden = run_layer(layer, hidden, kwargs)
    return errors


def fit_layer(block: nn.Module, x: torch.Tensor, y: torch.Tensor, top_k: int, steps: int, lr: float,
              ridge: float, rounds: int) -> float:
    """One layer: the router (as version 1, on these inputs), then `rounds` of down-projection
    refit and router refinement toward the whole target y. Returns the relative MLP error."""
    shared, outs = expert_outputs_of(block, x)
    with torch.enable_grad():
        w = fit_router(x, outs, top_k, steps, lr)
    block.gate.weight.copy_(w)
    for r in range(rounds if ridge >= 0 else 0):
        refit_down(block, x, y, top_k, ridge)
        if r + 1 < rounds:  # refine the router for the refitted experts, then refit again
            shared, outs = expert_outputs_of(block, x)
            with torch.enable_grad():
                w = fit_router(x, outs, top_k, steps, lr, target=y - shared, init=block.gate.weight)
            block.gate.weight.copy_(w)
    return relative_error(block_output(block, x, top_k), y)
