"""Corpora and token windows for calibration and evaluation.

A corpus spec is `austen` (Jane Austen's six novels, from the Debian package r-cran-janeaustenr,
so it needs no model hub), `wikitext2` or `c4` (Hugging Face `datasets`, optional), or a path to a
text file. Its text is tokenized once, whole, and cached; the token stream is split by position
(docs/DESIGN.md's protocol: train / valid / test = first 80% / next 10% / last 10%), calibration draws
seeded random windows from train and evaluation takes consecutive windows of a split.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import os
import subprocess
import tempfile
import warnings
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from prunerzero.core.integrity import CorruptCache, set_aside, sha256
from prunerzero.core.paths import atomic_write_bytes, cache_dir
import torch

SPLITS = ("train", "valid", "test")
DEFAULT_FRACTIONS = (0.8, 0.1, 0.1)

AUSTEN_PACKAGE = "r-cran-janeaustenr"
AUSTEN_DATA = "usr/lib/R/site-library/janeaustenr/data"
# A second corpus for transfer checks: Melville's Moby Dick, shipped by the R tokenizers package
MOBYDICK_PACKAGE = "r-cran-tokenizers"
MOBYDICK_DATA = "usr/lib/R/site-library/tokenizers/data"
# Order of publication, so that the text (and every position split of it) is fixed.
AUSTEN_BOOKS = ("sensesensibility", "prideprejudice", "mansfieldpark", "emma", "northangerabbey", "persuasion")
# Wanda's C4 evaluation shard.
C4_SHARD = "en/c4-validation.00000-of-00008.json.gz"


class CorpusError(RuntimeError):
    pass


class CorpusTooShortError(CorpusError):
    pass


@dataclass(frozen=True)
class CorpusText:
    name: str  # file-name safe: names cache files
    text: str
    source: str  # where the text came from, for provenance


@dataclass
class TokenizedCorpus:
    name: str
    ids: torch.Tensor  # LongTensor, the whole token stream
    splits: dict[str, torch.Tensor]  # 'train', 'valid', 'test': consecutive slices of ids

    def calibration(self, n: int, seq_len: int, seed: int, bos: int | None = None) -> torch.Tensor:
        """`n` random windows of `seq_len` tokens from train; with `bos`, each window is that
        token followed by seq_len - 1 tokens of text (families that expect it on every sequence)."""
        text_len = seq_len - (bos is not None)
        return with_bos(calibration_windows(self.splits["train"], n, text_len, seed, corpus=self.name), bos)

    def evaluation(self, split: str, seq_len: int, max_windows: int | None = None,
                   bos: int | None = None) -> torch.Tensor:
        if split not in self.splits:
            raise CorpusError(f"unknown split {split!r} of corpus {self.name!r}: use {', '.join(SPLITS)}")
        text_len = seq_len - (bos is not None)
        return with_bos(eval_windows(self.splits[split], text_len, max_windows, corpus=self.name, split=split), bos)


def with_bos(windows: torch.Tensor, bos: int | None) -> torch.Tensor:
    if bos is None:
        return windows
    return torch.cat([torch.full((windows.shape[0], 1), bos, dtype=windows.dtype), windows], dim=1)


def bos_token(tokenizer, mode: str = "auto") -> int | None:
    """The token each window starts with: the tokenizer's BOS where the family expects one on
    every sequence (its tokenizer adds it by default, as Gemma-3's does; "auto"), always, or
    never. Gemma-3 without it scores 2-3x worse perplexity: every number would be wrong."""
    if mode == "never":
        return None
    bos = getattr(tokenizer, "bos_token_id", None)
    if mode == "always":
        if bos is None:
            raise CorpusError("protocol bos 'always': this tokenizer has no BOS token")
        return int(bos)
    if mode != "auto":
        raise CorpusError(f"unknown bos mode {mode!r}: use auto, always or never")
    if bos is None:
        return None
    ids = tokenizer("a", add_special_tokens=True)["input_ids"]
    return int(bos) if ids and ids[0] == bos else None


def load_text(spec: str) -> CorpusText:
    """Resolve a corpus spec; named corpora are fetched once and then read from the cache."""
    if spec in FETCHERS:
        path = _text_cache_path(spec)
        if not path.is_file():
            fetch_corpus(spec)
        return CorpusText(spec, path.read_text(encoding="utf-8"), f"{_SOURCES[spec]} (cached at {path})")
    path = Path(spec).expanduser()
    if path.is_file():
        return _read_local(path)
    if spec.endswith(".txt") or os.sep in spec:
        raise CorpusError(f"corpus file not found: {spec}")
    raise CorpusError(f"unknown corpus {spec!r}: use austen, mobydick, wikitext2, c4 or a path to a text file")


def fetch_corpus(name: str, force: bool = False) -> Path:
    """Fetch a named corpus (again if `force`, else only when not cached); its cached text's path."""
    if name not in FETCHERS:
        raise CorpusError(f"cannot fetch {name!r}: fetchable corpora are {', '.join(FETCHERS)}")
    path = _text_cache_path(name)
    if path.is_file() and not force:
        return path
    text = FETCHERS[name]()
    atomic_write_bytes(path, text.encode("utf-8"))
    return path


def _text_cache_path(name: str) -> Path:
    return cache_dir("corpora") / f"{name}.txt"


def _read_local(path: Path) -> CorpusText:
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise CorpusError(f"corpus file {path} is not UTF-8 text: {e}") from e
    # The name labels cache files, so keep it to characters safe in a file name.
    name = "".join(c if c.isalnum() or c in "-_." else "_" for c in path.stem)
    return CorpusText(name, text, str(path.resolve()))


def _from_deb(package: str, data: str, read: Callable[[Path], str]) -> str:
    """The text of an R data set shipped in a Debian package: download, unpack, read."""
    with tempfile.TemporaryDirectory() as tmp:
        deb = _apt_download(package, Path(tmp))
        root = Path(tmp) / "root"
        _run(["dpkg-deb", "-x", str(deb), str(root)], f"unpacking {deb.name}")
        return read(root / data)


def _fetch_austen() -> str:
    return _from_deb(AUSTEN_PACKAGE, AUSTEN_DATA, austen_text_from_rdata)


def _fetch_mobydick() -> str:
    return _from_deb(MOBYDICK_PACKAGE, MOBYDICK_DATA, mobydick_text_from_rdata)


def _apt_download(package: str, dest: Path) -> Path:
    proc = _run(["apt-get", "download", package], f"downloading {package}", cwd=dest, check=False)
    if proc.returncode != 0 and "Unable to locate package" in proc.stderr:
        # A fresh system has no package lists yet.
        _run(["apt-get", "update"], "apt-get update (needed to find the package)")
        proc = _run(["apt-get", "download", package], f"downloading {package}", cwd=dest, check=False)
    debs = list(dest.glob(f"{package}_*.deb"))
    if proc.returncode != 0 or not debs:
        raise CorpusError(f"apt-get download {package} failed: {proc.stderr.strip()}")
    return debs[0]


def _run(cmd: list[str], what: str, cwd: Path | None = None, check: bool = True) -> subprocess.CompletedProcess:
    try:
        proc = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True)
    except FileNotFoundError as e:
        raise CorpusError(
            f"{what} needs `{cmd[0]}` (a Debian-based system); elsewhere save the text to a file "
            "and pass its path as the corpus"
        ) from e
    if check and proc.returncode != 0:
        raise CorpusError(f"{what} failed ({' '.join(cmd)}): {proc.stderr.strip()}")
    return proc


