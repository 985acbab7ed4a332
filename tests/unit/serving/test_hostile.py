"""Hostile and broken clients (docs/security.md): each gets a fast, deliberate refusal with the
right code, holds a bounded share of the server, and the server goes on serving the others."""

from __future__ import annotations

import asyncio
import io
import logging
import struct
import threading
import zlib
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest
from PIL import Image

from cnnctl.protos import grpc_service_pb2 as pb
from cnnctl.serving import codec as codec_module
from tests.support.serving import config_for, infer_request, logits_of, running, stub

BAD = grpc.StatusCode.INVALID_ARGUMENT
FULL = grpc.StatusCode.RESOURCE_EXHAUSTED
GOOD = np.zeros((1, 1, 32, 32), dtype=np.float32)


def run(coro: Any) -> Any:
    return asyncio.run(coro)


async def expect_error(call: Any, request: Any, code: grpc.StatusCode, message: str,
                       **kwargs: Any) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await call(request, **kwargs)
    assert (info.value.code(), info.value.details()) == (code, message)


def _chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def png_header(width: int, height: int, depth: int = 8, color: int = 2,
               after: bytes = b"") -> bytes:
    """A PNG that declares width x height and holds next to no pixel data."""
    ihdr = struct.pack(">IIBBBBB", width, height, depth, color, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", ihdr) + after
            + _chunk(b"IDAT", zlib.compress(b"\0" * 64)) + _chunk(b"IEND", b""))


def png(size: int = 28) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.full((size, size), 200, np.uint8), "L").save(buf, format="PNG")
    return buf.getvalue()


def images_request(items: list[bytes], shape: list[int] | None = None,
                   timeout_us: int | None = None) -> pb.ModelInferRequest:
    req = pb.ModelInferRequest(model_name="lenet5")
    req.inputs.add(name="input", datatype="BYTES", shape=shape or [len(items)])
    req.raw_input_contents.append(b"".join(struct.pack("<I", len(b)) + b for b in items))
    if timeout_us is not None:
        req.parameters["timeout"].int64_param = timeout_us
    return req


class Gate:
    """Blocks a patched function's callers until opened; counts the calls."""

    def __init__(self) -> None:
        self.opened = threading.Event()
        self.calls = 0

    def wrap(self, fn: Any) -> Any:
        def blocked(*args: Any, **kwargs: Any) -> Any:
            self.calls += 1
            self.opened.wait(10)
            return fn(*args, **kwargs)

        return blocked


# ---------------------------------------------------------------- images
def test_huge_or_broken_images_are_refused_by_index(artifacts: dict[str, Path]) -> None:
    buf = io.BytesIO()
    Image.fromarray((np.arange(28 * 28).reshape(28, 28) * 83).astype(np.uint16)).save(buf, "PNG")
    sixteen_bit_broken = bytearray(buf.getvalue())
    sixteen_bit_broken[sixteen_bit_broken.index(b"IDAT") - 1] = 0  # a 0-length IDAT: Pillow
    # then reads pixel data as the next chunk's header, and raises SyntaxError from load()

    async def main() -> None:
        async with running(config_for(artifacts["lenet5"])) as (_, ch):
            s = stub(ch)
            # A few bytes declaring 13000x13000 or 20000x20000 RGB (0.5 or 1.2 GB decoded):
            # refused from the header, whether or not it is over Pillow's own limit.
            await expect_error(
                s.ModelInfer, images_request([png(), png_header(13000, 13000)]), BAD,
                "input 'input': element 1 declares 13000x13000 = 169000000 pixels; at most "
                "16777216 per image (--max-image-pixels)")
            await expect_error(
                s.ModelInfer, images_request([png(), png_header(20000, 20000)]), BAD,
                "input 'input': element 1 declares more than 178956970 pixels; at most "
                "16777216 per image (--max-image-pixels)")
            with pytest.raises(grpc.aio.AioRpcError) as info:
                await s.ModelInfer(images_request([png(), bytes(sixteen_bit_broken)]))
            assert info.value.code() == BAD
            assert info.value.details().startswith(
                f"input 'input': element 1 ({len(sixteen_bit_broken)} bytes) is not a decodable "
                f"PNG or JPEG image (SyntaxError: broken PNG file")
            # a GIF is not decoded at all
            gif = io.BytesIO()
            Image.new("L", (28, 28)).save(gif, format="GIF")
            await expect_error(s.ModelInfer, images_request([gif.getvalue()]), BAD,
                               f"input 'input': element 0 ({len(gif.getvalue())} bytes) is not "
                               f"a PNG or JPEG image; allowed: PNG, JPEG")
            assert len((await s.ModelInfer(images_request([png()]))).outputs) == 1

    run(main())


