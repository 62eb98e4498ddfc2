"""Writing outputs so that a reader never sees half a file under its final name.

Every summary, config and report a stage leaves behind is written to a temporary
name beside its destination, flushed to disk and renamed over it: a process killed
mid-write leaves the previous version (or nothing), never a truncated file that a
rerun would parse.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
from pathlib import Path
from typing import Any, Iterator, TextIO

from .errors import InputError

# Files larger than this are fingerprinted by size and modification time, not by content:
# hashing a multi-GB weight file on every pipeline rerun would cost more than the check saves.
CONTENT_HASH_LIMIT = 256 * 2**20


@contextlib.contextmanager
def atomic_open(path: str | Path) -> Iterator[TextIO]:
    """A text file to write `path` through: it is `path.tmp` until the block ends, then flushed to
    disk and renamed over `path`. A failure (a bad row, a full disk, `path` a directory) removes the
    `.tmp` and leaves `path` as it was; an OS error is one InputError line naming `path`."""
    path = Path(path)
    if path.is_dir():
        raise InputError(path, "cannot write it (it is a directory; give a file name)")
    tmp = path.with_suffix(path.suffix + ".tmp")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with tmp.open("w", encoding="utf-8") as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        tmp.replace(path)
    except BaseException as e:
        tmp.unlink(missing_ok=True)
        if isinstance(e, OSError):
            raise InputError(path, f"cannot write it ({e.strerror or e})") from None
        raise


def atomic_write_text(path: str | Path, text: str) -> Path:
    with atomic_open(path) as f:
        f.write(text)
    return Path(path)


def atomic_write_json(path: str | Path, value: Any) -> Path:
    return atomic_write_text(path, json.dumps(value, indent=2, default=str))


def read_json_or_none(path: str | Path) -> Any:
    """The JSON value in `path`, or None when the file is missing or not valid JSON."""
    try:
        return json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def path_fingerprint(path: str | Path) -> str | None:
    """A short hash of what a file or directory holds (None when it does not exist).

    A directory that an alignloop stage wrote carries that stage's own fingerprint in its
    summary, which already covers everything the directory was made from; otherwise every
    file under it counts by name and content (by size and mtime past CONTENT_HASH_LIMIT).
    """
    path = Path(path)
    if path.is_file():
        return _file_digest(path)
    if not path.is_dir():
        return None
    for summary in sorted(path.glob("*_summary.json")):
        recorded = read_json_or_none(summary)
        if isinstance(recorded, dict) and isinstance(recorded.get("fingerprint"), str):
            return recorded["fingerprint"]
    h = hashlib.sha1()
    for file in sorted(p for p in path.rglob("*") if p.is_file()):
        h.update(str(file.relative_to(path)).encode("utf-8", "surrogateescape"))
        h.update(_file_digest(file).encode())
    return h.hexdigest()[:16]


def _file_digest(path: Path) -> str:
    stat = path.stat()
    if stat.st_size > CONTENT_HASH_LIMIT:
        return f"size{stat.st_size}-mtime{stat.st_mtime_ns}"
    h = hashlib.sha1()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()[:16]
