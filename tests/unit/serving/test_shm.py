"""Triton's system shared-memory extension: the region registry on its own, then a real server
reading inputs from and writing outputs to POSIX shared memory, with every bad use answered by its
status code and a message that names it."""

from __future__ import annotations

import asyncio
import collections
import dataclasses
import io
import os
import socket
import re
import struct
import threading
import time
import uuid
from collections.abc import Iterator
from multiprocessing import shared_memory
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest
from PIL import Image

from cnnctl.errors import (AlreadyExistsError, NotFoundError, OverloadedError,
                           PermissionDeniedError, UsageError)
from cnnctl.protos import grpc_service_pb2 as pb
from cnnctl.serving.config import ServerConfig
from cnnctl.serving.shm import (SHM_ROOT, Caller, PeerUsers, SharedMemoryRegistry,
                                is_loopback_host)
from tests.support.serving import (CliServer, config_for, infer_request, logits_of, running,
                                   stub)

pytestmark = pytest.mark.skipif(not SHM_ROOT.is_dir(), reason="no /dev/shm (POSIX shared memory)")
BAD = grpc.StatusCode.INVALID_ARGUMENT


@pytest.fixture
def segment() -> Iterator[Any]:
    """A fresh POSIX shared-memory object of 64 KiB; its key is '/' + its name."""
    shm = shared_memory.SharedMemory(name=f"cnnctl_test_{uuid.uuid4().hex[:12]}", create=True,
                                     size=1 << 16)
    yield shm
    shm.close()
    shm.unlink()


def key(shm: Any) -> str:
    return "/" + shm.name


# ---------------------------------------------------------------- the registry
ME = os.getuid()
OTHER = ME + 1  # a user who owns nothing here


def registry(root: Path = SHM_ROOT, directory: Path | None = None, uid: int = ME,
             max_regions: int = 64) -> Caller:
    return SharedMemoryRegistry(directory, root=root, max_regions=max_regions).as_user(uid)


def read(reg: Caller, name: str, offset: int, size: int) -> bytes:
    out = bytearray(size)
    reg.read_into(name, offset, out, tensor="input 'x'")
    return bytes(out)


def test_register_read_write_status_unregister(segment: Any) -> None:
    reg = registry()
    reg.register("a", key(segment), 1024, 4096)
    segment.buf[1024 + 8:1024 + 12] = b"abcd"
    assert read(reg, "a", 8, 4) == b"abcd"
    reg.output("a", 8, 4, tensor="output 'y'").write(np.frombuffer(b"wxyz", np.uint8))
    assert bytes(segment.buf[1032:1036]) == b"wxyz"
    assert [(r.name, r.key, r.offset, r.byte_size, r.uid) for r in reg.status()] == [
        ("a", key(segment), 1024, 4096, ME)]
    assert reg.status("a")[0].byte_size == 4096
    reg.unregister("a")
    assert reg.status() == []


def test_registry_errors_name_the_problem(segment: Any) -> None:
    reg = registry()
    reg.register("a", key(segment), 0, 100)
    with pytest.raises(AlreadyExistsError, match="region 'a' is already registered"):
        reg.register("a", key(segment), 0, 100)
    with pytest.raises(NotFoundError, match="key '/cnnctl_no_such_key' does not exist"):
        reg.register("b", "/cnnctl_no_such_key", 0, 100)
    with pytest.raises(UsageError, match="key '/etc/passwd' is not a POSIX shared-memory name"):
        reg.register("b", "/etc/passwd", 0, 100)
    with pytest.raises(UsageError, match=r"offset 65000 \+ byte_size 1000 is beyond key .* "
                                         r"\(65536 bytes\)"):
        reg.register("b", key(segment), 65000, 1000)
    with pytest.raises(UsageError, match="byte_size must be at least 1, got 0"):
        reg.register("b", key(segment), 0, 0)
    with pytest.raises(UsageError, match="region name is empty"):
        reg.register("", key(segment), 0, 10)
    with pytest.raises(UsageError, match="region name is 101 bytes; at most 100"):
        reg.register("n" * 101, key(segment), 0, 10)
    with pytest.raises(UsageError, match=r"input 'x': shared_memory_offset 90 \+ "
                                         r"shared_memory_byte_size 20 is beyond shared-memory "
                                         r"region 'a' \(100 bytes\)"):
        read(reg, "a", 90, 20)
    with pytest.raises(UsageError, match=r"input 'x': shared-memory region 'zz' is not registered "
                                         r"\(registered: 'a'\)"):
        read(reg, "zz", 0, 1)
    with pytest.raises(NotFoundError, match="region 'zz' is not registered"):
        reg.unregister("zz")
    with pytest.raises(NotFoundError, match="region 'zz' is not registered"):
        reg.status("zz")