def r_objects(data_dir: Path, names) -> dict:
    """Objects of an R package's lazy-load database (Rdata.rdx index + Rdata.rdb).

    The .rdx is gzip'd R serialization of {object name: (offset, length)}; each object in the
    .rdb is a 4-byte length followed by a zlib stream of R serialization.
    """
    index = _parse_r(gzip.decompress((data_dir / "Rdata.rdx").read_bytes()))["variables"]
    missing = [n for n in names if n not in index]
    if missing:
        raise CorpusError(f"{data_dir}/Rdata.rdx lacks {missing}; it has {sorted(index)}")
    rdb = (data_dir / "Rdata.rdb").read_bytes()
    out = {}
    for name in names:
        offset, length = (int(v) for v in index[name])
        out[name] = _parse_r(zlib.decompress(rdb[offset + 4 : offset + length]))
    return out


def austen_text_from_rdata(data_dir: Path) -> str:
    """The six novels, each a vector of lines, joined in order of publication."""
    books = r_objects(data_dir, AUSTEN_BOOKS)
    return "\n\n".join("\n".join(books[b].tolist()) for b in AUSTEN_BOOKS)


def mobydick_text_from_rdata(data_dir: Path) -> str:
    """Moby Dick without Project Gutenberg's header and licence."""
    text = str(r_objects(data_dir, ["mobydick"])["mobydick"][0])
    start = text.find("*** START OF")
    if start >= 0:
        text = text[text.index("\n", start) + 1:]
    end = text.find("*** END OF")
    if end >= 0:
        text = text[:end]
    return text.strip() + "\n"


