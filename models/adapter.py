"""One adapter for every supported causal LM: finds the decoder blocks, the prunable units inside
them and the input taps that observe those units' inputs.

Discovery goes by structure, never by model family: the blocks are the `nn.ModuleList` whose
length is `config.num_hidden_layers`; inside a block every `nn.Linear` is a unit (its role read
from its attribute name), every fused-experts module (3-D `gate_up_proj` and `down_proj`, as
transformers 5 stores Mixtral, Qwen2-MoE and OLMoE experts) gives three units per expert, and a
weight of shape (E, H) beside an E-expert module is that block's router. Any other weight of
two or more dimensions in a block is refused rather than silently left dense.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from functools import cached_property

import torch
import torch.nn.functional as F
from torch import nn

from .structure import ModelStructure
from .units import DEFAULT_PRUNED_ROLES, ROLES, InputTap, PrunableUnit, TapFn, UnsupportedModelError

# Role of an nn.Linear by its attribute name; Mixtral-style w1/w3/w2 are gate/up/down.
ROLE_BY_NAME = {
    "q_proj": "q",
    "k_proj": "k",
    "v_proj": "v",
    "o_proj": "o",
    "gate_proj": "gate",
    "up_proj": "up",
    "down_proj": "down",
    "w1": "gate",
    "w3": "up",
    "w2": "down",
    "shared_expert_gate": "shared_gate",
}

# Layout flags that transformers' `use_experts_implementation` records on fused experts, with
# the values whose (E, 2I, H) / (E, H, I) slices are (out, in) weights without a bias.
_EXPERTS_LAYOUT = {"is_transposed": False, "is_concatenated": True, "has_bias": False, "has_gate": True}


def find_blocks(model: nn.Module) -> tuple[str, nn.ModuleList]:
    """The decoder blocks: the first `nn.ModuleList` of `config.num_hidden_layers` modules."""
    model_cls = type(model).__name__
    config = getattr(model, "config", None)
    if hasattr(config, "get_text_config"):  # multimodal configs keep the LM's under text_config
        config = config.get_text_config()
    n_layers = getattr(config, "num_hidden_layers", None)
    if n_layers is None:
        raise UnsupportedModelError(
            f"{model_cls}: no config.num_hidden_layers to locate the decoder blocks by"
        )
    for name, module in model.named_modules():
        if isinstance(module, nn.ModuleList) and len(module) == n_layers:
            return name, module
    raise UnsupportedModelError(
        f"{model_cls}: no nn.ModuleList of {n_layers} decoder blocks (config.num_hidden_layers)"
    )


def _is_fused_experts(module: nn.Module) -> bool:
    params = dict(module.named_parameters(recurse=False))
    return all(key in params and params[key].dim() == 3 for key in ("gate_up_proj", "down_proj"))


def _check_experts(model_cls: str, name: str, module: nn.Module) -> None:
    """Refuse fused experts whose slices would not be the weights the forward multiplies by."""
    where = f"{model_cls}: fused experts {name} ({type(module).__name__})"
    for flag, supported in _EXPERTS_LAYOUT.items():
        if getattr(module, flag, supported) != supported:
            raise UnsupportedModelError(f"{where} have {flag}={not supported}; only {_EXPERTS_LAYOUT} is supported")
    (n_experts, two_inter, hidden), down = module.gate_up_proj.shape, module.down_proj.shape
    if two_inter % 2 or tuple(down) != (n_experts, hidden, two_inter // 2):
        raise UnsupportedModelError(
            f"{where}: gate_up_proj {tuple(module.gate_up_proj.shape)} and down_proj {tuple(down)} "
            "are not (E, 2I, H) and (E, H, I)"
        )
    if not callable(getattr(module, "act_fn", None)):
        raise UnsupportedModelError(f"{where} have no act_fn to recompute the intermediate act(gate) * up")


def _is_router(module: nn.Module, parent: nn.Module | None) -> bool:
    """A router is a weight (E, H) held beside a fused-experts module of E experts."""
    weight = getattr(module, "weight", None)
    if parent is None or not isinstance(weight, nn.Parameter) or weight.dim() != 2:
        return False
    return any(
        _is_fused_experts(sibling) and sibling.gate_up_proj.shape[0] == weight.shape[0]
        for sibling in parent.children()
    )


def _first_input(args: tuple, kwargs: dict) -> torch.Tensor:
    return args[0] if args else next(iter(kwargs.values()))


def _single_input_tap(name: str) -> TapFn:
    """Tap of a module with one input (a Linear or a router): its input rows."""

    def fn(module, args, kwargs, output):
        x = _first_input(args, kwargs).detach()
        return [(name, x.reshape(-1, x.shape[-1]))]

    return fn


def expert_tap_names(experts_name: str, expert: int) -> tuple[str, str]:
    """Names of the taps seeing expert `expert`'s input (gate, up) and intermediate (down)."""
    return f"{experts_name}[{expert}].in", f"{experts_name}[{expert}].mid"