def test_a_key_that_is_a_symlink_or_no_object_is_refused(tmp_path: Path) -> None:
    """The server opens the shared-memory object itself, never what a link in /dev/shm points to,
    nor a FIFO (which could hang it) or a directory."""
    target = tmp_path / "elsewhere"
    target.write_bytes(b"\0" * 64)
    (tmp_path / "link").symlink_to(target)
    os.mkfifo(tmp_path / "fifo")
    reg = registry(tmp_path)
    with pytest.raises(UsageError, match="cannot open shared-memory key '/link': Too many levels "
                                         "of symbolic links"):
        reg.register("r", "/link", 0, 8)
    with pytest.raises(UsageError, match="^shared-memory key '/fifo' is not a shared-memory "
                                         "object$"):
        reg.register("r", "/fifo", 0, 8)
    reg.register("r", "/elsewhere", 0, 8)  # the object itself is fine


def test_an_object_truncated_after_registering_is_refused_not_a_crash(tmp_path: Path) -> None:
    """Nothing is mapped, so a truncated object is a short read or a refused write: no SIGBUS."""
    (tmp_path / "obj").write_bytes(b"\1" * 4096)
    reg = registry(tmp_path)
    reg.register("r", "/obj", 0, 4096)
    out = reg.output("r", 3000, 1000, tensor="output 'y'")
    assert read(reg, "r", 4000, 96) == b"\1" * 96
    os.truncate(tmp_path / "obj", 1000)
    with pytest.raises(UsageError) as info:
        read(reg, "r", 4000, 96)
    assert str(info.value) == ("input 'x': shared-memory region 'r' gave 0 of 96 bytes at offset "
                               "4000; its key '/obj' was truncated after registering")
    with pytest.raises(UsageError) as info:
        out.write(np.zeros(250, np.float32))
    assert str(info.value) == ("output 'y': shared-memory region 'r' (key '/obj'): the object "
                               "holds 1000 bytes now, fewer than the output needs (4000); it was "
                               "truncated after registering")
    assert (tmp_path / "obj").stat().st_size == 1000  # not grown back by the write
    assert read(reg, "r", 0, 1000) == b"\1" * 1000  # what is still there is usable


def test_an_output_still_to_write_survives_unregister(segment: Any) -> None:
    """Its descriptor stays open until the output is written: never closed (and its number
    reused by another file) under it."""
    reg = registry()
    reg.register("a", key(segment), 0, 16)
    out = reg.output("a", 0, 16, tensor="output 'y'")
    reg.unregister("a")
    out.write(np.arange(4, dtype="<f4"))
    assert bytes(segment.buf[:16]) == np.arange(4, dtype="<f4").tobytes()
    reg.unregister()  # all: none left, no error


def test_regions_belong_to_the_user_who_registered_them(segment: Any, tmp_path: Path) -> None:
    """Names are per user; another user sees none of them, cannot use, list or unregister them,
    alone or through the --workers directory."""
    os.chmod(SHM_ROOT / segment.name, 0o666)  # open to every user: still not their region
    for directory in (None, tmp_path):
        shared = SharedMemoryRegistry(directory)
        mine, theirs = shared.as_user(ME), shared.as_user(OTHER)
        mine.register("r", key(segment), 0, 64)
        assert theirs.status() == []
        with pytest.raises(UsageError) as info:
            read(theirs, "r", 0, 4)
        assert str(info.value) == ("input 'x': shared-memory region 'r' is not registered "
                                   "(registered: none)")
        with pytest.raises(NotFoundError) as info:
            theirs.unregister("r")
        assert str(info.value) == "shared-memory region 'r' is not registered (registered: none)"
        theirs.unregister()  # all of theirs: none
        theirs.register("r", key(segment), 32, 32)  # the same name, their own region
        assert [(r.uid, r.offset) for r in mine.status()] == [(ME, 0)]
        assert [(r.uid, r.offset) for r in theirs.status()] == [(OTHER, 32)]
        mine.unregister()
        assert mine.status() == [] and [r.uid for r in theirs.status()] == [OTHER]
        theirs.unregister()


def test_a_user_registers_only_objects_it_may_read_and_write(tmp_path: Path) -> None:
    obj = tmp_path / "obj"
    obj.write_bytes(bytes(64))
    os.chmod(obj, 0o600)
    with pytest.raises(PermissionDeniedError) as info:
        registry(tmp_path, uid=OTHER).register("r", "/obj", 0, 64)
    assert str(info.value) == (f"shared-memory key '/obj' belongs to user {ME} with mode 600; a "
                               f"client may use only objects its user ({OTHER}) owns or may read "
                               f"and write")
    os.chmod(obj, 0o644)  # readable is not enough: outputs are written
    with pytest.raises(PermissionDeniedError):
        registry(tmp_path, uid=OTHER).register("r", "/obj", 0, 64)
    os.chmod(obj, 0o666)
    registry(tmp_path, uid=OTHER).register("r", "/obj", 0, 64)
    os.chmod(obj, 0o400)  # its owner needs read and write too
    with pytest.raises(PermissionDeniedError, match="belongs to user .* with mode 400"):
        registry(tmp_path).register("r", "/obj", 0, 64)


