"""Triton's system shared-memory extension: tensors passed through POSIX shared memory.

A client on the server's host creates a POSIX shared-memory object (an ``shm_open`` key such as
``/cnnctl_in``), registers a region of it under a name (SystemSharedMemoryRegister), and then names
that region in an input's or a requested output's parameters (``shared_memory_region``,
``shared_memory_byte_size``, optionally ``shared_memory_offset``; serving/codec.py). The server
reads that input from the region instead of the message and writes that output into it, so a big
tensor crosses no socket and is never copied by the RPC stack: the input reaches ONNX Runtime as a
view of the mapping.

Off unless ``cnnctl serve --allow-shared-memory`` (Triton: ``--allow-client-shm``): a client that
may register regions can make the server read and write any shared-memory object the server's user
may open. Linux only (the objects are files under /dev/shm).

A region's object truncated after registering is refused when a request names it (the size is
checked on every use); one truncated while a request is being computed on it can still take the
server down with SIGBUS, as it can Triton: the reason this is opt-in and for trusted local clients.

With ``--workers N`` a client's connections may reach different workers, so the registrations
live in a directory the workers share (one JSON file per region); each worker maps a region the
first time a request names it and notices an unregister or re-register by a stat of that file.
"""

from __future__ import annotations

import contextlib
import json
import mmap
import os
import re
from dataclasses import asdict, dataclass
from pathlib import Path

from cnnctl.errors import AlreadyExistsError, CnnctlError, NotFoundError, UsageError

SHM_ROOT = Path("/dev/shm")
# shm_open names: one leading slash at most, no other; we also keep to characters that are safe in
# a path and a log line.
_KEY = re.compile(r"^/?[A-Za-z0-9_.\-]{1,200}$")


@dataclass(frozen=True)
class Region:
    name: str
    key: str
    offset: int
    byte_size: int


@dataclass(eq=False)
class _Mapped:
    region: Region
    mm: mmap.mmap
    stamp: tuple[int, int] | None  # (inode, mtime_ns) of the shared registration file