def _parse_r(raw: bytes):
    # rdata: only the mobydick fetcher reads R data
    import rdata

    with warnings.catch_warnings():
        # rdata cannot tell a bare serialization stream from an RDS file; the guess is right.
        warnings.filterwarnings("ignore", message="Unknown file type")
        return rdata.conversion.convert(rdata.parser.parse_data(raw))


def _fetch_wikitext2() -> str:
    # As Wanda joins each split; the splits follow each other in the hub's order.
    data = _hf_load("wikitext2", "wikitext", "wikitext-2-raw-v1")
    return "\n\n".join("\n\n".join(data[split]["text"]) for split in ("train", "validation", "test"))


def _fetch_c4() -> str:
    data = _hf_load("c4", "allenai/c4", data_files={"validation": C4_SHARD}, split="validation")
    return "\n\n".join(data["text"])


def _hf_load(name: str, *args, **kwargs):
    hint = "without hub access use 'austen' or a path to a text file"
    try:
        # datasets: the optional `hf` extra (pyproject.toml)
        import datasets
    except ImportError as e:
        raise CorpusError(
            f"corpus {name!r} needs the optional package `datasets` (pip install 'prunerzero[hf]'); {hint}"
        ) from e
    try:
        return datasets.load_dataset(*args, **kwargs)
    except Exception as e:  # offline mode, unreachable hub, missing file: datasets raises many types
        raise CorpusError(
            f"corpus {name!r}: could not load {args[0]} from the Hugging Face hub "
            f"({type(e).__name__}: {e}); {hint}"
        ) from e


FETCHERS: dict[str, Callable[[], str]] = {"austen": _fetch_austen, "mobydick": _fetch_mobydick,
                                          "wikitext2": _fetch_wikitext2, "c4": _fetch_c4}
_SOURCES = {
    "austen": f"Debian package {AUSTEN_PACKAGE}",
    "mobydick": f"Debian package {MOBYDICK_PACKAGE} (its mobydick data set)",
    "wikitext2": "Hugging Face wikitext/wikitext-2-raw-v1 (train+validation+test)",
    "c4": f"Hugging Face allenai/c4 {C4_SHARD}",
}


# ---------------------------------------------------------------- tokens


def load_tokenized(spec: str, tokenizer, fractions=DEFAULT_FRACTIONS) -> TokenizedCorpus:
    """The entry point: a corpus's token stream (cached per text and tokenizer) and its splits."""
    corpus = load_text(spec)
    ids = _cached_token_ids(corpus, tokenizer)
    return TokenizedCorpus(corpus.name, ids, split_by_position(ids, fractions))


def tokenize(text: str, tokenizer) -> torch.Tensor:
    """The whole text in one call, so the ids do not depend on any chunking; no special tokens."""
    return torch.tensor(tokenizer(text, add_special_tokens=False)["input_ids"], dtype=torch.long)


def tokenizer_fingerprint(tokenizer) -> str:
    """A short hash of the tokenizer's class and vocabulary: another tokenizer never reuses ids."""
    vocab = json.dumps(sorted(tokenizer.get_vocab().items()), ensure_ascii=False)
    return hashlib.sha256(f"{type(tokenizer).__qualname__}\n{vocab}".encode()).hexdigest()[:16]


def _cached_token_ids(corpus: CorpusText, tokenizer) -> torch.Tensor:
    text_sha = hashlib.sha256(corpus.text.encode("utf-8")).hexdigest()
    key = hashlib.sha256(f"{tokenizer_fingerprint(tokenizer)}:{text_sha}".encode()).hexdigest()[:16]
    path = cache_dir("tokens") / f"{corpus.name}-{key}.pt"
    vocab = _vocab_size(tokenizer)
    if path.is_file():
        try:
            ids = _load_token_ids(path, vocab)
            if ids is not None:
                return ids
        except CorruptCache as e:
            set_aside(path, str(e), warnings.warn)
    ids = tokenize(corpus.text, tokenizer)
    _save_token_ids(path, ids)
    return ids