@pytest.mark.skipif(os.getuid() != 0, reason="chown needs root")
def test_root_has_no_exemption(tmp_path: Path) -> None:
    """A client running as root (a proxy relaying others' requests, say) is not let into every
    object: only those root owns or whose mode grants it."""
    obj = tmp_path / "obj"
    obj.write_bytes(bytes(64))
    os.chown(obj, 65534, 65534)
    os.chmod(obj, 0o600)
    with pytest.raises(PermissionDeniedError, match="belongs to user 65534 with mode 600"):
        registry(tmp_path, uid=0).register("r", "/obj", 0, 64)


def test_registrations_are_capped_per_user(segment: Any, tmp_path: Path) -> None:
    os.chmod(SHM_ROOT / segment.name, 0o666)
    for directory in (None, tmp_path):
        shared = SharedMemoryRegistry(directory, max_regions=2)
        mine = shared.as_user(ME)
        mine.register("a", key(segment), 0, 8)
        mine.register("b", key(segment), 0, 8)
        with pytest.raises(OverloadedError) as info:
            mine.register("c", key(segment), 0, 8)
        assert str(info.value) == (f"shared-memory region 'c': user {ME} has 2 regions "
                                   f"registered, the most this server allows "
                                   f"(--max-shared-memory-regions 2); unregister some")
        shared.as_user(OTHER).register("c", key(segment), 0, 8)  # another user's own budget
        mine.unregister("a")
        mine.register("c", key(segment), 0, 8)
        shared.as_user(OTHER).unregister()
        mine.unregister()


def test_workers_share_registrations_through_a_directory(segment: Any, tmp_path: Path) -> None:
    a, b = registry(directory=tmp_path), registry(directory=tmp_path)
    a.register("r", key(segment), 0, 64)
    segment.buf[:4] = b"\x01\x02\x03\x04"
    assert read(b, "r", 0, 4) == b"\x01\x02\x03\x04"  # b opens it on first use
    assert [r.name for r in b.status()] == ["r"]
    with pytest.raises(AlreadyExistsError):
        b.register("r", key(segment), 0, 64)
    b.unregister("r")  # unregistered by another worker...
    with pytest.raises(UsageError, match="region 'r' is not registered"):
        read(a, "r", 0, 4)  # ...is gone here too
    a.register("r", key(segment), 32, 32)  # re-registered elsewhere: b picks up the new offset
    segment.buf[32:36] = b"wxyz"
    assert read(b, "r", 0, 4) == b"wxyz"
    with pytest.raises(UsageError, match=r"beyond shared-memory region 'r' \(32 bytes\)"):
        read(b, "r", 0, 64)


def test_a_worker_opens_only_the_object_that_was_registered(tmp_path: Path) -> None:
    """A key unlinked and created again after registering (by anyone) is not the object its
    user registered: another worker refuses it rather than reading or writing it."""
    root = tmp_path / "shm"
    root.mkdir()
    (root / "obj").write_bytes(bytes(64))
    a, b = registry(root, tmp_path), registry(root, tmp_path)
    a.register("r", "/obj", 0, 64)
    (root / "obj").unlink()
    (root / "other").write_bytes(bytes(64))  # keeps the old inode number from being reused
    (root / "obj").write_bytes(bytes(64))
    with pytest.raises(UsageError) as info:
        read(b, "r", 0, 4)
    assert str(info.value) == ("shared-memory key '/obj' is no longer the object registered as "
                               "region 'r'; register it again")
    assert read(a, "r", 0, 4) == bytes(4)  # the worker that registered it still holds it


# ---------------------------------------------------------------- who the peer is
def test_peers_that_are_not_local_tcp_are_refused() -> None:
    peers = PeerUsers("127.0.0.1", 8001)
    for peer, message in [
            ("ipv4:192.0.2.7:5000", "shared memory is for clients on this host; peer "
             "ipv4:192.0.2.7:5000 is not a loopback address"),
            ("ipv6:[2001:db8::1]:5000", "shared memory is for clients on this host; peer "
             "ipv6:[2001:db8::1]:5000 is not a loopback address"),
            ("unix:/tmp/s", "shared memory is for TCP clients on this host; cannot tell the "
             "user of peer 'unix:/tmp/s'"),
            ("ipv4:127.0.0.1:1", "shared memory: cannot tell the user of peer ipv4:127.0.0.1:1 "
             "(the kernel shows no connection from it to port 8001)")]:
        with pytest.raises(PermissionDeniedError) as info:
            peers.uid(peer)
        assert str(info.value) == message
    peers.close()


