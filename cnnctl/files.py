"""Atomic file writes: a reader, or a crash, sees a file's old content or its new one, never a
torn one.

Every file one stage writes for another (checkpoints, run-directory files, manifests, caches)
goes through here: a temp file beside the target, fsync, ``os.replace``, then an fsync of the
directory so that the rename itself is on disk. Standard library only: the server imports this too.
"""

from __future__ import annotations

import os
import secrets
from contextlib import contextmanager
from pathlib import Path
from typing import BinaryIO, Callable, Iterator


def write_atomic(path: str | os.PathLike[str], data: bytes | str) -> Path:
    """Write ``data`` (text as UTF-8) to ``path`` atomically."""
    payload = data.encode("utf-8") if isinstance(data, str) else data
    return write_atomic_with(path, lambda f: f.write(payload))


def write_atomic_with(path: str | os.PathLike[str], write: Callable[[BinaryIO], object]) -> Path:
    """Atomically give ``path`` what ``write(f)`` puts into an open binary file (``torch.save``,
    ``savefig``)."""
    path = Path(path)
    with replacing(path) as tmp, open(tmp, "xb") as f:
        write(f)
        f.flush()
        os.fsync(f.fileno())
    return path


@contextmanager
def replacing(path: str | os.PathLike[str]) -> Iterator[Path]:
    """A fresh temp path beside ``path``: renamed over ``path`` when the block succeeds, removed
    when it fails. Beside, because a rename is atomic only within one filesystem."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(4)}.tmp")
    try:
        yield tmp
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)


def fsync_dir(path: str | os.PathLike[str]) -> None:
    """Flush a directory's entries: after a rename, the new name survives a power cut."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
