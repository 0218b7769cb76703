"""One way to save and load a model whose shape transformers cannot express (per-block widths, routers
inside the forward, different expert counts per layer): the modes that reshape (structured, skip,
experts) call these with their marker file and their plan.

A reshaped directory holds the real config as `prunerzero_config.json` behind a guard `config.json`
that plain transformers refuses (naming `prunerzero.models.loading.load_model`), the weights as
`model.safetensors`, and the mode's marker file: its plan as JSON. Loading builds the model from
the config with empty (meta-device) parameters, lets the mode rebuild its shape from the plan
(checked first: the marker is outside any checksum), then assigns every tensor strictly — the
dense model's weights are never allocated, so a pruned model loads in less memory and time. A mode's recipe names (marker, loader),
and registering it adds them to `prunerzero.models.loading.RESHAPED`.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

from accelerate import init_empty_weights
from safetensors.torch import save_model

from prunerzero.core.paths import atomic_write_text
from prunerzero.models.loading import load_saved_weights, save_reshaped_config, saved_config


def save_reshaped(model, config, out, marker: str, mode: str, doc: dict) -> None:
    """`model`'s tensors, `config` behind the guard, and `doc` (the plan) in `marker`."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    save_reshaped_config(config, out, marker, mode)  # plain transformers refuses it, naming our loader
    save_model(model, str(out / "model.safetensors"))
    atomic_write_text(out / marker, json.dumps(doc))


def load_reshaped(path, dtype, marker: str, read: Callable[[dict], object],
                  rebuild: Callable[[object, object, str], None], error: type[Exception] = ValueError,
                  damaged: str = "not what a prunerzero mode wrote"):
    """The model a mode saved: `read(doc)` takes its plan out of the marker's JSON (a KeyError or
    TypeError there: the file is damaged, `error` says so with `damaged`); `rebuild(model, plan,
    where)` checks the plan and gives the dense model its shape; then the weights, strictly."""
    from transformers import AutoModelForCausalLM  # transformers takes seconds to import: only a load needs it

    path = Path(path)
    try:
        plan = read(json.loads((path / marker).read_text()))
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise error(f"{path / marker} is damaged ({type(e).__name__}: {e}): {damaged}") from None
    with init_empty_weights(include_buffers=False):  # parameters on the meta device: no dense copy in memory
        model = AutoModelForCausalLM.from_config(saved_config(path), dtype=dtype)
    rebuild(model, plan, str(path / marker))
    load_saved_weights(model, path, marker)
    return model