def _connected(host: str = "127.0.0.1", family: int = socket.AF_INET
               ) -> tuple[socket.socket, socket.socket, str]:
    listener = socket.socket(family)
    listener.bind((host, 0))
    listener.listen()
    client = socket.socket(family)
    client.connect(listener.getsockname()[:2])
    conn, address = listener.accept()
    listener.close()
    kind = "ipv4" if family == socket.AF_INET else "ipv6"
    host_part = address[0] if family == socket.AF_INET else f"[{address[0]}]"
    return client, conn, f"{kind}:{host_part}:{address[1]}"


@pytest.mark.parametrize("host", ["127.0.0.1", "::1"])
def test_a_loopback_peer_is_its_sockets_user(host: str) -> None:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    try:
        client, conn, peer = _connected(host, family)
    except OSError:
        pytest.skip(f"no {host}")
    peers = PeerUsers(host, conn.getsockname()[1])
    assert peers.uid(peer) == ME
    client.close()  # closing: no user to act for (a closing socket reads as root's)
    with pytest.raises(PermissionDeniedError, match="cannot tell the user of peer"):
        peers.uid(peer)
    conn.close()
    peers.close()


@pytest.mark.skipif(os.getuid() != 0, reason="setuid needs root")
def test_a_peer_of_another_user_is_that_user() -> None:
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen()
    port = listener.getsockname()[1]
    child = os.fork()
    if child == 0:  # a client of user 65534: connect, hold the connection, go
        try:
            os.setuid(65534)
            s = socket.socket()
            s.connect(("127.0.0.1", port))
            s.recv(1)
        finally:
            os._exit(0)
    conn, address = listener.accept()
    try:
        peers = PeerUsers("0.0.0.0", port)  # bound to every address: the usual ones tried
        assert peers.uid(f"ipv4:{address[0]}:{address[1]}") == 65534
        peers.close()
    finally:
        conn.close()
        listener.close()
        os.waitpid(child, 0)


def test_loopback_hosts() -> None:
    assert all(is_loopback_host(h) for h in ("127.0.0.1", "127.0.0.2", "::1", "[::1]",
                                             "localhost"))
    assert not any(is_loopback_host(h) for h in ("0.0.0.0", "::", "192.0.2.1", "[::]",
                                                 "no-such-host.invalid"))


def test_shared_memory_with_a_non_loopback_host_needs_its_own_flag() -> None:
    with pytest.raises(UsageError) as info:
        ServerConfig(host="0.0.0.0", allow_shared_memory=True)
    assert str(info.value) == ("--allow-shared-memory with --host 0.0.0.0, which other machines "
                               "may reach: shared memory is for clients on this host; use a "
                               "loopback --host, or add --allow-shared-memory-non-loopback-host "
                               "(remote peers are still refused)")
    ServerConfig(host="0.0.0.0", allow_shared_memory=True,
                 allow_shared_memory_non_loopback_host=True)
    ServerConfig(host="0.0.0.0")  # without shared memory, any host


# ---------------------------------------------------------------- through a server
def shm_request(x: np.ndarray | None, in_region: str | None = None, out_region: str | None = None,
                in_offset: int = 0, out_offset: int = 0, in_size: int | None = None,
                out_size: int | None = None) -> pb.ModelInferRequest:
    """A request whose input (and/or output) is in shared memory; raw contents otherwise."""
    if x is not None and in_region is None:
        req = infer_request(x)
    else:
        req = pb.ModelInferRequest(model_name="lenet5")
        t = req.inputs.add(name="input", datatype="FP32", shape=[1, 1, 32, 32] if x is None
                           else list(x.shape))
        t.parameters["shared_memory_region"].string_param = in_region or ""
        t.parameters["shared_memory_byte_size"].int64_param = (
            in_size if in_size is not None else 4 * (1024 if x is None else x.size))
        if in_offset:
            t.parameters["shared_memory_offset"].int64_param = in_offset
    if out_region is not None:
        o = req.outputs.add(name="logits")
        o.parameters["shared_memory_region"].string_param = out_region
        n = req.inputs[0].shape[0]
        o.parameters["shared_memory_byte_size"].int64_param = (
            out_size if out_size is not None else 40 * n)
        if out_offset:
            o.parameters["shared_memory_offset"].int64_param = out_offset
    return req


def put(segment: Any, offset: int, x: np.ndarray) -> None:
    np.ndarray(x.shape, "<f4", buffer=segment.buf, offset=offset)[...] = x


