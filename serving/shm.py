"""Triton's system shared-memory extension: tensors passed through POSIX shared memory.

A client on the server's host creates a POSIX shared-memory object (an ``shm_open`` key such as
``/cnnctl_in``), registers a region of it under a name (SystemSharedMemoryRegister), and then names
that region in an input's or a requested output's parameters (``shared_memory_region``,
``shared_memory_byte_size``, optionally ``shared_memory_offset``; serving/codec.py). The server
reads that input from the region instead of the message and writes that output into it, so a big
tensor crosses no socket and no RPC stack.

Off unless ``cnnctl serve --allow-shared-memory`` (Triton: ``--allow-client-shm``). Linux only (the
objects are files under /dev/shm). Who may do what:

- Every shared-memory RPC and every request that names a region acts for one Unix user: the owner
  of the client's end of the TCP connection, asked of the kernel by the connection's addresses
  (netlink sock_diag, about 4 µs; ``PeerUsers``). A peer that is not a loopback address, a Unix
  socket, or a peer whose socket the kernel does not show as established is refused
  (PERMISSION_DENIED): there is no user to act for. So is every peer where netlink is missing.
- A user registers only objects it owns, or whose mode grants it read and write (groups from the
  user database); root has no exemption, so that a process relaying others' traffic as root (a
  proxy) does not open every object to them.
- A region belongs to the user who registered it: names are per user, and status, unregister and
  inference see only the caller's user's regions. At most ``max_regions`` per user
  (RESOURCE_EXHAUSTED), so one user cannot take every descriptor of the server.

Nothing is mapped: an input is read with ``preadv`` into a fresh array and an output written with
``pwrite``, on the descriptor opened at registration. A client that truncates its object at any
time then gets INVALID_ARGUMENT (a short read, or the size checked before writing) instead of
killing the server with SIGBUS, as touching a mapping beyond its object's end does; the copy costs
tens of µs for a batch of 64 lenet5 inputs (docs/serving.md). A region holds one descriptor and no
memory, hence a cap on regions, not on their bytes. A descriptor is closed when its region is
unregistered and no output still to be written holds it: its number is never reused under one.

With ``--workers N`` a client's connections may reach different workers, so the registrations
live in a directory the workers share (one JSON file per region, named by user and region); each
worker opens a region's object the first time a request names it, checks that it is still the
object registered (device and inode) and that the user may still use it, and notices an unregister
or re-register by a stat of that file.
"""

from __future__ import annotations

import contextlib
import io
import ipaddress
import json
import os
import pwd
import re
import socket
import stat
import struct
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from cnnctl.errors import (AlreadyExistsError, CnnctlError, NotFoundError, OverloadedError,
                           PermissionDeniedError, UsageError)

SHM_ROOT = Path("/dev/shm")
# shm_open names: one leading slash at most, no other; we also keep to characters that are safe in
# a path and a log line.
_KEY = re.compile(r"^/?[A-Za-z0-9_.\-]{1,200}$")
# Region names go into the --workers directory's file names (hex, after the user): 255 bytes.
MAX_NAME_BYTES = 100


@dataclass(frozen=True)
class Region:
    name: str
    key: str
    offset: int
    byte_size: int
    uid: int  # the user who registered it: only that user's clients see and use it
    device: int  # st_dev and st_ino of the object registered: a worker opening the key later
    inode: int  # must find this object, not one created under the same key since


@dataclass(eq=False)
class _Opened:
    region: Region
    # Closed when the last reference goes: the registry's, or a SharedOutput's still to write.
    file: io.FileIO
    stamp: tuple[int, int] | None  # (inode, mtime_ns) of the shared registration file


class SharedOutput:
    """Where one request's output goes: ``byte_size`` bytes at ``position`` of an object."""

    __slots__ = ("_file", "_position", "_byte_size", "_what")

    def __init__(self, opened: _Opened, position: int, byte_size: int, what: str) -> None:
        self._file = opened.file
        self._position = position
        self._byte_size = byte_size
        self._what = what

    def write(self, data: Any) -> None:
        """``data`` (a C-contiguous array of at most byte_size bytes) into the region."""
        fd = self._file.fileno()
        end = self._position + data.nbytes
        try:
            # Checked so that a truncated object is told, not silently grown back by pwrite.
            size = os.fstat(fd).st_size
            if size < end:
                raise UsageError(f"{self._what}: the object holds {size} bytes now, fewer than "
                                 f"the output needs ({end}); it was truncated after registering")
            written = os.pwrite(fd, data, self._position)
        except OSError as exc:
            raise UsageError(f"{self._what}: cannot write the output: {exc.strerror}") from None
        if written != data.nbytes:
            raise UsageError(f"{self._what}: wrote {written} of {data.nbytes} bytes of the output")