def test_pixel_limits_per_image_and_per_request(artifacts: dict[str, Path]) -> None:
    async def main() -> None:
        cfg = config_for(artifacts["lenet5"], max_image_pixels=40 * 40, max_request_pixels=2000)
        async with running(cfg) as (_, ch):
            s = stub(ch)
            assert (await s.ModelInfer(images_request([png(40)]))).outputs[0].shape == [1, 10]
            await expect_error(s.ModelInfer, images_request([png(28), png(41)]), BAD,
                               "input 'input': element 1 declares 41x41 = 1681 pixels; at most "
                               "1600 per image (--max-image-pixels)")
            await expect_error(s.ModelInfer, images_request([png(28), png(28), png(28)]), BAD,
                               "input 'input': elements declare 2352 pixels in all; at most 2000 "
                               "per request (--max-request-pixels)")

    run(main())


def test_a_large_jpeg_is_decoded_near_the_model_size(monkeypatch: pytest.MonkeyPatch) -> None:
    from cnnctl.export.image import to_tensor
    from cnnctl.export.manifest import ImageSpec

    buf = io.BytesIO()
    Image.new("RGB", (2000, 1600), (30, 60, 90)).save(buf, format="JPEG")
    decoded: list[tuple[int, int]] = []
    load = Image.Image.load

    def spy(self: Image.Image) -> Any:
        result = load(self)
        decoded.append(self.size)
        return result

    monkeypatch.setattr(Image.Image, "load", spy)
    spec = ImageSpec(channels=1, height=32, width=32, mean=[0.0], std=[1.0])
    x = to_tensor([buf.getvalue()], spec)
    assert decoded[0] == (250, 200)  # 1/8 scale, still at least 32x32
    np.testing.assert_allclose(x, x[0, 0, 0, 0], atol=2 / 255)  # a flat image stays flat


def test_more_images_than_the_max_batch_size_are_refused(artifacts: dict[str, Path]) -> None:
    async def main() -> None:
        async with running(config_for(artifacts["lenet5"], max_batch_size=8)) as (_, ch):
            s = stub(ch)
            message = ("input 'input': batch size 9 is over the max batch size 8; send at most 8 "
                       "images per request")
            await expect_error(s.ModelInfer, images_request([png()] * 9), BAD, message)
            await expect_error(s.ModelInfer, infer_request(np.zeros((9, 1, 32, 32), np.float32)),
                               BAD, message)
            # with batching off too: the cap is the model's, as Triton's max_batch_size
        cfg = config_for(artifacts["lenet5"], max_batch_size=8, enabled=False)
        async with running(cfg) as (_, ch):
            await expect_error(stub(ch).ModelInfer, images_request([png()] * 9), BAD, message)

    run(main())


def test_millions_of_empty_elements_stop_at_the_first_extra(artifacts: dict[str, Path],
                                                            monkeypatch: pytest.MonkeyPatch
                                                            ) -> None:
    on_loop: list[bool] = []
    split = codec_module.split_bytes_tensor

    def spy(*args: Any) -> Any:
        on_loop.append(threading.current_thread() is threading.main_thread())
        return split(*args)

    monkeypatch.setattr(codec_module, "split_bytes_tensor", spy)

    async def main() -> None:
        async with running(config_for(artifacts["lenet5"])) as (_, ch):
            req = pb.ModelInferRequest(model_name="lenet5")
            req.inputs.add(name="input", datatype="BYTES", shape=[1])
            req.raw_input_contents.append(b"\0\0\0\0" * 2_000_000)  # 7.6 MiB of empty elements
            await expect_error(stub(ch).ModelInfer, req, BAD,
                               "input 'input': shape [1] says 1 images but the contents hold more")
            typed = pb.ModelInferRequest(model_name="lenet5")
            typed.inputs.add(name="input", datatype="BYTES", shape=[1]).contents.bytes_contents.extend(
                [b""] * 200_000)
            await expect_error(stub(ch).ModelInfer, typed, BAD,
                               "input 'input': shape [1] says 1 images but the contents hold "
                               "200000")

    run(main())
    assert on_loop == [False]  # split in the preprocessing pool, not on the event loop