def get(segment: Any, offset: int, n: int) -> np.ndarray:
    return np.ndarray((n, 10), "<f4", buffer=segment.buf, offset=offset).copy()


def test_inputs_and_outputs_through_shared_memory(artifacts: dict[str, Path], reference: Any,
                                                  rng: np.random.Generator, segment: Any) -> None:
    async def main() -> None:
        cfg = config_for(artifacts["lenet5"], allow_shared_memory=True, max_queue_delay_ms=20)
        async with running(cfg) as (_, ch):
            s = stub(ch)
            meta = await s.ServerMetadata(pb.ServerMetadataRequest())
            assert "system_shared_memory" in meta.extensions
            await s.SystemSharedMemoryRegister(pb.SystemSharedMemoryRegisterRequest(
                name="in", key=key(segment), offset=0, byte_size=32768))
            await s.SystemSharedMemoryRegister(pb.SystemSharedMemoryRegisterRequest(
                name="out", key=key(segment), offset=32768, byte_size=32768))
            status = await s.SystemSharedMemoryStatus(pb.SystemSharedMemoryStatusRequest())
            assert sorted(status.regions) == ["in", "out"]
            assert status.regions["out"].offset == 32768
            x = rng.standard_normal((5, 1, 32, 32), dtype=np.float32)
            put(segment, 4096, x)
            # input and output in shared memory: the answer describes the output, holds no data
            resp = await s.ModelInfer(shm_request(x, "in", "out", in_offset=4096, out_offset=400))
            assert list(resp.raw_output_contents) == [b""]  # as Triton: one (empty) per output
            assert list(resp.outputs[0].shape) == [5, 10]
            assert resp.outputs[0].parameters["shared_memory_region"].string_param == "out"
            np.testing.assert_allclose(get(segment, 32768 + 400, 5), reference(x), rtol=1e-5,
                                       atol=1e-5)
            # input in shared memory, output in the message; and the other way round
            resp = await s.ModelInfer(shm_request(x, "in", in_offset=4096))
            np.testing.assert_allclose(logits_of(resp), reference(x), rtol=1e-5, atol=1e-5)
            y = rng.standard_normal((2, 1, 32, 32), dtype=np.float32)
            resp = await s.ModelInfer(shm_request(y, out_region="out"))
            assert list(resp.raw_output_contents) == [b""]  # as Triton: one (empty) per output
            np.testing.assert_allclose(get(segment, 32768, 2), reference(y), rtol=1e-5, atol=1e-5)
            # concurrent requests batched together, each with its own output slot
            xs = [rng.standard_normal((1, 1, 32, 32), dtype=np.float32) for _ in range(8)]
            for i, xi in enumerate(xs):
                put(segment, 4096 * i, xi)  # each request's input at its own offset
            reqs = [shm_request(xi, "in", "out", in_offset=4096 * i, out_offset=40 * i)
                    for i, xi in enumerate(xs)]
            await asyncio.gather(*(s.ModelInfer(r) for r in reqs))
            np.testing.assert_allclose(get(segment, 32768, len(xs)),
                                       np.concatenate([reference(xi) for xi in xs]), rtol=1e-5,
                                       atol=1e-5)
            # encoded images in the message, their logits into shared memory
            png = io.BytesIO()
            Image.fromarray(np.full((28, 28), 200, np.uint8)).save(png, format="PNG")
            images = pb.ModelInferRequest(model_name="lenet5")
            raw = b"".join(struct.pack("<I", len(png.getvalue())) + png.getvalue()
                           for _ in range(2))
            images.inputs.add(name="input", datatype="BYTES", shape=[2])
            images.raw_input_contents.append(raw)
            in_message = logits_of(await s.ModelInfer(images))
            o = images.outputs.add(name="logits")
            o.parameters["shared_memory_region"].string_param = "out"
            o.parameters["shared_memory_byte_size"].int64_param = 80
            assert list((await s.ModelInfer(images)).raw_output_contents) == [b""]
            np.testing.assert_array_equal(get(segment, 32768, 2), in_message)
            stats = (await s.ModelStatistics(pb.ModelStatisticsRequest(name="lenet5"))).model_stats
            assert stats[0].execution_count < stats[0].inference_stats.success.count  # merged
            await s.SystemSharedMemoryUnregister(pb.SystemSharedMemoryUnregisterRequest(name="in"))
            status = await s.SystemSharedMemoryStatus(pb.SystemSharedMemoryStatusRequest())
            assert sorted(status.regions) == ["out"]
            await s.SystemSharedMemoryUnregister(pb.SystemSharedMemoryUnregisterRequest())
            status = await s.SystemSharedMemoryStatus(pb.SystemSharedMemoryStatusRequest())
            assert list(status.regions) == []

    run(main())


