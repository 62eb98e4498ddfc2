"""Writing outputs so that a reader never sees half a file under its final name.

Every summary, config and report a stage leaves behind is written to a temporary
name beside its destination, flushed to disk and renamed over it: a process killed
mid-write leaves the previous version (or nothing), never a truncated file that a
rerun would parse. Model directories get the same through `atomic_directory`.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import hashlib
import json
import os
import secrets
import shutil
from pathlib import Path
from typing import Any, Callable, Iterator, TextIO

from .errors import InputError

# Files larger than this are fingerprinted by size and modification time, not by content:
# hashing a multi-GB weight file on every pipeline rerun would cost more than the check saves.
CONTENT_HASH_LIMIT = 256 * 2**20


@contextlib.contextmanager
def atomic_open(path: str | Path, binary: bool = False) -> Iterator[TextIO]:
    """A text (or, with `binary`, bytes) file to write `path` through: it is `path.tmp` until the block
    ends, then flushed to disk and renamed over `path`. A failure (a bad row, a full disk, `path` a directory) removes the
    `.tmp` and leaves `path` as it was; an OS error is one InputError line naming `path`."""
    path = Path(path)
    if path.is_dir():
        raise InputError(path, "cannot write it (it is a directory; give a file name)")
    tmp = path.with_suffix(path.suffix + ".tmp")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with (tmp.open("wb") if binary else tmp.open("w", encoding="utf-8")) as f:
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


@contextlib.contextmanager
def atomic_directory(path: str | Path, replaces: Callable[[str], bool] = lambda name: True) -> Iterator[Path]:
    """A directory to write `path`'s new contents into: `<path>.tmp-XXXX` until the block ends; then every
    file in it is fsynced and it takes `path`'s place in one rename, so a reader (or a process killed at any
    moment) finds the old contents whole or the new ones whole under `path`, never a mix.

    An entry of the old `path` that the new contents lack is carried over unless `replaces(name)`: a model
    directory that is also a stage's output directory keeps its checkpoint, metrics and other outputs,
    while the old model's files (a shard the new save does not write, say) go. A failure inside the block
    removes the temporary directory and leaves `path` as it was.
    """
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise InputError(path, "cannot write a directory there (it is a file)")
    path.parent.mkdir(parents=True, exist_ok=True)
    for pattern in (".tmp-*", ".old-*"):  # left by a write killed before its rename
        for stale in path.parent.glob(glob_escape(path.name) + pattern):
            shutil.rmtree(stale, ignore_errors=True)
    tmp = path.with_name(f"{path.name}.tmp-{secrets.token_hex(4)}")
    tmp.mkdir()
    try:
        yield tmp
        fsync_tree(tmp)
        if not path.exists():
            tmp.rename(path)
        else:
            swap_directories(tmp, path)  # now tmp holds the old contents
            for entry in sorted(tmp.iterdir()):
                if not (path / entry.name).exists() and not replaces(entry.name):
                    entry.rename(path / entry.name)
        fsync_directory(path.parent)
    except OSError as e:
        raise InputError(path, f"cannot write it ({e.strerror or e})") from None
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def glob_escape(name: str) -> str:
    return "".join(f"[{c}]" if c in "*?[" else c for c in name)


def fsync_tree(root: Path) -> None:
    """Flush every file under `root`, and the directories that name them, to disk."""
    for directory, _, files in os.walk(root):
        for name in files:
            fd = os.open(os.path.join(directory, name), os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        fsync_directory(Path(directory))


def fsync_directory(directory: Path) -> None:
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:  # a platform where a directory cannot be opened: nothing to flush there
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


AT_FDCWD, RENAME_EXCHANGE = -100, 2


def swap_directories(a: Path, b: Path) -> None:
    """Exchange two directories' names in one step (Linux's renameat2 RENAME_EXCHANGE), so `b` never stops
    existing. Where that call is missing (another OS, an old C library, a file system without it), two
    renames: `b` is then absent for the moment between them, and still never half-written."""
    try:
        renameat2 = ctypes.CDLL(None, use_errno=True).renameat2
    except (AttributeError, OSError):
        renameat2 = None
    if renameat2 is not None:
        if renameat2(AT_FDCWD, os.fsencode(a), AT_FDCWD, os.fsencode(b), RENAME_EXCHANGE) == 0:
            return
        code = ctypes.get_errno()
        if code not in (errno.EINVAL, errno.ENOSYS, errno.ENOTSUP):
            raise OSError(code, os.strerror(code), str(b))
    aside = b.with_name(f"{b.name}.old-{secrets.token_hex(4)}")
    b.rename(aside)
    a.rename(b)
    aside.rename(a)


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