class SharedMemoryRegistry:
    def __init__(self, directory: str | Path | None = None, root: Path = SHM_ROOT) -> None:
        """``directory``: where registrations are shared between --workers (None: this process
        only). ``root``: where shm_open keys live (/dev/shm; tests may point elsewhere)."""
        self._dir = Path(directory) if directory is not None else None
        self._root = root
        self._mapped: dict[str, _Mapped] = {}

    # -- the RPCs
    def register(self, name: str, key: str, offset: int, byte_size: int) -> Region:
        if not name:
            raise UsageError("shared-memory region name is empty; give the region a name")
        if byte_size <= 0:
            raise UsageError(f"shared-memory region '{name}': byte_size must be at least 1, "
                             f"got {byte_size}")
        region = Region(name, key, int(offset), int(byte_size))
        if self._dir is None and name in self._mapped:
            raise AlreadyExistsError(f"shared-memory region '{name}' is already registered; "
                                     f"unregister it first")
        mm = self._map(region)
        if self._dir is None:
            self._mapped[name] = _Mapped(region, mm, None)
            return region
        path = self._file(name)
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        except FileExistsError:
            _close(mm)
            raise AlreadyExistsError(f"shared-memory region '{name}' is already registered; "
                                     f"unregister it first") from None
        with os.fdopen(fd, "w") as f:
            json.dump(asdict(region), f)
        self._mapped[name] = _Mapped(region, mm, _stamp(path))
        return region

    def unregister(self, name: str = "") -> None:
        """One region, or every region when ``name`` is empty."""
        if not name:
            for n in [r.name for r in self.status()]:
                self.unregister(n)
            return
        if self._dir is not None:
            try:
                self._file(name).unlink()
            except FileNotFoundError:
                raise self._unknown(name) from None
            self._forget(name)
            return
        if name not in self._mapped:
            raise self._unknown(name)
        self._forget(name)

    def status(self, name: str = "") -> list[Region]:
        if name:
            return [self._lookup(name).region]
        if self._dir is None:
            return [m.region for m in self._mapped.values()]
        regions = []
        for path in sorted(self._dir.glob("*.json")):
            with contextlib.suppress(FileNotFoundError, ValueError, TypeError):
                regions.append(Region(**json.loads(path.read_text())))
        return regions

    # -- inference
    def view(self, name: str, offset: int, byte_size: int, tensor: str) -> memoryview:
        """``byte_size`` bytes at ``offset`` of region ``name``, as a writable view of the mapping."""
        mapped = self._lookup(name, tensor)
        region = mapped.region
        if offset < 0 or byte_size < 0 or offset + byte_size > region.byte_size:
            raise UsageError(f"{tensor}: shared_memory_offset {offset} + shared_memory_byte_size "
                             f"{byte_size} is beyond shared-memory region '{name}' "
                             f"({region.byte_size} bytes)")
        start = region.offset + offset
        # Touching a mapping past the end of its (since truncated) object would kill the server
        # with SIGBUS: check the object's size now (mmap keeps its own descriptor to fstat).
        size = mapped.mm.size()
        if start + byte_size > size:
            raise UsageError(f"{tensor}: shared-memory key {region.key!r} holds {size} bytes now, "
                             f"fewer than region '{name}' needs ({start + byte_size}); it was "
                             f"truncated after registering")
        return memoryview(mapped.mm)[start:start + byte_size]

    def close(self) -> None:
        for name in list(self._mapped):
            self._forget(name)

    # -- internals
    def _map(self, region: Region) -> mmap.mmap:
        if not _KEY.match(region.key):
            raise UsageError(f"shared-memory key {region.key!r} is not a POSIX shared-memory name; "
                             f"expected '/name' with letters, digits, '_', '.' or '-'")
        path = self._root / region.key.lstrip("/")
        try:
            fd = os.open(path, os.O_RDWR | os.O_NOFOLLOW)  # the object itself, not a link
        except FileNotFoundError:
            raise NotFoundError(f"shared-memory key {region.key!r} does not exist; create it "
                                f"(shm_open) before registering region '{region.name}'") from None
        except OSError as exc:
            raise UsageError(f"cannot open shared-memory key {region.key!r}: "
                             f"{exc.strerror}") from None
        try:
            size = os.fstat(fd).st_size
            if region.offset + region.byte_size > size:
                raise UsageError(f"shared-memory region '{region.name}': offset {region.offset} + "
                                 f"byte_size {region.byte_size} is beyond key {region.key!r} "
                                 f"({size} bytes)")
            return mmap.mmap(fd, size)
        finally:
            os.close(fd)

    def _lookup(self, name: str, tensor: str | None = None) -> _Mapped:
        mapped = self._mapped.get(name)
        if self._dir is not None:
            path = self._file(name)
            stamp = _stamp(path)
            if stamp is None:
                if mapped is not None:
                    self._forget(name)
                mapped = None
            elif mapped is None or mapped.stamp != stamp:
                if mapped is not None:
                    self._forget(name)
                try:
                    region = Region(**json.loads(path.read_text()))
                except (FileNotFoundError, ValueError, TypeError):
                    mapped = None
                else:
                    mapped = self._mapped[name] = _Mapped(region, self._map(region), stamp)
        if mapped is None:
            raise self._unknown(name, tensor)
        return mapped

    def _unknown(self, name: str, tensor: str | None = None) -> CnnctlError:
        known = ", ".join(f"'{r.name}'" for r in self.status()) or "none"
        where = f"{tensor}: " if tensor else ""
        # In an inference request it is a bad field (INVALID_ARGUMENT, as Triton); in the shared-
        # memory RPCs, an unknown name (NOT_FOUND).
        cls = UsageError if tensor else NotFoundError
        return cls(f"{where}shared-memory region '{name}' is not registered (registered: {known})")

    def _forget(self, name: str) -> None:
        mapped = self._mapped.pop(name, None)
        if mapped is not None:
            _close(mapped.mm)

    def _file(self, name: str) -> Path:
        assert self._dir is not None
        return self._dir / f"{name.encode().hex()}.json"


def _stamp(path: Path) -> tuple[int, int] | None:
    try:
        st = path.stat()
    except FileNotFoundError:
        return None
    return st.st_ino, st.st_mtime_ns


def _close(mm: mmap.mmap) -> None:
    # A request still computing on a view of the mapping keeps it alive: the mapping is then
    # released when the last view goes.
    with contextlib.suppress(BufferError):
        mm.close()
