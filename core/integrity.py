"""What is read back from a cache is verified before it is used: a checksum recorded when it was
written, and the checks its reader knows (finite values, the expected names). A file that fails
is named, set aside beside itself (`<name>.corrupt-<time>`, for a look) and recomputed — never
silently used, never left to fail again on the next run."""

from __future__ import annotations

import hashlib
import json
import time
from pathlib import Path

from .paths import atomic_write_text


class CorruptCache(ValueError):
    """A cache entry that does not verify; the message says why."""


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def set_aside(path: Path, why: str, log=print, then: str = "recomputing") -> Path:
    """Rename a corrupt file or directory out of the cache's way; return where it went.

    Only for what the project wrote: a caller sets aside a file at a path of its own making (in
    the cache folder, named by its key) or one that carries its mark (the fitness cache's SQLite
    application_id). A file a user named (a config's path) that is not recognisably the project's
    is an error naming it, never renamed."""
    path = Path(path)
    target = path.with_name(f"{path.name}.corrupt-{time.strftime('%Y%m%d-%H%M%S')}")
    n = 1
    while target.exists():
        n += 1
        target = target.with_name(f"{path.name}.corrupt-{time.strftime('%Y%m%d-%H%M%S')}-{n}")
    path.rename(target)
    log(f"warning: {path} is corrupt ({why}); moved to {target.name} and {then}")
    return target


def write_checked_json(path: Path, body, **extra) -> None:
    """`body` as JSON beside the checksum of its canonical text (and `extra` fields, unchecked)."""
    text = json.dumps(body, sort_keys=True)
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(Path(path), json.dumps({**extra, "sha256": sha256(text.encode()), "body": body}, indent=1))


def read_checked_json(path: Path):
    """The body `write_checked_json` wrote, or CorruptCache saying why it cannot be trusted."""
    try:
        doc = json.loads(Path(path).read_text())
        body = doc["body"]
        ok = doc.get("sha256") == sha256(json.dumps(body, sort_keys=True).encode())
    except (OSError, UnicodeDecodeError, ValueError, KeyError, TypeError) as e:
        raise CorruptCache(f"unreadable: {type(e).__name__}: {e}") from None
    if not ok:
        raise CorruptCache("checksum mismatch")
    return body
