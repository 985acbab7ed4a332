"""Triton's system shared-memory extension: the region registry on its own, then a real server
reading inputs from and writing outputs to POSIX shared memory, with every bad use answered by its
status code and a message that names it."""

from __future__ import annotations

import asyncio
import io
import os
import struct
import uuid
from collections.abc import Iterator
from multiprocessing import shared_memory
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest
from PIL import Image

from cnnctl.errors import AlreadyExistsError, NotFoundError, UsageError
from cnnctl.protos import grpc_service_pb2 as pb
from cnnctl.serving.shm import SHM_ROOT, SharedMemoryRegistry
from tests.support.serving import config_for, infer_request, logits_of, running, stub

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
def test_register_view_status_unregister(segment: Any) -> None:
    reg = SharedMemoryRegistry()
    reg.register("a", key(segment), 1024, 4096)
    segment.buf[1024 + 8:1024 + 12] = b"abcd"
    view = reg.view("a", 8, 4, tensor="input 'x'")
    assert bytes(view) == b"abcd"
    view[:] = b"wxyz"  # writable: outputs go back through it
    assert bytes(segment.buf[1032:1036]) == b"wxyz"
    del view
    assert [(r.name, r.key, r.offset, r.byte_size) for r in reg.status()] == [
        ("a", key(segment), 1024, 4096)]
    assert reg.status("a")[0].byte_size == 4096
    reg.unregister("a")
    assert reg.status() == []


def test_registry_errors_name_the_problem(segment: Any) -> None:
    reg = SharedMemoryRegistry()
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
    with pytest.raises(UsageError, match=r"input 'x': shared_memory_offset 90 \+ "
                                         r"shared_memory_byte_size 20 is beyond shared-memory "
                                         r"region 'a' \(100 bytes\)"):
        reg.view("a", 90, 20, tensor="input 'x'")
    with pytest.raises(UsageError, match=r"input 'x': shared-memory region 'zz' is not registered "
                                         r"\(registered: 'a'\)"):
        reg.view("zz", 0, 1, tensor="input 'x'")
    with pytest.raises(NotFoundError, match="region 'zz' is not registered"):
        reg.unregister("zz")
    with pytest.raises(NotFoundError, match="region 'zz' is not registered"):
        reg.status("zz")


def test_a_key_that_is_a_symlink_is_refused(tmp_path: Path) -> None:
    """The server maps the shared-memory object itself, never what a link in /dev/shm points to."""
    target = tmp_path / "elsewhere"
    target.write_bytes(b"\0" * 64)
    (tmp_path / "link").symlink_to(target)
    reg = SharedMemoryRegistry(root=tmp_path)
    with pytest.raises(UsageError, match="cannot open shared-memory key '/link': Too many levels "
                                         "of symbolic links"):
        reg.register("r", "/link", 0, 8)
    reg.register("r", "/elsewhere", 0, 8)  # the object itself is fine


def test_an_object_truncated_after_registering_is_refused_not_a_crash(tmp_path: Path) -> None:
    """Reading a mapping past the end of its truncated object would be SIGBUS: refused first."""
    (tmp_path / "obj").write_bytes(b"\1" * 4096)
    reg = SharedMemoryRegistry(root=tmp_path)
    reg.register("r", "/obj", 0, 4096)
    assert bytes(reg.view("r", 4000, 96, tensor="t")) == b"\1" * 96
    os.truncate(tmp_path / "obj", 1000)
    with pytest.raises(UsageError, match=r"t: shared-memory key '/obj' holds 1000 bytes now, "
                                         r"fewer than region 'r' needs \(4096\); it was truncated"):
        reg.view("r", 4000, 96, tensor="t")
    assert len(reg.view("r", 0, 1000, tensor="t")) == 1000  # what is still there is usable


def test_a_view_in_use_survives_unregister(segment: Any) -> None:
    reg = SharedMemoryRegistry()
    reg.register("a", key(segment), 0, 16)
    view = reg.view("a", 0, 16, tensor="input 'x'")
    reg.unregister("a")  # a request still computing on the view must not crash
    assert len(bytes(view)) == 16
    reg.unregister()  # all: none left, no error


def test_workers_share_registrations_through_a_directory(segment: Any, tmp_path: Path) -> None:
    a, b = SharedMemoryRegistry(tmp_path), SharedMemoryRegistry(tmp_path)
    a.register("r", key(segment), 0, 64)
    segment.buf[:4] = b"\x01\x02\x03\x04"
    assert bytes(b.view("r", 0, 4, tensor="t")) == b"\x01\x02\x03\x04"  # b maps it on first use
    assert [r.name for r in b.status()] == ["r"]
    with pytest.raises(AlreadyExistsError):
        b.register("r", key(segment), 0, 64)
    b.unregister("r")  # unregistered by another worker...
    with pytest.raises(UsageError, match="region 'r' is not registered"):
        a.view("r", 0, 4, tensor="t")  # ...is gone here too
    a.register("r", key(segment), 32, 32)  # re-registered elsewhere: b picks up the new offset
    segment.buf[32:36] = b"wxyz"
    assert bytes(b.view("r", 0, 4, tensor="t")) == b"wxyz"
    with pytest.raises(UsageError, match=r"beyond shared-memory region 'r' \(32 bytes\)"):
        b.view("r", 0, 64, tensor="t")
    a.close()
    b.close()


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


def run(coro: Any) -> Any:
    return asyncio.run(coro)