def _call_arg(args: tuple, kwargs: dict, position: int, name: str) -> torch.Tensor:
    return args[position] if len(args) > position else kwargs[name]


def _experts_tap(name: str) -> TapFn:
    """Tap of a fused-experts module: per expert that got tokens, the rows routed to it and the
    intermediate act(gate) * up its down projection sees, recomputed from the call's routing."""

    def fn(module, args, kwargs, output):
        hidden = _call_arg(args, kwargs, 0, "hidden_states")
        top_k_index = _call_arg(args, kwargs, 1, "top_k_index")
        n_experts = module.gate_up_proj.shape[0]
        rows = []
        with torch.no_grad():
            hidden = hidden.detach().reshape(-1, hidden.shape[-1])
            for expert in top_k_index.unique().tolist():
                if not 0 <= expert < n_experts:  # transformers marks masked-out tokens with E
                    continue
                x = hidden[(top_k_index == expert).any(dim=-1)]
                gate, up = F.linear(x, module.gate_up_proj[expert]).chunk(2, dim=-1)
                tap_in, tap_mid = expert_tap_names(name, expert)
                rows += [(tap_in, x), (tap_mid, module.act_fn(gate) * up)]
        return rows

    return fn


def _whole_weight(name: str, block: int, role: str, module: nn.Module) -> tuple[list[PrunableUnit], InputTap]:
    unit = PrunableUnit(name, block, role, None, module.weight, (), tap=name)
    return [unit], InputTap(module, block, (name,), _single_input_tap(name))


def _expert_units(name: str, block: int, module: nn.Module) -> tuple[list[PrunableUnit], InputTap]:
    n_experts, two_inter, _ = module.gate_up_proj.shape
    inter = two_inter // 2
    units, tap_names = [], []
    for e in range(n_experts):
        tap_in, tap_mid = expert_tap_names(name, e)
        tap_names += [tap_in, tap_mid]
        gate_up = f"{name}.gate_up_proj[{e}]"
        units += [
            PrunableUnit(f"{gate_up}.gate", block, "gate", e, module.gate_up_proj, (e, slice(0, inter)), tap_in),
            PrunableUnit(f"{gate_up}.up", block, "up", e, module.gate_up_proj, (e, slice(inter, None)), tap_in),
            PrunableUnit(f"{name}.down_proj[{e}]", block, "down", e, module.down_proj, (e,), tap_mid),
        ]
    return units, InputTap(module, block, tuple(tap_names), _experts_tap(name))


def _declared_role(parent: nn.Module | None, attr: str) -> str | None:
    """What a wrapper says its Linear is: `prunerzero_role` (a mode's own layer, e.g. a skip
    router), or the role of the attribute it stands in for (`prunerzero_wraps = (attr, name)`:
    a wrapper at `q_proj` holding the Linear as `.linear`)."""
    if parent is None:
        return None
    if getattr(parent, "prunerzero_role", None):
        return parent.prunerzero_role
    wraps = getattr(parent, "prunerzero_wraps", None)
    return ROLE_BY_NAME.get(wraps[0]) if wraps and wraps[1] == attr else None


def _reject_unknown_weights(model_cls: str, name: str, module: nn.Module) -> None:
    for param_name, param in module.named_parameters(recurse=False):
        if param.dim() >= 2:
            raise UnsupportedModelError(
                f"{model_cls}: {name}.{param_name} ({type(module).__name__}, shape {tuple(param.shape)}) "
                "is neither an nn.Linear weight, a fused-experts tensor nor a router weight"
            )