def _vocab_size(tokenizer) -> int:
    """One more than the largest id the tokenizer gives (its vocabulary with added tokens)."""
    return max(tokenizer.get_vocab().values()) + 1


def _ids_sha(ids: torch.Tensor) -> str:
    return sha256(ids.numpy().tobytes())


def _save_token_ids(path: Path, ids: torch.Tensor) -> None:
    buf = io.BytesIO()
    torch.save({"ids": ids, "sha256": _ids_sha(ids)}, buf)
    atomic_write_bytes(path, buf.getvalue())


def _load_token_ids(path: Path, vocab: int) -> torch.Tensor | None:
    """The ids the cache holds, verified: their checksum (one changed id changes every perplexity
    silently) and their range (an id beyond the vocabulary fails in the embedding, every run).
    None for a cache of the version before checksums (a bare tensor): tokenized again, replaced."""
    try:
        doc = torch.load(path, weights_only=True)  # tensors and plain data only: loading runs no code
    except Exception as e:  # torch raises many types for a damaged zip
        raise CorruptCache(f"{type(e).__name__}: {str(e)[:200]}") from None
    if isinstance(doc, torch.Tensor):
        return None
    ids = doc.get("ids") if isinstance(doc, dict) else None
    if not (isinstance(ids, torch.Tensor) and ids.dtype == torch.long and ids.dim() == 1 and len(ids)):
        raise CorruptCache("not a checksummed 1-D tensor of token ids")
    if doc.get("sha256") != _ids_sha(ids):
        raise CorruptCache("checksum mismatch")
    if int(ids.min()) < 0 or int(ids.max()) >= vocab:
        raise CorruptCache(f"ids in [{int(ids.min())}, {int(ids.max())}], outside the vocabulary [0, {vocab})")
    return ids


def split_by_position(ids: torch.Tensor, fractions=DEFAULT_FRACTIONS) -> dict[str, torch.Tensor]:
    """Consecutive train / valid / test slices of the stream, sized by `fractions`."""
    if len(fractions) != 3 or any(f < 0 for f in fractions) or abs(sum(fractions) - 1) > 1e-6:
        raise ValueError(
            f"fractions must be three non-negative numbers (train, valid, test) summing to 1, got {fractions}"
        )
    n = len(ids)
    ends = (int(n * fractions[0]), int(n * (fractions[0] + fractions[1])), n)
    starts = (0, *ends[:2])
    return {name: ids[a:b] for name, a, b in zip(SPLITS, starts, ends)}


# ---------------------------------------------------------------- windows


def calibration_windows(
    train_ids: torch.Tensor, n: int, seq_len: int, seed: int, *, corpus: str = "corpus", split: str = "train"
) -> torch.Tensor:
    """`n` windows (n, seq_len) at random starts drawn from a generator seeded by `seed`.

    As Wanda's get_loaders, a start leaves at least one token after its window (the last
    target), so the split must hold seq_len + 1 tokens; windows may overlap.
    """
    _check_positive(n=n, seq_len=seq_len)
    needs = f"calibration with {seq_len}-token windows (+1 target token)"
    _check_length(train_ids, seq_len + 1, needs, corpus, split)
    generator = torch.Generator().manual_seed(seed)
    starts = torch.randint(0, len(train_ids) - seq_len, (n,), generator=generator)
    return train_ids[starts[:, None] + torch.arange(seq_len)]


def eval_windows(
    split_ids: torch.Tensor,
    seq_len: int,
    max_windows: int | None = None,
    *,
    corpus: str = "corpus",
    split: str = "eval",
) -> torch.Tensor:
    """Non-overlapping consecutive windows (k, seq_len) from the split's start, k <= max_windows."""
    _check_positive(seq_len=seq_len)
    _check_length(split_ids, seq_len, f"evaluation with {seq_len}-token windows", corpus, split)
    k = len(split_ids) // seq_len
    if max_windows is not None:
        _check_positive(max_windows=max_windows)
        k = min(k, max_windows)
    return split_ids[: k * seq_len].view(k, seq_len)


def _check_positive(**values: int) -> None:
    for name, value in values.items():
        if value < 1:
            raise ValueError(f"{name} must be at least 1, got {value}")


def _check_length(ids: torch.Tensor, needed: int, what: str, corpus: str, split: str) -> None:
    if len(ids) < needed:
        raise CorpusTooShortError(
            f"corpus {corpus!r}, split {split!r} has {len(ids)} tokens, but {what} needs at least {needed}"
        )