async def expect(call: Any, request: Any, code: grpc.StatusCode, message: str) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await call(request)
    assert (info.value.code(), info.value.details()) == (code, message)


def test_bad_shared_memory_use_gets_its_status_code(artifacts: dict[str, Path], reference: Any,
                                                    rng: np.random.Generator,
                                                    segment: Any) -> None:
    async def main() -> None:
        cfg = config_for(artifacts["lenet5"], allow_shared_memory=True)
        async with running(cfg) as (_, ch):
            s = stub(ch)
            reg = s.SystemSharedMemoryRegister
            await reg(pb.SystemSharedMemoryRegisterRequest(name="r", key=key(segment),
                                                           byte_size=8192))
            await expect(reg, pb.SystemSharedMemoryRegisterRequest(
                name="r", key=key(segment), byte_size=10), grpc.StatusCode.ALREADY_EXISTS,
                "shared-memory region 'r' is already registered; unregister it first")
            await expect(reg, pb.SystemSharedMemoryRegisterRequest(
                name="q", key="/cnnctl_missing", byte_size=10), grpc.StatusCode.NOT_FOUND,
                "shared-memory key '/cnnctl_missing' does not exist; create it (shm_open) "
                "before registering region 'q'")
            await expect(reg, pb.SystemSharedMemoryRegisterRequest(
                name="q", key=key(segment), offset=65536, byte_size=1), BAD,
                f"shared-memory region 'q': offset 65536 + byte_size 1 is beyond key "
                f"'{key(segment)}' (65536 bytes)")
            await expect(s.SystemSharedMemoryUnregister,
                         pb.SystemSharedMemoryUnregisterRequest(name="q"),
                         grpc.StatusCode.NOT_FOUND,
                         "shared-memory region 'q' is not registered (registered: 'r')")
            x = rng.standard_normal((1, 1, 32, 32), dtype=np.float32)
            cases = [
                (shm_request(x, "nope"), "input 'input': shared-memory region 'nope' is not "
                 "registered (registered: 'r')"),
                (shm_request(x, "r", in_size=100), "input 'input': shared_memory_byte_size is "
                 "100 bytes; shape [1, 1, 32, 32] of FP32 needs 4096"),
                (shm_request(x, "r", in_offset=8000), "input 'input': shared_memory_offset 8000 + "
                 "shared_memory_byte_size 4096 is beyond shared-memory region 'r' (8192 bytes)"),
                (shm_request(x, out_region="r", out_size=8), "output 'logits': "
                 "shared_memory_byte_size 8 is too small; 1 x [10] FP32 needs 40"),
                (shm_request(x, out_region="r", out_offset=8190), "output 'logits': "
                 "shared_memory_offset 8190 + shared_memory_byte_size 40 is beyond shared-memory "
                 "region 'r' (8192 bytes)"),
            ]
            both = shm_request(x, "r")
            both.raw_input_contents.append(x.tobytes())
            cases.append((both, "input 'input' has both a shared-memory region and contents in "
                          "the message; send one"))
            half = shm_request(x, "r")
            del half.inputs[0].parameters["shared_memory_byte_size"]
            cases.append((half, "input 'input': shared_memory_region and "
                          "shared_memory_byte_size go together; give both"))
            for req, message in cases:
                await expect(s.ModelInfer, req, BAD, message)
            # ...and the server goes on serving, shared memory included
            put(segment, 0, x)
            resp = await s.ModelInfer(shm_request(x, "r"))
            np.testing.assert_allclose(logits_of(resp), reference(x), rtol=1e-5, atol=1e-5)

    run(main())


def test_shared_memory_is_off_unless_allowed(artifacts: dict[str, Path], segment: Any,
                                             rng: np.random.Generator) -> None:
    async def main() -> None:
        async with running(config_for(artifacts["lenet5"])) as (_, ch):
            s = stub(ch)
            meta = await s.ServerMetadata(pb.ServerMetadataRequest())
            assert "system_shared_memory" not in meta.extensions
            off = grpc.StatusCode.FAILED_PRECONDITION
            await expect(s.SystemSharedMemoryRegister, pb.SystemSharedMemoryRegisterRequest(
                name="r", key=key(segment), byte_size=10), off,
                "system shared memory is off; start cnnctl serve with --allow-shared-memory to "
                "register regions")
            await expect(s.SystemSharedMemoryStatus, pb.SystemSharedMemoryStatusRequest(), off,
                         "system shared memory is off; start cnnctl serve with "
                         "--allow-shared-memory to register regions")
            x = rng.standard_normal((1, 1, 32, 32), dtype=np.float32)
            await expect(s.ModelInfer, shm_request(x, "r"), off,
                         "input 'input' names a shared-memory region, but shared memory is off; "
                         "start cnnctl serve with --allow-shared-memory")

    run(main())


