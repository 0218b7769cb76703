"""Words for structure: what the pruning modes choose among, above single weights.

Every mode scores and removes *groups* of weights: an attention head (its q rows and o columns),
a key/value head (its k and v rows with the query heads that read it), a group of MLP channels
(gate and up rows with the matching down columns), an expert (its three matrices and its router
row), a sublayer (a block's attention or MLP, with a handle on the module) and a whole block.
`ModelStructure` finds them by structure for every family the adapter supports, from the units
the adapter already discovered — no family names anywhere.

A group is a tuple of `Part`s, each a contiguous slice of one unit along one axis, so the same
metric scores (one tensor per unit) reduce to any group by slicing (pruning/reduce.py).
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass
from functools import cached_property

import torch
from torch import nn

from .units import PrunableUnit, UnsupportedModelError

# The attributes that hold an MoE's routed expert count, on configs, MoE modules and routers (by family:
# Mixtral's num_local_experts, Qwen-MoE's num_experts): every reader and writer of the count uses these.
EXPERT_COUNTS = ("num_local_experts", "num_experts")


def expert_count_attrs(obj) -> list[str]:
    """The expert-count attributes `obj` (a config, an MoE module, a router) has, as integers."""
    return [a for a in EXPERT_COUNTS if isinstance(getattr(obj, a, None), int)]


KINDS = ("head", "kv_head", "channel", "expert", "sublayer", "block")


class StructureError(ValueError):
    """A structural request the model cannot satisfy (a channel width that does not divide, …)."""


@dataclass(frozen=True, eq=False)
class Part:
    """Rows (axis 0) or columns (axis 1) [start, stop) of one unit's (out, in) weight."""

    unit: PrunableUnit
    axis: int
    start: int
    stop: int

    def of(self, t: torch.Tensor) -> torch.Tensor:
        """The same slice of any tensor of the unit's shape (scores, masks, G)."""
        return t[self.start:self.stop] if self.axis == 0 else t[:, self.start:self.stop]

    @property
    def weight(self) -> torch.Tensor:
        return self.of(self.unit.weight)

    @property
    def numel(self) -> int:
        other = self.unit.shape[1 - self.axis]
        return (self.stop - self.start) * other


def whole(unit: PrunableUnit) -> Part:
    return Part(unit, 0, 0, unit.shape[0])


@dataclass(frozen=True, eq=False)
class Group:
    """A set of weights a mode keeps or removes together."""

    kind: str  # one of KINDS
    block: int
    index: int  # within the block (head, channel group, expert, 0 = attention / 1 = MLP sublayer)
    name: str
    parts: tuple[Part, ...]  # the prunable weights of the group: they score it and go with it
    links: tuple[Part, ...] = ()  # weights that go with it but do not score it (an expert's router row)
    module: nn.Module | None = None  # sublayers and blocks: the module itself

    @property
    def numel(self) -> int:
        return sum(p.numel for p in self.parts)


@dataclass(eq=False)
class Attention:
    """A block's attention: projections and the grouped-query layout (query head h reads
    key/value head h // group_size)."""

    block: int
    name: str
    module: nn.Module
    q: PrunableUnit
    k: PrunableUnit
    v: PrunableUnit
    o: PrunableUnit
    head_dim: int
    n_heads: int
    n_kv_heads: int

    @property
    def group_size(self) -> int:
        return self.n_heads // self.n_kv_heads

    def kv_of(self, head: int) -> int:
        return head // self.group_size


@dataclass(eq=False)
class Mlp:
    """A gated MLP, down(act(gate(x)) * up(x)): a block's dense MLP or a shared expert."""

    block: int
    name: str
    module: nn.Module
    gate: PrunableUnit
    up: PrunableUnit
    down: PrunableUnit

    @property
    def width(self) -> int:
        return self.gate.shape[0]


@dataclass(eq=False)
class Experts:
    """A block's routed experts (fused, as transformers 5 stores them) and their router."""

    block: int
    name: str  # the fused-experts module
    module: nn.Module
    moe: nn.Module  # the sparse-MoE module that holds router and experts
    router: PrunableUnit  # weight (E, H)
    router_module: nn.Module
    units: tuple[tuple[PrunableUnit, PrunableUnit, PrunableUnit], ...]  # (gate, up, down) per expert
    shared: Mlp | None = None  # an always-active shared expert (Qwen2-MoE), if any

    @property
    def n_experts(self) -> int:
        return len(self.units)

    @property
    def top_k(self) -> int:
        for module in (self.router_module, self.moe):
            k = getattr(module, "top_k", None)
            if isinstance(k, int):
                return k
        raise StructureError(f"{self.name}: no top_k on its router or MoE module")


