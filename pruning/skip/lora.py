"""SkipGPT's optional second stage: LoRA adapters (peft) on the base's linear layers, trained with the
routers frozen and their hard decisions applied, so the base adapts to the modules it loses.

peft injects its LoRA layers in place; they are always taken out again (in `finally`) and only
each adapted layer's merged delta ΔW = scale·B·A is kept — a plain tensor per prunable unit, which
the skip mode adds to the weights through its Edits journal (restorable, cached, saved with the
model)."""

from __future__ import annotations

import time

import torch

from ..interventions import applied
from .skipping import install, routed

LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def _lora_layers(model):
    # peft: only the optional LoRA stage (lora_steps > 0) needs it
    from peft.tuners.lora import LoraLayer

    return [(name, m) for name, m in model.named_modules() if isinstance(m, LoraLayer)]


def _unload(model) -> None:
    for name, layer in _lora_layers(model):
        parent_name, _, attr = name.rpartition(".")
        setattr(model.get_submodule(parent_name), attr, layer.get_base_layer())


def train_lora(ctx, cfg, routerset, windows: torch.Tensor, log=print) -> tuple[dict[str, torch.Tensor], float]:
    """ΔW per prunable unit after `cfg.lora_steps` steps of LoRA under the frozen routers."""
    # peft: only the optional LoRA stage (lora_steps > 0) needs it
    from peft import LoraConfig, inject_adapter_in_model


    units = [u for u in ctx.units if u.expert is None and u.name.rpartition(".")[2] in LORA_TARGETS]
    config = LoraConfig(r=cfg.lora_rank, lora_alpha=2 * cfg.lora_rank, lora_dropout=0.0,
                        target_modules=[u.name for u in units])
    t0 = time.perf_counter()
    deltas: dict[str, torch.Tensor] = {}
    try:
        inject_adapter_in_model(config, ctx.model)
        params = [p for n, p in ctx.model.named_parameters() if "lora_" in n]
        for p in params:
            p.requires_grad_(True)
        opt = torch.optim.Adam(params, lr=cfg.lora_lr)
        subs = routed(ctx.structure, cfg.kinds)
        with applied() as edits:
            for s, r in zip(subs, routerset.routers):
                install(edits, s, r.to(ctx.device).requires_grad_(False), "multiply")
            for step in range(cfg.lora_steps):
                ids = windows[(step * cfg.batch) % len(windows):][:cfg.batch].to(ctx.device)
                with torch.enable_grad():
                    loss = ctx.model(ids, labels=ids, use_cache=False).loss
                    opt.zero_grad(set_to_none=True)
                    loss.backward()
                opt.step()
                if (step + 1) % 10 == 0 or step + 1 == cfg.lora_steps:
                    log(f"lora: step {step + 1}/{cfg.lora_steps} loss {float(loss.detach()):.3f}")
        for name, layer in _lora_layers(ctx.model):
            deltas[name] = layer.get_delta_weight("default").detach().float().cpu()
    finally:
        _unload(ctx.model)
    return deltas, round(time.perf_counter() - t0, 1)


@torch.no_grad()
def apply_deltas(edits, units, deltas: dict[str, torch.Tensor]) -> None:
    """Add each unit's ΔW to its weight, through the journal."""
    by_name = {u.name: u for u in units}
    for name, delta in deltas.items():
        if name not in by_name:
            raise ValueError(f"LoRA delta for {name}, which this model does not have")
        w = by_name[name].weight
        edits.write(w, (w.float() + delta.to(w.device)).to(w.dtype))
