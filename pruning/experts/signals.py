"""The experts mode's signals: routing statistics on calibration data, experts run one at a time,
NAEE's subset search and the merge helpers — everything the mode reads besides a metric.

Family-neutral by the contract every fused-experts family of transformers 5 shares (Mixtral,
Qwen2-MoE, OLMoE): the router maps hidden states (tokens, H) to (logits, top-k weights, top-k
indices), and the experts module takes (hidden states, indices, weights). The statistics are
read by a forward hook on the experts module, so they see exactly the routing the model does.
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from scipy.optimize import linear_sum_assignment

from prunerzero.models.structure import Experts, expert_count_attrs

from ..interventions import Edits, applied


@dataclass
class LayerRouting:
    """One MoE layer's routing on the calibration tokens."""

    frequency: torch.Tensor  # (E,) fraction of tokens routed to each expert
    gate: torch.Tensor  # (E,) mean routing weight over all tokens (0 where not routed): gate mass
    reap: torch.Tensor  # (E,) mean over the tokens routed to e of weight × ‖expert output‖ (REAP)
    prob: torch.Tensor  # (E,) mean softmax probability of each expert over all tokens (routed or not)
    inputs: torch.Tensor  # (n, H) a bounded sample of the layer's inputs (NAEE, merge targets), float32

    def kept_mass(self, keep) -> float:
        """The probability mass the kept experts held: in families whose router does not renormalise
        its top-k weights (Qwen2-MoE, OLMoE), removing router rows divides every kept weight by it
        on average, so the kept experts' outputs are scaled by it to stay as large as before."""
        return float(self.prob[list(keep)].sum())


# ------------------------------------------------------------------ experts one at a time
def expert_hidden(module, e: int, x: torch.Tensor) -> torch.Tensor:
    """Expert `e`'s intermediate activations act(gate(x)) * up(x) on tokens x (n, H): (n, I)."""
    gate_up = module.gate_up_proj[e]
    h = x @ gate_up if getattr(module, "is_transposed", False) else F.linear(x, gate_up)
    if hasattr(module, "_apply_gate"):
        return module._apply_gate(h)
    g, u = h.chunk(2, dim=-1)
    return module.act_fn(g) * u


def expert_forward(module, e: int, x: torch.Tensor) -> torch.Tensor:
    """Expert `e` of a fused experts module on tokens x (n, H), as the module computes it."""
    h, down = expert_hidden(module, e, x), module.down_proj[e]
    return h @ down if getattr(module, "is_transposed", False) else F.linear(h, down)


def all_expert_outputs(layer: Experts, x: torch.Tensor, chunk: int = 2048) -> torch.Tensor:
    """(n, E, H) float32: every expert on every token of x (a bounded sample)."""
    module = layer.module
    dtype = module.gate_up_proj.dtype
    out = []
    for i in range(0, x.shape[0], chunk):
        xs = x[i:i + chunk].to(dtype)
        out.append(torch.stack([expert_forward(module, e, xs).float() for e in range(layer.n_experts)], 1))
    return torch.cat(out)


# ------------------------------------------------------------------ routing statistics
class _Accumulator:
    def __init__(self, layer: Experts, max_tokens: int):
        n = layer.n_experts
        self.layer, self.max_tokens = layer, max_tokens
        self.count = torch.zeros(n, dtype=torch.float64)
        self.mass = torch.zeros(n, dtype=torch.float64)
        self.reap = torch.zeros(n, dtype=torch.float64)
        self.prob = torch.zeros(n, dtype=torch.float64)
        self.tokens = 0
        self.inputs: list[torch.Tensor] = []
        self.kept = 0

    @torch.no_grad()
    def __call__(self, module, args, output) -> None:
        hidden, index, weights = args[0], args[1], args[2]
        n = self.layer.n_experts
        index, weights = index.reshape(hidden.shape[0], -1), weights.reshape(hidden.shape[0], -1).float()
        self.tokens += hidden.shape[0]
        valid = index < n  # (expert parallelism marks foreign experts with index n)
        self.count += torch.bincount(index[valid].cpu(), minlength=n)[:n].double()
        self.mass += torch.zeros(n + 1, dtype=torch.float64).index_add_(
            0, index.flatten().cpu(), weights.flatten().double().cpu())[:n]
        for e in range(n):
            rows, slot = torch.nonzero(index == e, as_tuple=True)
            if len(rows):
                norms = expert_forward(module, e, hidden[rows]).float().norm(dim=-1)
                self.reap[e] += float((weights[rows, slot] * norms).sum())
        room = self.max_tokens - self.kept
        if room > 0:
            self.inputs.append(hidden[:room].detach().float().cpu())
            self.kept += min(room, hidden.shape[0])

    @torch.no_grad()
    def router(self, module, args, output) -> None:
        logits = output[0].reshape(-1, self.layer.n_experts)
        self.prob += logits.float().softmax(-1).sum(0).double().cpu()

    def result(self) -> LayerRouting:
        tokens = max(self.tokens, 1)
        return LayerRouting((self.count / tokens).float(), (self.mass / tokens).float(),
                            (self.reap / self.count.clamp(min=1)).float(), (self.prob / tokens).float(),
                            torch.cat(self.inputs))


