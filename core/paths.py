"""Where prunerzero keeps what it fetches and computes (models, corpora, tokens, statistics,
fitness cache). One root, overridable by PRUNERZERO_CACHE."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import platformdirs


def cache_dir(*parts: str) -> Path:
    root = Path(os.environ.get("PRUNERZERO_CACHE") or platformdirs.user_cache_dir("prunerzero"))
    path = root.joinpath(*parts)
    path.mkdir(parents=True, exist_ok=True)
    return path


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write via a temporary file in the same directory and os.replace: readers never see a
    half-written file, and a crash leaves the old file intact."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.chmod(tmp, _file_mode(path))  # mkstemp makes 0600: a shared leaderboard must stay readable
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _file_mode(path: Path) -> int:
    """The mode a plain open() would give: the file's own if it exists, else 0666 less the umask."""
    try:
        return path.stat().st_mode & 0o777
    except FileNotFoundError:
        umask = os.umask(0)
        os.umask(umask)
        return 0o666 & ~umask


def atomic_write_text(path: Path, text: str) -> None:
    atomic_write_bytes(path, text.encode())