def test_another_users_regions_are_out_of_reach(artifacts: dict[str, Path], reference: Any,
                                                rng: np.random.Generator, segment: Any) -> None:
    """A region another user registered (here put in the registry directly) is not listed,
    named or unregistered by this client; its name is free for this client's own region."""
    os.chmod(SHM_ROOT / segment.name, 0o666)

    async def main() -> None:
        async with running(config_for(artifacts["lenet5"], allow_shared_memory=True)) as (
                server, ch):
            s = stub(ch)
            server.servicer.shm.as_user(OTHER).register("theirs", key(segment), 0, 8192)
            status = await s.SystemSharedMemoryStatus(pb.SystemSharedMemoryStatusRequest())
            assert list(status.regions) == []
            await expect(s.SystemSharedMemoryStatus,
                         pb.SystemSharedMemoryStatusRequest(name="theirs"),
                         grpc.StatusCode.NOT_FOUND,
                         "shared-memory region 'theirs' is not registered (registered: none)")
            x = rng.standard_normal((1, 1, 32, 32), dtype=np.float32)
            put(segment, 0, x)
            await expect(s.ModelInfer, shm_request(x, out_region="theirs"), BAD,
                         "output 'logits': shared-memory region 'theirs' is not registered "
                         "(registered: none)")
            await expect(s.ModelInfer, shm_request(x, "theirs"), BAD,
                         "input 'input': shared-memory region 'theirs' is not registered "
                         "(registered: none)")
            await expect(s.SystemSharedMemoryUnregister,
                         pb.SystemSharedMemoryUnregisterRequest(name="theirs"),
                         grpc.StatusCode.NOT_FOUND,
                         "shared-memory region 'theirs' is not registered (registered: none)")
            await s.SystemSharedMemoryUnregister(pb.SystemSharedMemoryUnregisterRequest())
            assert [r.name for r in server.servicer.shm.as_user(OTHER).status()] == ["theirs"]
            await s.SystemSharedMemoryRegister(pb.SystemSharedMemoryRegisterRequest(
                name="theirs", key=key(segment), byte_size=8192))  # a name per user
            resp = await s.ModelInfer(shm_request(x, "theirs"))
            np.testing.assert_allclose(logits_of(resp), reference(x), rtol=1e-5, atol=1e-5)

    run(main())


@pytest.mark.skipif(os.getuid() != 0, reason="chown needs root")
def test_a_client_cannot_register_another_users_object(artifacts: dict[str, Path],
                                                       segment: Any) -> None:
    """Before: any client could name, say, another process's object as its output region and
    have the server overwrite it."""
    os.chown(SHM_ROOT / segment.name, 65534, 65534)

    async def main() -> None:
        async with running(config_for(artifacts["lenet5"], allow_shared_memory=True)) as (_, ch):
            s = stub(ch)
            await expect(s.SystemSharedMemoryRegister, pb.SystemSharedMemoryRegisterRequest(
                name="r", key=key(segment), byte_size=64), grpc.StatusCode.PERMISSION_DENIED,
                f"shared-memory key '{key(segment)}' belongs to user 65534 with mode 600; a "
                f"client may use only objects its user (0) owns or may read and write")
            os.chmod(SHM_ROOT / segment.name, 0o666)  # opened up to every user by its owner
            await s.SystemSharedMemoryRegister(pb.SystemSharedMemoryRegisterRequest(
                name="r", key=key(segment), byte_size=64))

    run(main())


def test_registrations_are_capped(artifacts: dict[str, Path], segment: Any) -> None:
    """Before: uncapped, until the server ran out of file descriptors (INTERNAL)."""
    async def main() -> None:
        cfg = config_for(artifacts["lenet5"], allow_shared_memory=True,
                         max_shared_memory_regions=3)
        async with running(cfg) as (_, ch):
            reg = stub(ch).SystemSharedMemoryRegister
            for i in range(3):
                await reg(pb.SystemSharedMemoryRegisterRequest(name=f"r{i}", key=key(segment),
                                                               byte_size=64))
            await expect(reg, pb.SystemSharedMemoryRegisterRequest(
                name="r3", key=key(segment), byte_size=64), grpc.StatusCode.RESOURCE_EXHAUSTED,
                f"shared-memory region 'r3': user {ME} has 3 regions registered, the most this "
                f"server allows (--max-shared-memory-regions 3); unregister some")

    run(main())