@torch.no_grad()
def collect_routing(model, layers: list[Experts], windows: torch.Tensor, max_tokens: int,
                    batch: int = 4) -> list[LayerRouting]:
    """Routing statistics of every MoE layer on calibration `windows`, one forward pass."""
    accs = [_Accumulator(layer, max_tokens) for layer in layers]
    hooks = [layer.module.register_forward_hook(acc) for layer, acc in zip(layers, accs)]
    hooks += [layer.router_module.register_forward_hook(acc.router) for layer, acc in zip(layers, accs)]
    try:
        device = next(model.parameters()).device
        for i in range(0, windows.shape[0], batch):
            model(windows[i:i + batch].to(device), use_cache=False, logits_to_keep=1)
    finally:
        for h in hooks:
            h.remove()
    return [acc.result() for acc in accs]


# ------------------------------------------------------------------ routing a sample through kept experts
def route(layer: Experts, x: torch.Tensor, keep: list[int] | None = None, top_k: int | None = None):
    """(weights, indices into `keep`) the layer's own router gives tokens x when only the experts
    `keep` remain (their router rows) and each token picks `top_k`: the family's exact routing."""
    router = layer.router_module
    with applied(Edits()) as edits:
        if keep is not None:
            edits.set_param(router, "weight", router.weight[list(keep)])
            if getattr(router, "bias", None) is not None:
                edits.set_param(router, "bias", router.bias[list(keep)])
            for attr in expert_count_attrs(router):
                edits.set_attr(router, attr, len(keep))
        k = min(top_k or layer.top_k, len(keep) if keep is not None else layer.n_experts)
        edits.set_attr(router, "top_k", k)
        _, weights, index = router(x.to(router.weight.dtype))
    return weights.float(), index


def moe_output(weights: torch.Tensor, index: torch.Tensor, outputs: torch.Tensor) -> torch.Tensor:
    """Σ over the chosen experts of weight × output, from precomputed outputs (n, E', H)."""
    picked = outputs.gather(1, index[..., None].expand(-1, -1, outputs.shape[-1]))
    return (weights[..., None] * picked).sum(1)


# ------------------------------------------------------------------ NAEE
def renormalises(layer: Experts) -> bool:
    """Whether the router renormalises its top-k weights to sum to 1 (Mixtral; Qwen2-MoE and OLMoE
    with norm_topk_prob) — then removing experts leaves the weights' scale as it was."""
    return bool(getattr(layer.router_module, "norm_topk_prob", True))


@torch.no_grad()
def naee_keep(layer: Experts, x: torch.Tensor, n_keep: int, top_k: int | None = None,
              prob: torch.Tensor | None = None, max_subsets: int = 5000) -> tuple[list[int], float]:
    """NAEE: the subset of `n_keep` experts whose routed output on the sampled inputs x is
    closest (squared error) to the unpruned layer's. Memory-bounded and fast: every expert's output
    is computed once on the bounded sample, and each subset's error is read from per-token Gram
    matrices (tokens x E x E), never from its outputs. `prob` (mean router probabilities): the kept
    experts rescaled by their mass, as the mode does for routers that do not renormalise. Layers
    with more than `max_subsets` subsets fall back to greedy removal, one expert at a time."""
    outputs = all_expert_outputs(layer, x).double()
    reference = moe_output(*route(layer, x), outputs)
    gram = torch.einsum("neh,nfh->nef", outputs, outputs)
    cross = torch.einsum("neh,nh->ne", outputs, reference)
    base = float(reference.square().sum())
    n = layer.n_experts
    rescale = prob is not None and not renormalises(layer)

    def loss(subset) -> float:
        subset = list(subset)
        w, i = route(layer, x, subset, top_k)
        if rescale:
            w = w * float(prob[subset].sum())
        dense = torch.zeros(len(x), n, dtype=torch.float64).scatter_add_(1, torch.tensor(subset)[i], w.double())
        return float(torch.einsum("ne,nef,nf->", dense, gram, dense) - 2 * (dense * cross).sum()) + base

    if math.comb(n, n_keep) <= max_subsets:
        losses = {s: loss(s) for s in itertools.combinations(range(n), n_keep)}
        best = min(losses, key=losses.get)
        return list(best), losses[best]
    keep = list(range(n))
    while len(keep) > n_keep:
        keep = min((keep[:j] + keep[j + 1:] for j in range(len(keep))), key=loss)
    return keep, loss(keep)


