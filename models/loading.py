"""Load a causal LM and its tokenizer by zoo name, local path or Hugging Face hub id."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from . import zoo


class ModelLoadError(RuntimeError):
    pass


@dataclass
class LoadedModel:
    name: str  # what the user asked for
    path: str  # what from_pretrained loaded
    model: torch.nn.Module
    tokenizer: object
    device: torch.device
    dtype: torch.dtype


def resolve_device(device: str = "auto") -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ModelLoadError(f"device {device!r} asked for, but no CUDA device is available")
    return dev


def resolve_dtype(dtype: str, device: torch.device) -> torch.dtype:
    if dtype == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    table = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
             "float16": torch.float16, "fp16": torch.float16}
    if dtype not in table:
        raise ModelLoadError(f"unknown dtype {dtype!r}: use auto, float32, bfloat16 or float16")
    return table[dtype]


def model_source(name: str, fetch: bool = True) -> str:
    """The path or hub id that from_pretrained should load for `name`."""
    if name in zoo.ZOO:
        return str(zoo.fetch(name) if fetch else zoo.zoo_path(name))
    if Path(name).exists():
        if not (Path(name) / "config.json").is_file():
            raise ModelLoadError(f"model path {name!r} has no config.json: not a Hugging Face model directory")
        return name
    if name.count("/") == 1 and not name.startswith((".", "/")):
        return name  # a hub id: from_pretrained resolves it (or says why it cannot)
    raise ModelLoadError(
        f"unknown model {name!r}: use a zoo name ({', '.join(zoo.ZOO)}), a local model directory "
        "or a Hugging Face hub id such as 'HuggingFaceTB/SmolLM2-135M'"
    )


# Models a pruning mode saved in a shape transformers' config cannot express: the marker file in
# the model directory -> a function (directory, dtype) -> model. Modes register themselves
# (pruning/modes.py), so this floor needs no knowledge of them.
RESHAPED: dict[str, Callable] = {}


def _from_pretrained(src: str, dtype: torch.dtype):
    from transformers import AutoModelForCausalLM

    for marker, load in RESHAPED.items():
        if (Path(src) / marker).is_file():
            return load(src, dtype)
    if Path(src).is_dir() and any(Path(src).glob("prunerzero_*.json")):
        raise ModelLoadError(f"{src} holds a model a pruning mode reshaped: load it through prunerzero "
                             "(import prunerzero.pruning.modes first, which registers the loaders)")
    return AutoModelForCausalLM.from_pretrained(src, dtype=dtype)


def load_model(name: str, device: str = "auto", dtype: str = "auto") -> LoadedModel:
    from transformers import AutoTokenizer

    dev = resolve_device(device)
    dt = resolve_dtype(dtype, dev)
    src = model_source(name)
    try:
        tokenizer = AutoTokenizer.from_pretrained(src)
        model = _from_pretrained(src, dt)
    except OSError as e:
        raise ModelLoadError(
            f"could not load model {name!r} from {src!r}: {e}\n"
            "If this is a hub id and this machine has no hub access, use a local directory or the "
            f"offline zoo ({', '.join(zoo.ZOO)})."
        ) from None
    model.to(dev).eval()
    model.requires_grad_(False)
    return LoadedModel(name=name, path=src, model=model, tokenizer=tokenizer, device=dev, dtype=dt)


def count_blocks(name: str) -> int:
    """The number of decoder blocks of a model, from its config alone (no weights loaded)."""
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(model_source(name))
    if hasattr(config, "get_text_config"):
        config = config.get_text_config()
    return int(config.num_hidden_layers)