def _local_address() -> str | None:
    """An address of this machine that is not a loopback one (no packet is sent)."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        try:
            s.connect(("192.0.2.1", 9))
        except OSError:
            return None
        address = s.getsockname()[0]
    return None if address.startswith("127.") else address


def test_peers_from_other_machines_are_refused(artifacts: dict[str, Path],
                                               rng: np.random.Generator, segment: Any) -> None:
    """With --host 0.0.0.0 (and the flag that allows it), clients through the loopback address
    use shared memory; a client through another address is refused, whatever it names."""
    address = _local_address()
    if address is None:
        pytest.skip("no address but loopback")

    async def main() -> None:
        cfg = dataclasses.replace(
            config_for(artifacts["lenet5"], allow_shared_memory=True), host="0.0.0.0",
            allow_shared_memory_non_loopback_host=True)
        async with running(cfg) as (server, local):
            await stub(local).SystemSharedMemoryRegister(pb.SystemSharedMemoryRegisterRequest(
                name="r", key=key(segment), byte_size=8192))
            async with grpc.aio.insecure_channel(f"{address}:{server.port}") as ch:
                s = stub(ch)
                peer_message = (f"shared memory is for clients on this host; peer "
                                f"ipv4:{address}:")
                for call, request in [
                        (s.SystemSharedMemoryRegister, pb.SystemSharedMemoryRegisterRequest(
                            name="q", key=key(segment), byte_size=64)),
                        (s.SystemSharedMemoryStatus, pb.SystemSharedMemoryStatusRequest()),
                        (s.SystemSharedMemoryUnregister,
                         pb.SystemSharedMemoryUnregisterRequest()),
                        (s.ModelInfer, shm_request(rng.standard_normal(
                            (1, 1, 32, 32), dtype=np.float32), "r"))]:
                    with pytest.raises(grpc.aio.AioRpcError) as info:
                        await call(request)
                    assert info.value.code() == grpc.StatusCode.PERMISSION_DENIED
                    assert info.value.details().startswith(peer_message)
                    assert info.value.details().endswith(" is not a loopback address")
                x = rng.standard_normal((1, 1, 32, 32), dtype=np.float32)
                assert logits_of(await s.ModelInfer(infer_request(x))).shape == (1, 10)
            status = await stub(local).SystemSharedMemoryStatus(
                pb.SystemSharedMemoryStatusRequest())
            assert list(status.regions) == ["r"]

    run(main())


def test_a_region_truncated_while_requests_run_never_kills_the_server(
        artifacts: dict[str, Path], segment: Any) -> None:
    """Before: the input reached ONNX Runtime as a view of the mapping and the output was written
    into it, so a client truncating its object mid-request killed the server with SIGBUS. A
    thread here truncates and restores the object as fast as it can while requests keep using
    it: each is answered, OK or INVALID_ARGUMENT, and the server (a process of its own, so that a
    crash fails this test rather than ending the run) lives on."""
    x = np.ones((8, 1, 32, 32), np.float32)
    with CliServer(str(artifacts["lenet5"]), "--allow-shared-memory") as server:
        with grpc.insecure_channel(server.address) as ch:
            s = stub(ch)
            s.SystemSharedMemoryRegister(pb.SystemSharedMemoryRegisterRequest(
                name="in", key=key(segment), byte_size=x.nbytes), timeout=30)
            s.SystemSharedMemoryRegister(pb.SystemSharedMemoryRegisterRequest(
                name="out", key=key(segment), offset=x.nbytes, byte_size=320), timeout=30)
            fd = os.open(SHM_ROOT / segment.name, os.O_RDWR)
            stop = threading.Event()

            def truncate() -> None:
                while not stop.is_set():
                    os.ftruncate(fd, 0)
                    os.ftruncate(fd, 1 << 16)

            codes: collections.Counter[grpc.StatusCode] = collections.Counter()
            thread = threading.Thread(target=truncate)
            thread.start()
            try:
                end = time.monotonic() + 3
                while time.monotonic() < end:
                    try:
                        s.ModelInfer(shm_request(x, "in", "out"), timeout=10)
                        codes[grpc.StatusCode.OK] += 1
                    except grpc.RpcError as exc:
                        codes[exc.code()] += 1
                        assert exc.code() == BAD, exc.details()
                        assert re.fullmatch(
                            r"(input 'input': shared-memory region 'in' gave \d+ of 32768 bytes "
                            r"at offset 0|output 'logits': shared-memory region 'out' \(key "
                            r"'/\w+'\): the object holds \d+ bytes now, fewer than the output "
                            r"needs \(33088\)).*truncated after registering", exc.details())
            finally:
                stop.set()
                thread.join()
                os.close(fd)
            assert codes[BAD] > 0 and sum(codes.values()) > 20, codes
            assert s.ServerLive(pb.ServerLiveRequest(), timeout=10).live
        assert server.proc.poll() is None, server.output()


def run(coro: Any) -> Any:
    return asyncio.run(coro)