def _discover_block(
    model_cls: str, block: int, prefix: str, module: nn.Module
) -> tuple[list[PrunableUnit], list[InputTap]]:
    modules = dict(module.named_modules(prefix=prefix))
    units, taps = [], []
    for name, child in modules.items():
        parent_name, _, attr = name.rpartition(".")
        parent = modules.get(parent_name) if name != prefix else None
        router = _is_router(child, parent)
        if _is_fused_experts(child):
            _check_experts(model_cls, name, child)
            found, tap = _expert_units(name, block, child)
        elif isinstance(child, nn.Linear) or router:
            role = _declared_role(parent, attr) or ROLE_BY_NAME.get(attr) or ("router" if router else "other")
            found, tap = _whole_weight(name, block, role, child)
        else:
            _reject_unknown_weights(model_cls, name, child)
            continue
        units += found
        taps.append(tap)
    if not units and any(True for _ in module.parameters()):  # a block without parameters: removed, passed through
        raise UnsupportedModelError(f"{model_cls}: decoder block {prefix} holds no nn.Linear or fused experts")
    return units, taps


def _check_roles(roles: Iterable[str]) -> frozenset[str]:
    roles = frozenset(roles)
    unknown = sorted(roles - set(ROLES))
    if unknown:
        raise ValueError(f"unknown unit roles {unknown}; roles are {ROLES}")
    return roles


class ModelAdapter:
    """The prunable units and input taps of one causal LM."""

    def __init__(self, model: nn.Module):
        self.model = model
        self.blocks_name, self.blocks = find_blocks(model)
        model_cls = type(model).__name__
        found = [
            _discover_block(model_cls, i, f"{self.blocks_name}.{i}", block) for i, block in enumerate(self.blocks)
        ]
        self.units: list[PrunableUnit] = [unit for units, _ in found for unit in units]
        self._taps: list[InputTap] = [tap for _, taps in found for tap in taps]

    @cached_property
    def structure(self):
        """Heads, KV heads, MLP channels, experts, sublayers and blocks (models/structure.py)."""
        return ModelStructure(self)

    def prunable(self, roles: Iterable[str] = DEFAULT_PRUNED_ROLES) -> list[PrunableUnit]:
        roles = _check_roles(roles)
        return [unit for unit in self.units if unit.role in roles]

    def block_units(self, block: int, roles: Iterable[str] = DEFAULT_PRUNED_ROLES) -> list[PrunableUnit]:
        self._check_blocks([block])
        return [unit for unit in self.prunable(roles) if unit.block == block]

    def taps(self, blocks: Iterable[int] | None = None) -> list[InputTap]:
        """The input taps of the given blocks (all blocks by default)."""
        if blocks is None:
            return list(self._taps)
        wanted = self._check_blocks(blocks)
        return [tap for tap in self._taps if tap.block in wanted]

    @contextmanager
    def capture(
        self, callback: Callable[[str, torch.Tensor], None], blocks: Iterable[int] | None = None
    ) -> Iterator[None]:
        """While inside, every forward through a tapped module calls `callback(tap name, rows)`
        with the unit inputs as a detached (tokens, in) tensor, possibly a view of the model's
        activations: read it, do not modify it. The hooks go on exit, also on error."""
        handles = [
            tap.module.register_forward_hook(_hook(tap, callback), with_kwargs=True) for tap in self.taps(blocks)
        ]
        try:
            yield
        finally:
            for handle in handles:
                handle.remove()

    def _check_blocks(self, blocks: Iterable[int]) -> set[int]:
        blocks = set(blocks)
        bad = sorted(b for b in blocks if not 0 <= b < len(self.blocks))
        if bad:
            raise IndexError(f"blocks {bad} out of range: the model has {len(self.blocks)} decoder blocks")
        return blocks


def _hook(tap: InputTap, callback: Callable[[str, torch.Tensor], None]):
    def hook(module, args, kwargs, output):
        for name, rows in tap.fn(module, args, kwargs, output):
            callback(name, rows)

    return hook