@dataclass(eq=False)
class Sublayer:
    """A block's attention or MLP branch as the block calls it: `parent.<attr>` is `module`, so a
    mode can wrap or replace it (skipping it leaves the residual stream unchanged)."""

    block: int
    kind: str  # "attention" or "mlp"
    parent: nn.Module  # the decoder block
    parent_name: str
    attr: str
    module: nn.Module

    @property
    def name(self) -> str:
        return f"{self.parent_name}.{self.attr}"

    def holds(self, unit: PrunableUnit) -> bool:
        return unit.name.startswith(self.name + ".")


@dataclass(eq=False)
class BlockStructure:
    index: int
    name: str
    module: nn.Module
    attention: Attention | None
    mlp: Mlp | None  # the dense MLP (None in an MoE block; see experts.shared)
    experts: Experts | None
    sublayers: tuple[Sublayer, ...]
    units: tuple[PrunableUnit, ...]  # the block's prunable units


class ModelStructure:
    """The structure of one model, discovered from a ModelAdapter."""

    def __init__(self, adapter):
        self.adapter = adapter
        self.model = adapter.model
        pruned = set(map(id, adapter.prunable()))
        by_block = defaultdict(list)
        for u in adapter.units:
            by_block[u.block].append(u)
        self.blocks = [
            _discover(self.model, i, f"{adapter.blocks_name}.{i}", module, by_block[i], pruned)
            for i, module in enumerate(adapter.blocks)
        ]

    # ------------------------------------------------------------ groups
    def groups(self, kind: str, **options) -> list[Group]:
        """Groups of one kind, by name (`channel` takes `width`)."""
        table = {"head": self.heads, "kv_head": self.kv_heads, "channel": self.channels,
                 "expert": self.experts, "sublayer": self.sublayers, "block": self.block_groups}
        if kind not in table:
            raise StructureError(f"unknown group kind {kind!r}; kinds: {', '.join(KINDS)}")
        return table[kind](**options)

    def heads(self) -> list[Group]:
        """One group per query head: its q rows and o columns."""
        out = []
        for a in self.attentions:
            d = a.head_dim
            for h in range(a.n_heads):
                rows, cols = Part(a.q, 0, h * d, (h + 1) * d), Part(a.o, 1, h * d, (h + 1) * d)
                out.append(Group("head", a.block, h, f"block{a.block}.head{h}", (rows, cols)))
        return out

    def kv_heads(self) -> list[Group]:
        """One group per key/value head: its k and v rows, and the q rows and o columns of the
        query heads that read it (removing a KV head removes them too)."""
        out = []
        for a in self.attentions:
            d, g = a.head_dim, a.group_size
            for kv in range(a.n_kv_heads):
                q0, q1 = kv * g * d, (kv + 1) * g * d
                parts = (Part(a.q, 0, q0, q1), Part(a.k, 0, kv * d, (kv + 1) * d), Part(a.v, 0, kv * d, (kv + 1) * d),
                         Part(a.o, 1, q0, q1))
                out.append(Group("kv_head", a.block, kv, f"block{a.block}.kv{kv}", parts))
        return out

    def channels(self, width: int = 1) -> list[Group]:
        """MLP channels in groups of `width` consecutive intermediate neurons: gate and up rows with
        the matching down columns (dense MLPs and shared experts)."""
        if width < 1:
            raise StructureError(f"channel group width must be >= 1, got {width}")
        out = []
        for m in self.mlps:
            if m.width % width:
                raise StructureError(
                    f"channel group width {width} does not divide the MLP width {m.width} of {m.name}: "
                    f"use a divisor of {m.width}")
            for c in range(m.width // width):
                a, b = c * width, (c + 1) * width
                parts = (Part(m.gate, 0, a, b), Part(m.up, 0, a, b), Part(m.down, 1, a, b))
                out.append(Group("channel", m.block, c, f"{m.name}.ch{a}:{b}", parts))
        return out

    def experts(self) -> list[Group]:
        """One group per routed expert: its gate, up and down matrices; its router row as a link."""
        out = []
        for ex in self.expert_layers:
            for e, (gate, up, down) in enumerate(ex.units):
                out.append(Group("expert", ex.block, e, f"{ex.name}[{e}]", (whole(gate), whole(up), whole(down)),
                                 links=(Part(ex.router, 0, e, e + 1),)))
        return out

    def sublayers(self) -> list[Group]:
        """Each block's attention (index 0) and MLP (index 1) branch with its prunable units."""
        out = []
        for b in self.blocks:
            for s in b.sublayers:
                parts = tuple(whole(u) for u in b.units if s.holds(u))
                out.append(Group("sublayer", b.index, 0 if s.kind == "attention" else 1, s.name, parts,
                                 module=s.module))
        return out

    def block_groups(self) -> list[Group]:
        return [Group("block", b.index, 0, b.name, tuple(whole(u) for u in b.units), module=b.module)
                for b in self.blocks]

    # ------------------------------------------------------------ per-block views
    @cached_property
    def attentions(self) -> list[Attention]:
        return [b.attention for b in self.blocks if b.attention is not None]

    @cached_property
    def mlps(self) -> list[Mlp]:
        out = []
        for b in self.blocks:
            if b.mlp is not None:
                out.append(b.mlp)
            elif b.experts is not None and b.experts.shared is not None:
                out.append(b.experts.shared)
        return out

    @cached_property
    def expert_layers(self) -> list[Experts]:
        return [b.experts for b in self.blocks if b.experts is not None]

    @property
    def is_moe(self) -> bool:
        return bool(self.expert_layers)


def _parent(name: str) -> str:
    return name.rpartition(".")[0]


def _discover(model: nn.Module, index: int, prefix: str, block: nn.Module, units: list[PrunableUnit],
              pruned: set[int]) -> BlockStructure:
    by_parent: dict[str, dict[str, PrunableUnit]] = defaultdict(dict)
    for u in units:
        if u.expert is None and u.role in ("q", "k", "v", "o", "gate", "up", "down"):
            by_parent[_parent(u.name)][u.role] = u
    attention = mlp = experts = None
    shared = None
    for parent, roles in by_parent.items():
        if {"q", "k", "v", "o"} <= roles.keys():
            attention = _attention(model, index, parent, roles)
        if {"gate", "up", "down"} <= roles.keys():
            found = Mlp(index, parent, model.get_submodule(parent), roles["gate"], roles["up"], roles["down"])
            if _is_shared_expert(model, parent):
                shared = found
            else:
                mlp = found
    expert_units = [u for u in units if u.expert is not None]
    if expert_units:
        experts = _experts(model, index, expert_units, units, shared)
    subs = []
    for kind, inner in (("attention", attention.name if attention else None),
                        ("mlp", (experts.name if experts else mlp.name if mlp else None))):
        if inner is None:
            continue
        attr = inner[len(prefix) + 1:].split(".")[0]
        subs.append(Sublayer(index, kind, block, prefix, attr, getattr(block, attr)))
    block_units = tuple(u for u in units if id(u) in pruned)
    return BlockStructure(index, prefix, block, attention, mlp, experts, tuple(subs), block_units)


def _is_shared_expert(model: nn.Module, name: str) -> bool:
    """A gated MLP that sits beside routed experts (inside the sparse-MoE module)."""
    parent = model.get_submodule(_parent(name))
    return any(_fused(c) for c in parent.children())


def _fused(module: nn.Module) -> bool:
    p = dict(module.named_parameters(recurse=False))
    return "gate_up_proj" in p and "down_proj" in p and p["gate_up_proj"].dim() == 3


def _attention(model: nn.Module, index: int, name: str, roles: dict[str, PrunableUnit]) -> Attention:
    module = model.get_submodule(name)
    q, k = roles["q"], roles["k"]
    config = getattr(model, "config", None)
    if hasattr(config, "get_text_config"):
        config = config.get_text_config()
    head_dim = getattr(module, "head_dim", None) or getattr(config, "head_dim", None)
    if not head_dim:
        head_dim = config.hidden_size // config.num_attention_heads
    n_heads, n_kv = q.shape[0] // head_dim, k.shape[0] // head_dim
    if q.shape[0] % head_dim or k.shape[0] % head_dim or n_kv == 0 or n_heads % n_kv:
        raise UnsupportedModelError(
            f"{name}: q {tuple(q.shape)} and k {tuple(k.shape)} are not whole heads of {head_dim} "
            "with query heads a multiple of key/value heads")
    return Attention(index, name, module, q, k, roles["v"], roles["o"], int(head_dim), n_heads, n_kv)


def _experts(model, index: int, expert_units: list[PrunableUnit], units: list[PrunableUnit],
             shared: Mlp | None) -> Experts:
    name = expert_units[0].tap.rpartition("[")[0]
    module = model.get_submodule(name)
    per_expert: dict[int, dict[str, PrunableUnit]] = defaultdict(dict)
    for u in expert_units:
        per_expert[u.expert][u.role] = u
    triples = tuple((per_expert[e]["gate"], per_expert[e]["up"], per_expert[e]["down"]) for e in sorted(per_expert))
    moe_name = _parent(name)
    router = next(u for u in units if u.role == "router" and _parent(u.name) == moe_name)
    return Experts(index, name, module, model.get_submodule(moe_name), router, model.get_submodule(router.name),
                   triples, shared)