# ------------------------------------------------------------------ merging
@torch.no_grad()
def merge_targets(layer: Experts, x: torch.Tensor, keep: list[int]) -> dict[int, int]:
    """For each removed expert, the kept expert its tokens go to next: among the sampled tokens
    the router sends to it, the kept expert with the highest router logit, most often; an
    expert no sampled token reaches goes to the kept one with the most similar router row."""
    rw = layer.router_module.weight.float()
    logits = x.to(rw.dtype) @ rw.T
    chosen = logits.topk(layer.top_k, dim=-1).indices
    kept = torch.tensor(keep)
    out = {}
    for j in range(layer.n_experts):
        if j in keep:
            continue
        tokens = (chosen == j).any(-1)
        if tokens.any():
            best = kept[logits[tokens][:, kept].argmax(-1)]
            out[j] = int(torch.bincount(best, minlength=layer.n_experts).argmax())
        else:
            sim = F.cosine_similarity(rw[j][None], rw[kept], dim=-1)
            out[j] = int(kept[sim.argmax()])
    return out


def neuron_features(layer: Experts, e: int) -> torch.Tensor:
    """(I, 3H): each intermediate neuron of expert e as its gate row, up row and down column."""
    gu, down = layer.module.gate_up_proj[e].float(), layer.module.down_proj[e].float()
    if getattr(layer.module, "is_transposed", False):
        gu, down = gu.T, down.T
    gate, up = gu.chunk(2, dim=0)
    return torch.cat([gate, up, down.T], dim=1)


def alignment(layer: Experts, into: int, e: int) -> torch.Tensor:
    """The permutation of expert e's neurons that best matches expert `into`'s (cosine of their
    gate, up and down weights, Hungarian assignment): permuting an expert's neurons leaves it
    the same function, and averaging matched neurons merges like with like."""
    a = F.normalize(neuron_features(layer, into), dim=1)
    b = F.normalize(neuron_features(layer, e), dim=1)
    _, cols = linear_sum_assignment((a @ b.T).numpy(), maximize=True)
    return torch.as_tensor(cols, dtype=torch.long)


def permute_neurons(edits: Edits, layer: Experts, perms: dict[int, torch.Tensor]) -> None:
    """Reorder the intermediate neurons of some experts (an exact reparametrisation)."""
    if not perms:
        return
    module = layer.module
    gate_up, down = module.gate_up_proj.detach().clone(), module.down_proj.detach().clone()
    transposed = getattr(module, "is_transposed", False)
    for e, p in perms.items():
        width = p.numel()
        rows = torch.cat([p, p + width])  # gate rows, then up rows
        if transposed:
            gate_up[e] = gate_up[e][:, rows]
            down[e] = down[e][p]
        else:
            gate_up[e] = gate_up[e][rows]
            down[e] = down[e][:, p]
    edits.set_param(module, "gate_up_proj", gate_up)
    edits.set_param(module, "down_proj", down)


# ------------------------------------------------------------------ least-squares merge
@torch.no_grad()
def routed_reference(layer: Experts, x: torch.Tensor) -> torch.Tensor:
    """(n, H) float64: the unpruned layer's routed output on the sampled inputs x."""
    return moe_output(*route(layer, x), all_expert_outputs(layer, x).double())


@torch.no_grad()
def refit_down(edits: Edits, layer: Experts, x: torch.Tensor, reference: torch.Tensor, ridge: float = 1.0) -> None:
    """Fold what the removed experts did into the kept ones: every kept expert's down projection
    refit jointly, by ridge least squares, so the pruned layer's routed output on the sampled
    inputs x (its own router, its top-k) matches the unpruned layer's `reference`. The routed output
    is linear in the down projections (Σ_r w_r(x) · D_r h_r(x)), so this is one solve per layer;
    the ridge pulls toward the current weights (a damping of `ridge` × the mean diagonal: strong,
    because a layer fitted closely on a few thousand tokens hurts the layers after it — on the
    derived MoE at 4/8, REAP's test perplexity went 121 -> 116, 112, 113, 116 at ridge 0.3, 1, 3, 10
    with 4096 tokens, and to 140 at 0.01)."""
    module = layer.module
    dtype = module.down_proj.dtype
    kept = module.down_proj.shape[0]
    weights, index = route(layer, x)  # the pruned layer's router and top-k
    w = torch.zeros(len(x), kept, dtype=torch.float64).scatter_add_(1, index, weights.double())
    xs = x.to(dtype)
    feats = torch.cat([w[:, r:r + 1] * expert_hidden(module, r, xs).double() for r in range(kept)], 1)
    transposed = getattr(module, "is_transposed", False)
    current = module.down_proj.detach().double()  # (k, H, I), or (k, I, H) transposed
    stacked = torch.cat([d if transposed else d.T for d in current])  # (k·I, H)
    gram = feats.T @ feats
    damp = ridge * float(gram.diagonal().mean()) + 1e-12
    solved = torch.linalg.solve(gram + damp * torch.eye(len(gram), dtype=gram.dtype),
                                feats.T @ reference.double() + damp * stacked)
    blocks = solved.reshape(kept, -1, solved.shape[1])  # (k, I, H)
    edits.set_param(module, "down_proj", (blocks if transposed else blocks.transpose(1, 2)).to(dtype).contiguous())
