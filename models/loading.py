"""Load a causal LM and its tokenizer by zoo name, local path or Hugging Face hub id."""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import load_file as load_safetensors_file

from prunerzero.core.paths import atomic_write_text

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
# Such a directory's config.json holds only a model_type transformers does not know, whose text
# names this loader: plain `from_pretrained` fails saying what to do instead of building the dense
# model with random weights where the saved ones do not fit. The real config is REAL_CONFIG.
REAL_CONFIG = "prunerzero_config.json"
GUARD_KEY = "prunerzero_marker"  # in the guard config.json: the marker file the directory needs
LOADER = "prunerzero.models.loading.load_model"


def save_reshaped_config(config, out: Path, marker: str, mode: str) -> None:
    """Write a reshaped model's config: the real one as REAL_CONFIG, a guard as config.json."""
    out = Path(out)
    atomic_write_text(out / REAL_CONFIG, config.to_json_string())
    note = (f"prunerzero-{mode}: saved by prunerzero's {mode} mode in a shape transformers cannot express; "
            f"plain transformers would load it wrong, so load it with {LOADER}(path) after `import "
            "prunerzero.pruning.modes`, or with any prunerzero command (prunerzero eval --model path)")
    atomic_write_text(out / "config.json", json.dumps({"model_type": note, GUARD_KEY: marker}, indent=2) + "\n")


def saved_config(path):
    """The model config of a directory: REAL_CONFIG where a pruning mode wrote one, else config.json."""
    # transformers takes seconds to import: only reading a model's config needs it
    from transformers import AutoConfig
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING

    real = Path(path) / REAL_CONFIG
    if not real.is_file():
        return AutoConfig.from_pretrained(path)
    try:
        data = json.loads(real.read_text())
        return CONFIG_MAPPING[data["model_type"]].from_dict(data)
    except (ValueError, KeyError, TypeError) as e:
        raise ModelLoadError(f"{real}: not a model config ({type(e).__name__}: {str(e)[:200]})") from None


def load_saved_weights(model, path, marker: str) -> None:
    """A reshaped directory's tensors into the model its marker shaped, strictly (a missing or
    mis-shaped tensor is an error naming both files, in one line). The model may hold its
    parameters on the meta device (built empty at the pruned shapes): each tensor is *assigned*,
    in the model's dtype, so the dense weights never exist in memory."""
    path = Path(path)
    where = f"{path / 'model.safetensors'} does not fit {path / marker}"
    try:
        state = load_safetensors_file(str(path / "model.safetensors"))
        with safe_open(str(path / "model.safetensors"), "pt") as f:
            aliases = f.metadata() or {}  # save_model keeps one name of shared tensors: removed -> kept
    except (OSError, RuntimeError, ValueError) as e:  # safetensors' header errors
        raise ModelLoadError(f"{where}: {_first_line(e)}") from None
    expected = model.state_dict()
    state |= {gone: state[kept] for gone, kept in aliases.items()
              if gone in expected and gone not in state and kept in state}
    wrong = [k for k, v in state.items() if k in expected and tuple(v.shape) != tuple(expected[k].shape)]
    if wrong:
        k = wrong[0]
        raise ModelLoadError(f"{where}: size mismatch for {k}: the file holds {tuple(state[k].shape)}, "
                             f"the model {tuple(expected[k].shape)}")
    state = {k: v.to(expected[k].dtype) if k in expected and v.is_floating_point() else v for k, v in state.items()}
    missing, unexpected = model.load_state_dict(state, strict=False, assign=True)
    if unexpected:
        raise ModelLoadError(f"{where}: unexpected tensor(s) {sorted(unexpected)[:3]}")
    if hasattr(model, "tie_weights"):
        model.tie_weights()  # safetensors keeps one copy of shared tensors (the tied output head)
    now = model.state_dict()
    loaded = {now[k].data_ptr() for k in state}
    absent = [k for k in missing if now[k].is_meta or now[k].data_ptr() not in loaded]  # not a tied alias
    absent += [n for n, t in [*model.named_parameters(), *model.named_buffers()] if t.is_meta and n not in absent]
    if absent:
        raise ModelLoadError(f"{where}: missing tensor(s) {absent[:3]}")


def _first_line(e: Exception) -> str:
    return (str(e).strip().splitlines() or [type(e).__name__])[0][:300]


def _guard_marker(src: str) -> str | None:
    """The marker file a guarded config.json (save_reshaped_config) says the directory needs."""
    try:
        data = json.loads((Path(src) / "config.json").read_text())
    except (OSError, ValueError):
        return None
    marker = data.get(GUARD_KEY) if isinstance(data, dict) else None
    return marker if isinstance(marker, str) else None


def _from_pretrained(src: str, dtype: torch.dtype):
    # transformers takes seconds to import: only building a model needs it
    from transformers import AutoModelForCausalLM

    for marker, load in RESHAPED.items():
        if (Path(src) / marker).is_file():
            return load(src, dtype)
    needed = _guard_marker(src)
    if needed in RESHAPED:
        raise ModelLoadError(f"{Path(src) / needed} is missing: {src} holds a model a pruning mode reshaped, "
                             "and without that file its weights fit no model")
    if needed or Path(src).is_dir() and any(Path(src).glob("prunerzero_*.json")):
        raise ModelLoadError(f"{src} holds a model a pruning mode reshaped: load it through prunerzero "
                             "(import prunerzero.pruning.modes first, which registers the loaders)")
    return AutoModelForCausalLM.from_pretrained(src, dtype=dtype)


def load_model(name: str, device: str = "auto", dtype: str = "auto") -> LoadedModel:
    # transformers takes seconds to import: only loading a model needs it
    from transformers import AutoTokenizer

    dev = resolve_device(device)
    dt = resolve_dtype(dtype, dev)
    src = model_source(name)
    try:
        # a reshaped directory's guard config.json is not for the tokenizer: give it the real one
        config = {"config": saved_config(src)} if (Path(src) / REAL_CONFIG).is_file() else {}
        tokenizer = AutoTokenizer.from_pretrained(src, **config)
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
    config = saved_config(model_source(name))
    if hasattr(config, "get_text_config"):
        config = config.get_text_config()
    return int(config.num_hidden_layers)