# ---------------------------------------------------------------- queue, deadlines, bytes
def test_image_requests_count_toward_the_queue_bound(artifacts: dict[str, Path],
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    gate = Gate()
    monkeypatch.setattr(codec_module, "to_tensor", gate.wrap(codec_module.to_tensor))

    async def main() -> None:
        async with running(config_for(artifacts["lenet5"], max_queue_size=2)) as (_, ch):
            s = stub(ch)
            held = [asyncio.ensure_future(s.ModelInfer(images_request([png()]))) for _ in range(2)]
            await asyncio.sleep(0.3)
            await expect_error(s.ModelInfer, images_request([png()]), FULL,
                               "model 'lenet5' queue is full (2 requests waiting); retry later "
                               "or raise --max-queue-size")
            await expect_error(s.ModelInfer, infer_request(GOOD), FULL,
                               "model 'lenet5' queue is full (2 requests waiting); retry later "
                               "or raise --max-queue-size")
            gate.opened.set()
            for call in held:
                assert (await call).outputs[0].shape == [1, 10]
            assert (await s.ModelInfer(images_request([png()]))).outputs[0].shape == [1, 10]

    run(main())


def test_an_image_request_past_its_deadline_is_not_decoded(artifacts: dict[str, Path],
                                                           monkeypatch: pytest.MonkeyPatch
                                                           ) -> None:
    gate = Gate()
    monkeypatch.setattr(codec_module, "to_tensor", gate.wrap(codec_module.to_tensor))
    decoded: list[int] = []
    from cnnctl.export import image

    decode = image._Encoded.decode

    def counting(self: Any, spec: Any) -> Any:
        decoded.append(1)
        return decode(self, spec)

    monkeypatch.setattr(image._Encoded, "decode", counting)

    async def main() -> None:
        # one preprocessing thread each held by a request without a deadline ...
        async with running(config_for(artifacts["lenet5"])) as (_, ch):
            s = stub(ch)
            held = [asyncio.ensure_future(s.ModelInfer(images_request([png()]))) for _ in range(2)]
            await asyncio.sleep(0.2)
            # ... so these wait for a thread, and their deadlines pass meanwhile
            late = asyncio.ensure_future(s.ModelInfer(images_request([png()]), timeout=0.2))
            param = asyncio.ensure_future(
                s.ModelInfer(images_request([png()] * 3, timeout_us=200_000)))
            await asyncio.sleep(0.5)
            gate.opened.set()
            for call in held:
                await call
            with pytest.raises(grpc.aio.AioRpcError) as info:
                await late
            assert info.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
            with pytest.raises(grpc.aio.AioRpcError) as info:
                await param
            assert (info.value.code(), info.value.details()) == (
                grpc.StatusCode.DEADLINE_EXCEEDED,
                "deadline passed before input 'input''s images were decoded; not computed")
            assert len(decoded) == 2  # only the two held ones
            await expect_error(s.ModelInfer, images_request([png()], timeout_us=-5), BAD,
                               "parameter 'timeout' must be a positive integer (microseconds), "
                               "got -5")

    run(main())


def test_bytes_held_by_unanswered_requests_are_bounded(artifacts: dict[str, Path],
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    gate = Gate()

    async def main() -> None:
        cfg = config_for(artifacts["lenet5"], max_pending_mb=1, inline_below_us=0,
                         inline_full_below_us=0, gather_max_ms=0)
        async with running(cfg) as (server, ch):
            model = server.repository.get("lenet5")
            monkeypatch.setattr(model.batcher, "_run", gate.wrap(model.batcher._run))
            s = stub(ch)
            # each counts its 256 KiB of data, its float32 input and output, and 1 KiB: 515 KiB
            x = np.zeros((64, 1, 32, 32), np.float32)
            held = asyncio.ensure_future(s.ModelInfer(infer_request(x)))
            await asyncio.sleep(0.3)
            await expect_error(s.ModelInfer, infer_request(x), FULL,
                               "the server holds 515 KiB of requests not yet answered; this "
                               "one's 515 KiB more would be over --max-pending-mb 1; retry later")
            gate.opened.set()
            assert (await held).outputs[0].shape == [64, 10]
            assert server.servicer.pending_bytes == 0
            assert (await s.ModelInfer(infer_request(x))).outputs[0].shape == [64, 10]

    run(main())


# ---------------------------------------------------------------- connections and streams
def test_concurrent_rpcs_are_bounded(artifacts: dict[str, Path]) -> None:
    async def main() -> None:
        async with running(config_for(artifacts["lenet5"], max_concurrent_rpcs=2)) as (_, ch):
            s = stub(ch)
            streams = [s.ModelStreamInfer() for _ in range(2)]
            for st in streams:  # both open and answering
                await st.write(infer_request(GOOD))
                await st.read()
            with pytest.raises(grpc.aio.AioRpcError) as info:
                await s.ModelInfer(infer_request(GOOD))
            assert info.value.code() == FULL
            for st in streams:
                await st.done_writing()
                assert await st.read() == grpc.aio.EOF
            await asyncio.sleep(0.1)
            assert (await s.ModelInfer(infer_request(GOOD))).outputs[0].shape == [1, 10]

    run(main())


def test_idle_connections_are_closed(artifacts: dict[str, Path]) -> None:
    async def main() -> None:
        async with running(config_for(artifacts["lenet5"], max_connection_idle_s=0.3)) as (_, ch):
            await stub(ch).ModelInfer(infer_request(GOOD))
            assert ch.get_state() == grpc.ChannelConnectivity.READY
            await asyncio.sleep(1.0)
            # the server sent GOAWAY; the channel reconnects on its next call
            assert ch.get_state() == grpc.ChannelConnectivity.IDLE
            await stub(ch).ModelInfer(infer_request(GOOD))

    run(main())


def test_a_stream_reads_no_further_than_its_inflight_bound(artifacts: dict[str, Path],
                                                           reference: Any) -> None:
    async def main() -> None:
        async with running(config_for(artifacts["lenet5"], max_stream_inflight=4)) as (server, ch):
            model = server.repository.get("lenet5")
            seen: list[int] = []
            infer = model.infer
            opened = asyncio.Event()

            async def counting(x: np.ndarray, deadline: float | None) -> np.ndarray:
                seen.append(len(x))
                await opened.wait()
                return await infer(x, deadline)

            model.infer = counting  # type: ignore[method-assign]
            call = stub(ch).ModelStreamInfer()
            xs = [np.full((1, 1, 32, 32), i, np.float32) for i in range(20)]

            async def send() -> None:
                for i, x in enumerate(xs):
                    await call.write(infer_request(x, rid=str(i)))
                await call.done_writing()

            sender = asyncio.ensure_future(send())
            await asyncio.sleep(0.5)  # no answer is sent meanwhile
            assert len(seen) == 4
            opened.set()
            answers = {}
            while (msg := await call.read()) != grpc.aio.EOF:
                answers[msg.infer_response.id] = logits_of(msg.infer_response)
            await sender
            assert len(answers) == 20
            for i, x in enumerate(xs):
                np.testing.assert_allclose(answers[str(i)], reference(x), rtol=1e-5, atol=1e-5)

    run(main())


def test_stream_requests_have_deadlines(artifacts: dict[str, Path],
                                        monkeypatch: pytest.MonkeyPatch) -> None:
    gate = Gate()

    async def main() -> None:
        cfg = config_for(artifacts["lenet5"], inline_below_us=0, inline_full_below_us=0,
                         gather_max_ms=0)
        async with running(cfg) as (server, ch):
            model = server.repository.get("lenet5")
            monkeypatch.setattr(model.batcher, "_run", gate.wrap(model.batcher._run))
            s = stub(ch)
            blocker = asyncio.ensure_future(s.ModelInfer(infer_request(GOOD)))
            await asyncio.sleep(0.2)
            call = s.ModelStreamInfer()
            req = infer_request(GOOD, rid="t")
            req.parameters["timeout"].int64_param = 100_000  # 0.1 s, as tritonclient sends it
            await call.write(req)
            await asyncio.sleep(0.4)
            gate.opened.set()
            answer = await call.read()
            assert answer.infer_response.id == "t"
            assert answer.error_message.startswith("deadline passed after ")
            await call.done_writing()
            await blocker
        gate.opened.clear()
        async with running(cfg) as (server, ch):
            model = server.repository.get("lenet5")
            monkeypatch.setattr(model.batcher, "_run", gate.wrap(model.batcher._run))
            s = stub(ch)
            blocker = asyncio.ensure_future(s.ModelInfer(infer_request(GOOD)))
            await asyncio.sleep(0.2)
            call = s.ModelStreamInfer(timeout=0.3)  # the stream's own deadline bounds it too
            await call.write(infer_request(GOOD, rid="s"))
            await asyncio.sleep(0.5)
            gate.opened.set()
            await blocker
            with pytest.raises(grpc.aio.AioRpcError) as info:
                await call.read()
            assert info.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
            await asyncio.sleep(0.2)
            stats = (await s.ModelStatistics(pb.ModelStatisticsRequest())).model_stats[0]
            assert stats.execution_count == 1  # the blocker only

    run(main())


# ---------------------------------------------------------------- log and message hygiene
def test_refusals_are_logged_rate_limited_escaped_and_clipped(
        artifacts: dict[str, Path], caplog: pytest.LogCaptureFixture) -> None:
    from cnnctl.serving import errors

    errors._log = errors._RateLimitedLog()  # a fresh window

    async def main() -> None:
        async with running(config_for(artifacts["lenet5"])) as (_, ch):
            s = stub(ch)
            for _ in range(30):
                with pytest.raises(grpc.aio.AioRpcError):
                    await s.ModelInfer(images_request([png_header(20000, 20000)]))
            name = "x\nFAKE LOG LINE " + "y" * 100_000
            with pytest.raises(grpc.aio.AioRpcError) as info:
                await s.ModelInfer(infer_request(GOOD, model=name))
            assert info.value.code() == grpc.StatusCode.NOT_FOUND
            assert len(info.value.details()) <= errors.MESSAGE_MAX + 1

    with caplog.at_level(logging.INFO, logger="cnnctl.serving.errors"):
        run(main())
    records = [r for r in caplog.records if r.name == "cnnctl.serving.errors"]
    assert len(records) == 1  # 31 refusals, one line in the window
    assert records[0].exc_info is None and "declares more than" in records[0].getMessage()
    errors._log._next[False] = 0.0
    errors.status_for(errors.NotFoundError("unknown model 'a\nb'"))
    line = [r for r in caplog.records if r.name == "cnnctl.serving.errors"][-1].getMessage()
    assert "\n" not in line and "a\\nb" in line and "29 INVALID_ARGUMENT, 2 NOT_FOUND" in line


def test_a_message_that_does_not_parse_is_invalid_argument(artifacts: dict[str, Path]) -> None:
    garbage = b"\xff\xff\xff\xff\x0f garbage"
    expected = ("malformed ModelInfer request: Error parsing message with type "
                "'inference.ModelInferRequest': Wire format was corrupt")

    async def main() -> None:
        async with running(config_for(artifacts["lenet5"])) as (_, ch):
            infer = ch.unary_unary("/inference.GRPCInferenceService/ModelInfer")
            await expect_error(infer, garbage, BAD, expected)
            ready = ch.unary_unary("/inference.GRPCInferenceService/ModelReady")
            with pytest.raises(grpc.aio.AioRpcError) as info:
                await ready(garbage)
            assert info.value.code() == BAD
            stream = ch.stream_stream("/inference.GRPCInferenceService/ModelStreamInfer",
                                      response_deserializer=pb.ModelStreamInferResponse.FromString)
            call = stream()
            await call.write(garbage)
            await call.write(infer_request(GOOD, rid="fine").SerializeToString())
            await call.done_writing()
            answers = [await call.read() for _ in range(2)]
            assert sorted(a.error_message for a in answers) == [
                "", "malformed ModelStreamInfer request: Error parsing message with type "
                "'inference.ModelInferRequest': Wire format was corrupt"]
            assert {a.infer_response.id for a in answers} == {"", "fine"}
            assert (await stub(ch).ModelInfer(infer_request(GOOD))).outputs[0].shape == [1, 10]

    run(main())