class SharedMemoryRegistry:
    def __init__(self, directory: str | Path | None = None, root: Path = SHM_ROOT,
                 max_regions: int = 64, peers: PeerUsers | None = None) -> None:
        """``directory``: where registrations are shared between --workers (None: this process
        only). ``root``: where shm_open keys live (/dev/shm; tests may point elsewhere).
        ``max_regions``: per user. ``peers``: who a gRPC peer is (for ``for_peer``)."""
        self._dir = Path(directory) if directory is not None else None
        self._root = root
        self._max = max_regions
        self._peers = peers
        self._opened: dict[tuple[int, str], _Opened] = {}

    def for_peer(self, peer: str) -> Caller:
        """The registry as a gRPC peer (``context.peer()``) may use it; its user is looked up
        when first needed, since most requests name no region."""
        peers = self._peers

        def lookup() -> int:
            if peers is None:
                raise PermissionDeniedError("shared memory: this registry cannot tell its "
                                            "clients' users apart")
            return peers.uid(peer)

        return Caller(self, lookup)

    def as_user(self, uid: int) -> Caller:
        return Caller(self, lambda: uid)

    def close(self) -> None:
        self._opened.clear()
        if self._peers is not None:
            self._peers.close()

    # -- for one user (Caller)
    def register(self, uid: int, name: str, key: str, offset: int, byte_size: int) -> Region:
        if not name:
            raise UsageError("shared-memory region name is empty; give the region a name")
        if len(name.encode()) > MAX_NAME_BYTES:
            raise UsageError(f"shared-memory region name is {len(name.encode())} bytes; at most "
                             f"{MAX_NAME_BYTES}")
        if byte_size <= 0:
            raise UsageError(f"shared-memory region '{name}': byte_size must be at least 1, "
                             f"got {byte_size}")
        if offset < 0:
            raise UsageError(f"shared-memory region '{name}': offset must be at least 0, "
                             f"got {offset}")
        if self._dir is None and (uid, name) in self._opened:
            raise AlreadyExistsError(f"shared-memory region '{name}' is already registered; "
                                     f"unregister it first")
        count = (sum(1 for u, _ in self._opened if u == uid) if self._dir is None
                 else sum(1 for _ in self._dir.glob(f"{uid}-*.json")))
        if count >= self._max:
            raise OverloadedError(f"shared-memory region '{name}': user {uid} has {count} regions "
                                  f"registered, the most this server allows "
                                  f"(--max-shared-memory-regions {self._max}); unregister some")
        file, st = self._open(key, uid, name)
        if offset + byte_size > st.st_size:
            raise UsageError(f"shared-memory region '{name}': offset {offset} + byte_size "
                             f"{byte_size} is beyond key {key!r} ({st.st_size} bytes)")
        region = Region(name, key, int(offset), int(byte_size), uid, st.st_dev, st.st_ino)
        if self._dir is None:
            self._opened[uid, name] = _Opened(region, file, None)
            return region
        path = self._file(uid, name)
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        except FileExistsError:
            raise AlreadyExistsError(f"shared-memory region '{name}' is already registered; "
                                     f"unregister it first") from None
        with os.fdopen(fd, "w") as f:
            json.dump(asdict(region), f)
        self._opened[uid, name] = _Opened(region, file, _stamp(path))
        return region

    def unregister(self, uid: int, name: str = "") -> None:
        """One region, or every region of the user when ``name`` is empty."""
        if not name:
            for n in [r.name for r in self.status(uid)]:
                with contextlib.suppress(NotFoundError):  # another worker was quicker
                    self.unregister(uid, n)
            return
        if self._dir is not None:
            try:
                self._file(uid, name).unlink()
            except FileNotFoundError:
                raise self._unknown(uid, name) from None
        elif (uid, name) not in self._opened:
            raise self._unknown(uid, name)
        self._opened.pop((uid, name), None)

    def status(self, uid: int, name: str = "") -> list[Region]:
        if name:
            return [self._lookup(uid, name).region]
        if self._dir is None:
            return [o.region for (u, _), o in self._opened.items() if u == uid]
        regions = []
        for path in sorted(self._dir.glob(f"{uid}-*.json")):
            with contextlib.suppress(FileNotFoundError, ValueError, TypeError):
                regions.append(Region(**json.loads(path.read_text())))
        return regions

    def check(self, uid: int, name: str, offset: int, byte_size: int,
              tensor: str) -> tuple[_Opened, int]:
        """The region, and where in its object ``byte_size`` bytes at ``offset`` of it start."""
        opened = self._lookup(uid, name, tensor)
        region = opened.region
        if offset < 0 or byte_size < 0 or offset + byte_size > region.byte_size:
            raise UsageError(f"{tensor}: shared_memory_offset {offset} + shared_memory_byte_size "
                             f"{byte_size} is beyond shared-memory region '{name}' "
                             f"({region.byte_size} bytes)")
        return opened, region.offset + offset

    def read_into(self, uid: int, name: str, offset: int, out: Any, tensor: str) -> None:
        """Fill ``out`` (a writable C-contiguous buffer) from region ``name`` at ``offset``."""
        nbytes = memoryview(out).nbytes
        opened, start = self.check(uid, name, offset, nbytes, tensor)
        try:
            got = os.preadv(opened.file.fileno(), [out], start)
        except OSError as exc:
            raise UsageError(f"{tensor}: cannot read shared-memory region '{name}': "
                             f"{exc.strerror}") from None
        if got != nbytes:
            raise UsageError(f"{tensor}: shared-memory region '{name}' gave {got} of {nbytes} "
                             f"bytes at offset {offset}; its key {opened.region.key!r} was "
                             f"truncated after registering")

    def output(self, uid: int, name: str, offset: int, byte_size: int,
               tensor: str) -> SharedOutput:
        opened, start = self.check(uid, name, offset, byte_size, tensor)
        return SharedOutput(opened, start, byte_size,
                            f"{tensor}: shared-memory region '{name}' (key {opened.region.key!r})")

    # -- internals
    def _open(self, key: str, uid: int, name: str) -> tuple[io.FileIO, os.stat_result]:
        """The object behind ``key``, opened for reading and writing, if user ``uid`` may."""
        if not _KEY.match(key):
            raise UsageError(f"shared-memory key {key!r} is not a POSIX shared-memory name; "
                             f"expected '/name' with letters, digits, '_', '.' or '-'")
        path = self._root / key.lstrip("/")
        try:
            # The object itself, not a link; O_NONBLOCK: a FIFO planted there must not hang us.
            fd = os.open(path, os.O_RDWR | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
        except FileNotFoundError:
            raise NotFoundError(f"shared-memory key {key!r} does not exist; create it "
                                f"(shm_open) before registering region '{name}'") from None
        except OSError as exc:
            raise UsageError(f"cannot open shared-memory key {key!r}: {exc.strerror}") from None
        file = io.FileIO(fd, "r+", closefd=True)
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            file.close()
            raise UsageError(f"shared-memory key {key!r} is not a shared-memory object")
        if not _grants(st, uid):
            file.close()
            raise PermissionDeniedError(
                f"shared-memory key {key!r} belongs to user {st.st_uid} with mode "
                f"{stat.S_IMODE(st.st_mode):03o}; a client may use only objects its user "
                f"({uid}) owns or may read and write")
        return file, st

    def _lookup(self, uid: int, name: str, tensor: str | None = None) -> _Opened:
        opened = self._opened.get((uid, name))
        if self._dir is not None:
            path = self._file(uid, name)
            stamp = _stamp(path)
            if stamp is None:
                self._opened.pop((uid, name), None)
                opened = None
            elif opened is None or opened.stamp != stamp:
                self._opened.pop((uid, name), None)
                try:
                    region = Region(**json.loads(path.read_text()))
                except (FileNotFoundError, ValueError, TypeError):
                    opened = None
                else:
                    opened = self._opened[uid, name] = self._reopen(region, stamp)
        if opened is None:
            raise self._unknown(uid, name, tensor)
        return opened

    def _reopen(self, region: Region, stamp: tuple[int, int]) -> _Opened:
        """A region another worker registered, opened here."""
        file, st = self._open(region.key, region.uid, region.name)
        if (st.st_dev, st.st_ino) != (region.device, region.inode):
            file.close()
            raise UsageError(f"shared-memory key {region.key!r} is no longer the object "
                             f"registered as region '{region.name}'; register it again")
        return _Opened(region, file, stamp)

    def _unknown(self, uid: int, name: str, tensor: str | None = None) -> CnnctlError:
        known = ", ".join(f"'{r.name}'" for r in self.status(uid)) or "none"
        where = f"{tensor}: " if tensor else ""
        # In an inference request it is a bad field (INVALID_ARGUMENT, as Triton); in the shared-
        # memory RPCs, an unknown name (NOT_FOUND).
        cls = UsageError if tensor else NotFoundError
        return cls(f"{where}shared-memory region '{name}' is not registered (registered: {known})")

    def _file(self, uid: int, name: str) -> Path:
        assert self._dir is not None
        return self._dir / f"{uid}-{name.encode().hex()}.json"


class Caller:
    """The registry as one client may use it: the regions of its user only. The user is looked
    up once, when first needed; a Caller serves one request or one stream, whose connection does
    not change under it."""

    __slots__ = ("_registry", "_lookup", "_uid")

    def __init__(self, registry: SharedMemoryRegistry, lookup: Callable[[], int]) -> None:
        self._registry = registry
        self._lookup = lookup
        self._uid: int | None = None

    @property
    def uid(self) -> int:
        if self._uid is None:
            self._uid = self._lookup()
        return self._uid

    def register(self, name: str, key: str, offset: int, byte_size: int) -> Region:
        return self._registry.register(self.uid, name, key, offset, byte_size)

    def unregister(self, name: str = "") -> None:
        self._registry.unregister(self.uid, name)

    def status(self, name: str = "") -> list[Region]:
        return self._registry.status(self.uid, name)

    def check(self, name: str, offset: int, byte_size: int, tensor: str) -> None:
        self._registry.check(self.uid, name, offset, byte_size, tensor)

    def read_into(self, name: str, offset: int, out: Any, tensor: str) -> None:
        self._registry.read_into(self.uid, name, offset, out, tensor)

    def output(self, name: str, offset: int, byte_size: int, tensor: str) -> SharedOutput:
        return self._registry.output(self.uid, name, offset, byte_size, tensor)


def _stamp(path: Path) -> tuple[int, int] | None:
    try:
        st = path.stat()
    except FileNotFoundError:
        return None
    return st.st_ino, st.st_mtime_ns


def _grants(st: os.stat_result, uid: int) -> bool:
    """Whether ``st``'s owner and mode give user ``uid`` read and write, as access(2) decides
    (the owner's bits for the owner, else the group's for a member, else the others'), without
    root's exemption."""
    mode = st.st_mode
    if st.st_uid == uid:
        return mode & 0o600 == 0o600
    if st.st_gid in _groups(uid):
        return mode & 0o060 == 0o060
    return mode & 0o006 == 0o006


def _groups(uid: int) -> set[int]:
    try:
        user = pwd.getpwuid(uid)
    except KeyError:
        return set()
    try:
        return set(os.getgrouplist(user.pw_name, user.pw_gid))
    except OSError:
        return {user.pw_gid}


# ---------------------------------------------------------------- who a peer is
_NETLINK_SOCK_DIAG = 4
_SOCK_DIAG_BY_FAMILY = 20
_NLM_F_REQUEST = 1
_NLMSG_ERROR = 2
_TCP_ESTABLISHED = 1
_NO_COOKIE = 0xFFFFFFFF
_HEADER = struct.Struct("=IHHII")  # struct nlmsghdr
_REQUEST = struct.Struct("=BBBBI")  # struct inet_diag_req_v2, up to its inet_diag_sockid
_MESSAGE = struct.Struct("=BBBB48xIIIII")  # struct inet_diag_msg: state ... uid, inode
_MAX_PEERS = 1024  # peer strings whose queries are kept


def is_loopback_host(host: str) -> bool:
    """Whether ``--host`` can only be reached from this machine (every address it names is a
    loopback one)."""
    host = host.strip("[]")
    try:
        addresses = {info[4][0] for info in socket.getaddrinfo(host, None,
                                                               proto=socket.IPPROTO_TCP)}
    except (socket.gaierror, UnicodeError):
        return False
    return bool(addresses) and all(_loopback(ipaddress.ip_address(a.split("%")[0]))
                                   for a in addresses)


def _loopback(address: Any) -> bool:
    return (_as_v4(address) or address).is_loopback


def _as_v4(address: Any) -> ipaddress.IPv4Address | None:
    """An IPv4 address, or the one an IPv4-mapped IPv6 address carries; else None."""
    return address if address.version == 4 else address.ipv4_mapped


def parse_peer(peer: str) -> tuple[ipaddress.IPv4Address | ipaddress.IPv6Address, int]:
    """gRPC's ``context.peer()`` ('ipv4:127.0.0.1:PORT', 'ipv6:[::1]:PORT') → (address, port)."""
    kind, _, rest = peer.partition(":")
    host, _, port = rest.rpartition(":")
    if kind not in ("ipv4", "ipv6") or not port.isdigit():
        raise PermissionDeniedError(f"shared memory is for TCP clients on this host; cannot tell "
                                    f"the user of peer {peer!r}")
    try:
        return ipaddress.ip_address(host.strip("[]").split("%")[0]), int(port)
    except ValueError:
        raise PermissionDeniedError(f"shared memory: peer {peer!r} is not an address") from None


class PeerUsers:
    """A connected peer's Unix user: the owner of the client's socket of that TCP connection,
    found by its four addresses through netlink sock_diag (Linux). One exact lookup is a hash
    lookup in the kernel, whatever the number of sockets on the host (reading /proc/net/tcp scans
    them all). The user is not cached: a port, once free, may be bound by another user's client.
    What a peer string parses to is (the queries to send, bounded)."""

    def __init__(self, host: str, port: int) -> None:
        self._port = port
        self._servers: list[Any] = []  # where the client may have connected to, likeliest first
        with contextlib.suppress(ValueError):
            listening = ipaddress.ip_address(host.strip("[]"))
            if _loopback(listening):
                self._servers.append(listening)
        self._servers += [ipaddress.ip_address("127.0.0.1"), ipaddress.ip_address("::1")]
        self._queries: dict[str, list[bytes]] = {}
        self._netlink: socket.socket | None = None
        self._seq = 0

    def uid(self, peer: str) -> int:
        queries = self._queries.get(peer)
        if queries is None:
            queries = self._plan(peer)
            if len(self._queries) >= _MAX_PEERS:
                self._queries.clear()
            self._queries[peer] = queries
        for query in queries:
            found = self._diag(query)
            # Only a live socket has its owner's uid (a closing one reads as root's).
            if found is not None and found[0] == _TCP_ESTABLISHED:
                return found[1]
        raise PermissionDeniedError(f"shared memory: cannot tell the user of peer {peer} (the "
                                    f"kernel shows no connection from it to port {self._port})")

    def _plan(self, peer: str) -> list[bytes]:
        """The sock_diag queries for the client's socket of ``peer``: (family, client address,
        server address) as the connection may have them."""
        address, port = parse_peer(peer)
        if not _loopback(address):
            raise PermissionDeniedError(f"shared memory is for clients on this host; peer {peer} "
                                        f"is not a loopback address")
        client4 = _as_v4(address)
        found: list[tuple[int, Any, Any]] = []
        for server in [*self._servers, address]:
            server4 = _as_v4(server)
            if client4 is not None and server4 is not None:  # an AF_INET or a v4-mapped socket
                found.append((socket.AF_INET, client4, server4))
                found.append((socket.AF_INET6, ipaddress.ip_address(f"::ffff:{client4}"),
                              ipaddress.ip_address(f"::ffff:{server4}")))
            elif client4 is None and server4 is None:
                found.append((socket.AF_INET6, address, server))
        return [_REQUEST.pack(family, socket.IPPROTO_TCP, 0, 0, 0xFFFFFFFF)
                + struct.pack("!HH", port, self._port)
                + source.packed.ljust(16, b"\0") + destination.packed.ljust(16, b"\0")
                + struct.pack("=III", 0, _NO_COOKIE, _NO_COOKIE)
                for family, source, destination in dict.fromkeys(found)]

    def _diag(self, query: bytes) -> tuple[int, int] | None:
        """(state, uid) of the TCP socket ``query`` names, or None."""
        if self._netlink is None:
            try:
                self._netlink = socket.socket(socket.AF_NETLINK, socket.SOCK_DGRAM,
                                              _NETLINK_SOCK_DIAG)
            except (OSError, AttributeError) as exc:
                raise PermissionDeniedError(
                    f"shared memory: cannot tell clients' users apart here (netlink sock_diag: "
                    f"{getattr(exc, 'strerror', None) or exc}); shared memory needs Linux"
                ) from None
        self._seq = self._seq % 0xFFFFFFFF + 1
        try:
            self._netlink.sendto(_HEADER.pack(_HEADER.size + len(query), _SOCK_DIAG_BY_FAMILY,
                                              _NLM_F_REQUEST, self._seq, 0) + query, (0, 0))
            while True:
                data = self._netlink.recv(8192)
                _, kind, _, seq, _ = _HEADER.unpack_from(data)
                if seq == self._seq:
                    break
        except OSError as exc:
            self._netlink.close()
            self._netlink = None
            raise PermissionDeniedError(f"shared memory: cannot tell the client's user "
                                        f"(netlink sock_diag: {exc.strerror})") from None
        if kind == _NLMSG_ERROR:
            return None  # ENOENT: no such socket
        _, state, _, _, _, _, _, uid, _ = _MESSAGE.unpack_from(data, _HEADER.size)
        return state, uid

    def close(self) -> None:
        if self._netlink is not None:
            self._netlink.close()
            self._netlink = None
