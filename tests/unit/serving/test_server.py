"""A real server on 127.0.0.1:0, called through our stubs: answers equal in-process ONNX Runtime,
every bad input gets its exact status code and message, and the side services answer."""

from __future__ import annotations

import asyncio
import io
import struct
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from PIL import Image

from cnnctl.protos import grpc_service_pb2 as pb
from tests.support.serving import config_for, infer_request, logits_of, running, stub

BAD = grpc.StatusCode.INVALID_ARGUMENT


def run(coro: Any) -> Any:
    return asyncio.run(coro)


async def expect_error(call: Any, request: Any, code: grpc.StatusCode, message: str,
                       **kwargs: Any) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await call(request, **kwargs)
    assert (info.value.code(), info.value.details()) == (code, message)


def test_infer_equals_onnxruntime(artifacts: dict[str, Path], reference: Any,
                                  rng: np.random.Generator) -> None:
    async def main() -> None:
        async with running(config_for(artifacts["lenet5"], artifacts["lenet5-v2"])) as (_, ch):
            s = stub(ch)
            for n in (1, 5, 64):
                x = rng.standard_normal((n, 1, 32, 32), dtype=np.float32)
                resp = await s.ModelInfer(infer_request(x, rid=f"r{n}"))
                assert (resp.model_name, resp.model_version, resp.id) == ("lenet5", "2", f"r{n}")
                assert resp.outputs[0].name == "logits" and list(resp.outputs[0].shape) == [n, 10]
                np.testing.assert_allclose(logits_of(resp), reference(x, "lenet5-v2"), rtol=1e-5,
                                           atol=1e-5)
            x = rng.standard_normal((3, 1, 32, 32), dtype=np.float32)
            resp = await s.ModelInfer(infer_request(x, version="1"))
            np.testing.assert_allclose(logits_of(resp), reference(x), rtol=1e-5, atol=1e-5)
            # typed contents and FP16 raw contents are accepted too
            typed = pb.ModelInferRequest(model_name="lenet5", model_version="1")
            typed.inputs.add(name="input", datatype="FP32", shape=x.shape).contents.fp32_contents[:] = (
                x.ravel().tolist())
            np.testing.assert_allclose(logits_of(await s.ModelInfer(typed)), reference(x),
                                       rtol=1e-5, atol=1e-5)
            half = x.astype(np.float16)
            resp = await s.ModelInfer(infer_request(half, version="1", datatype="FP16"))
            np.testing.assert_allclose(logits_of(resp), reference(half.astype(np.float32)),
                                       rtol=1e-5, atol=1e-5)

    run(main())


def test_concurrent_requests_are_batched_and_each_gets_its_rows(
        artifacts: dict[str, Path], reference: Any, rng: np.random.Generator) -> None:
    async def main() -> None:
        cfg = config_for(artifacts["lenet5"], max_queue_delay_ms=50, max_batch_size=64)
        async with running(cfg) as (server, ch):
            s = stub(ch)
            xs = [rng.standard_normal((1 + i % 3, 1, 32, 32), dtype=np.float32) for i in range(12)]
            resps = await asyncio.gather(*(s.ModelInfer(infer_request(x)) for x in xs))
            for x, r in zip(xs, resps):
                np.testing.assert_allclose(logits_of(r), reference(x), rtol=1e-5, atol=1e-5)
            stats = (await s.ModelStatistics(pb.ModelStatisticsRequest(name="lenet5"))).model_stats[0]
            assert stats.inference_count == sum(x.shape[0] for x in xs)
            assert stats.execution_count < len(xs)  # merged
            assert stats.inference_stats.success.count == len(xs)
            inf = stats.inference_stats  # per request, as Triton counts (perf_analyzer checks)
            assert (inf.compute_input.count, inf.compute_infer.count, inf.compute_output.count,
                    inf.queue.count) == (len(xs),) * 4
            assert sum(b.compute_infer.count for b in stats.batch_stats) == stats.execution_count

    run(main())


def _png(array: np.ndarray, mode: str = "L") -> bytes:
    buf = io.BytesIO()
    Image.fromarray(array, mode).save(buf, format="PNG")
    return buf.getvalue()


def _bytes_tensor(items: list[bytes]) -> bytes:
    return b"".join(struct.pack("<I", len(b)) + b for b in items)


def test_raw_images_are_preprocessed_and_batched(artifacts: dict[str, Path], reference: Any,
                                                 rng: np.random.Generator) -> None:
    pixels = [rng.integers(0, 256, (28, 28), dtype=np.uint8) for _ in range(2)]
    # what the server must compute: resize to 32×32, scale to [0, 1], normalise (mnist mean/std)
    expected_input = np.stack([
        ((np.asarray(Image.fromarray(p, "L").resize((32, 32), Image.Resampling.BILINEAR),
                     dtype=np.float32) / 255.0 - 0.1307) / 0.3081)[None] for p in pixels])

    async def main() -> None:
        async with running(config_for(artifacts["lenet5"])) as (_, ch):
            s = stub(ch)
            req = pb.ModelInferRequest(model_name="lenet5")
            req.inputs.add(name="input", datatype="BYTES", shape=[2])
            req.raw_input_contents.append(_bytes_tensor([_png(p) for p in pixels]))
            resp = await s.ModelInfer(req)
            np.testing.assert_allclose(logits_of(resp), reference(expected_input), rtol=1e-4,
                                       atol=1e-4)
            # an RGB JPEG is converted to grayscale; typed bytes_contents work too
            req = pb.ModelInferRequest(model_name="lenet5")
            rgb = rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)
            buf = io.BytesIO()
            Image.fromarray(rgb, "RGB").save(buf, format="JPEG")
            req.inputs.add(name="input", datatype="BYTES", shape=[1, 1]).contents.bytes_contents.append(
                buf.getvalue())
            assert list((await s.ModelInfer(req)).outputs[0].shape) == [1, 10]

    run(main())


def _request(inputs: list[tuple[str, str, list[int]]], raw: list[bytes],
             model: str = "lenet5", version: str = "") -> pb.ModelInferRequest:
    req = pb.ModelInferRequest(model_name=model, model_version=version)
    for name, datatype, shape in inputs:
        req.inputs.add(name=name, datatype=datatype, shape=shape)
    req.raw_input_contents.extend(raw)
    return req


GOOD = np.zeros((2, 1, 32, 32), dtype=np.float32)

BAD_REQUESTS = [
    ("wrong shape", _request([("input", "FP32", [2, 3, 32, 32])], [np.zeros((2, 3, 32, 32),
     np.float32).tobytes()]), BAD, "input 'input': shape [2, 3, 32, 32] does not match the "
     "model's [-1, 1, 32, 32] (-1: any batch size from 1)"),
    ("empty batch", _request([("input", "FP32", [0, 1, 32, 32])], [b""]), BAD,
     "input 'input': shape [0, 1, 32, 32] does not match the model's [-1, 1, 32, 32] (-1: any "
     "batch size from 1)"),
    ("wrong rank", _request([("input", "FP32", [1, 32, 32])], [GOOD[0].tobytes()]), BAD,
     "input 'input': shape [1, 32, 32] does not match the model's [-1, 1, 32, 32] (-1: any batch "
     "size from 1)"),
    ("wrong datatype", _request([("input", "INT64", [2, 1, 32, 32])], [GOOD.tobytes() * 2]), BAD,
     "input 'input': datatype 'INT64' is not supported; allowed: FP32, FP16, BYTES (encoded "
     "PNG/JPEG images)"),
    ("wrong byte length", _request([("input", "FP32", [2, 1, 32, 32])], [GOOD.tobytes()[:-4]]),
     BAD, "input 'input': raw contents have 8188 bytes; shape [2, 1, 32, 32] of FP32 needs 8192"),
    ("missing input", _request([("image", "FP32", [2, 1, 32, 32])], [GOOD.tobytes()]), BAD,
     "missing input 'input'; model 'lenet5' takes exactly one input, 'input' (got 'image')"),
    ("no inputs", _request([], []), BAD,
     "missing input 'input'; model 'lenet5' takes exactly one input, 'input' (got no inputs)"),
    ("extra input", _request([("input", "FP32", [2, 1, 32, 32]), ("mask", "FP32", [2])],
     [GOOD.tobytes(), b"\0" * 8]), BAD,
     "unexpected input 'mask'; model 'lenet5' takes exactly one input, 'input'"),
    ("raw count", _request([("input", "FP32", [2, 1, 32, 32])], [GOOD.tobytes(), b"x"]), BAD,
     "raw_input_contents has 2 entries for 1 input(s); send one per input, in order"),
    ("no data", _request([("input", "FP32", [2, 1, 32, 32])], []), BAD,
     "input 'input' has no data: send raw_input_contents or contents"),
    ("unknown model", _request([("input", "FP32", [2, 1, 32, 32])], [GOOD.tobytes()],
     model="lenet6"), grpc.StatusCode.NOT_FOUND, "unknown model 'lenet6'; served models: lenet5"),
    ("unknown version", _request([("input", "FP32", [2, 1, 32, 32])], [GOOD.tobytes()],
     version="7"), grpc.StatusCode.NOT_FOUND,
     "model 'lenet5' has no version '7'; served versions: 1"),
    ("undecodable image", _request([("input", "BYTES", [1])], [_bytes_tensor([b"not a png"])]),
     BAD, "input 'input': element 0 (9 bytes) is not a PNG or JPEG image; allowed: PNG, "
     "JPEG"),
    ("truncated bytes tensor", _request([("input", "BYTES", [1])], [b"\x10\0\0\0abc"]), BAD,
     "input 'input': BYTES element 0 claims 16 bytes but only 3 remain"),
    ("image count", _request([("input", "BYTES", [2])], [_bytes_tensor([b"x"])]), BAD,
     "input 'input': shape [2] says 2 images but the contents hold 1"),
]


def test_every_bad_input_gets_its_code_and_message(artifacts: dict[str, Path]) -> None:
    async def main() -> None:
        async with running(config_for(artifacts["lenet5"])) as (server, ch):
            s = stub(ch)
            for _, request, code, message in BAD_REQUESTS:
                await expect_error(s.ModelInfer, request, code, message)
            req = infer_request(GOOD)
            req.outputs.add(name="probabilities")
            await expect_error(s.ModelInfer, req, BAD, "unknown output 'probabilities' requested; "
                               "model 'lenet5' has one output, 'logits'")
            for rpc, request in ((s.ModelMetadata, pb.ModelMetadataRequest(name="lenet6")),
                                 (s.ModelConfig, pb.ModelConfigRequest(name="lenet6")),
                                 (s.ModelStatistics, pb.ModelStatisticsRequest(name="lenet6"))):
                await expect_error(rpc, request, grpc.StatusCode.NOT_FOUND,
                                   "unknown model 'lenet6'; served models: lenet5")
            assert not (await s.ModelReady(pb.ModelReadyRequest(name="lenet6"))).ready
            # the server is still fine, and the failures were counted by code
            assert list((await s.ModelInfer(infer_request(GOOD))).outputs[0].shape) == [2, 10]
            stats = (await s.ModelStatistics(pb.ModelStatisticsRequest(name="lenet5"))).model_stats[0]
            # 15 listed + the unknown output, less the 2 NOT_FOUND (no model version to count them)
            assert stats.inference_stats.fail.count == 14
            assert stats.inference_stats.success.count == 1
            text = server.metrics.registry.get_sample_value(
                "cnnctl_request_failures_total",
                {"model": "lenet5", "version": "1", "code": "INVALID_ARGUMENT"})
            assert text == 14

    run(main())


def test_bad_request_never_fails_its_batch(artifacts: dict[str, Path], reference: Any,
                                           rng: np.random.Generator) -> None:
    async def main() -> None:
        async with running(config_for(artifacts["lenet5"], max_queue_delay_ms=50)) as (_, ch):
            s = stub(ch)
            goods = [rng.standard_normal((1, 1, 32, 32), dtype=np.float32) for _ in range(4)]
            calls = [s.ModelInfer(infer_request(x)) for x in goods]
            calls.insert(2, s.ModelInfer(BAD_REQUESTS[0][1]))
            calls.insert(4, s.ModelInfer(BAD_REQUESTS[12][1]))  # undecodable image
            results = await asyncio.gather(*calls, return_exceptions=True)
            errors = [r for r in results if isinstance(r, grpc.aio.AioRpcError)]
            assert [e.code() for e in errors] == [BAD, BAD]
            answers = [r for r in results if not isinstance(r, Exception)]
            for x, r in zip(goods, answers):
                np.testing.assert_allclose(logits_of(r), reference(x), rtol=1e-5, atol=1e-5)

    run(main())


def test_message_over_the_limit(artifacts: dict[str, Path]) -> None:
    async def main() -> None:
        async with running(config_for(artifacts["lenet5"], max_message_mb=1)) as (_, ch):
            big = np.zeros((300, 1, 32, 32), dtype=np.float32)  # 1.2 MB > 1 MiB
            req = infer_request(big)
            # grpc's own message, naming the size and the limit (--max-message-mb 1 = 1048576)
            await expect_error(stub(ch).ModelInfer, req, grpc.StatusCode.RESOURCE_EXHAUSTED,
                               f"SERVER: Received message larger than max ({req.ByteSize()} vs. "
                               f"1048576)")

    run(main())


def test_queue_full_and_deadline_in_queue(artifacts: dict[str, Path]) -> None:
    async def main() -> None:
        cfg = config_for(artifacts["lenet5"], max_queue_size=1, max_queue_delay_ms=300)
        async with running(cfg) as (server, ch):
            s = stub(ch)
            waiting = asyncio.ensure_future(s.ModelInfer(infer_request(GOOD)))
            await asyncio.sleep(0.1)  # it sits in the queue, waiting for company
            await expect_error(s.ModelInfer, infer_request(GOOD), grpc.StatusCode.RESOURCE_EXHAUSTED,
                               "model 'lenet5' queue is full (1 requests waiting); retry later or "
                               "raise --max-queue-size")
            await waiting
        cfg = config_for(artifacts["lenet5"], max_queue_delay_ms=300)
        async with running(cfg) as (server, ch):
            s = stub(ch)
            with pytest.raises(grpc.aio.AioRpcError) as info:
                await s.ModelInfer(infer_request(GOOD), timeout=0.1)
            assert info.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
            await asyncio.sleep(0.4)
            stats = (await s.ModelStatistics(pb.ModelStatisticsRequest())).model_stats[0]
            assert stats.execution_count == 0  # dropped from the queue, never computed

    run(main())


def test_metadata_config_health_reflection(artifacts: dict[str, Path]) -> None:
    async def main() -> None:
        async with running(config_for(artifacts["lenet5"], artifacts["lenet5-v2"])) as (_, ch):
            s = stub(ch)
            assert (await s.ServerLive(pb.ServerLiveRequest())).live
            assert (await s.ServerReady(pb.ServerReadyRequest())).ready
            assert (await s.ModelReady(pb.ModelReadyRequest(name="lenet5", version="1"))).ready
            meta = await s.ServerMetadata(pb.ServerMetadataRequest())
            assert meta.name == "cnnctl"
            assert "cnnctl:execution_provider=CPUExecutionProvider" in meta.extensions
            md = await s.ModelMetadata(pb.ModelMetadataRequest(name="lenet5"))
            assert list(md.versions) == ["1", "2"] and md.platform == "onnxruntime_onnx"
            assert (md.inputs[0].name, md.inputs[0].datatype, list(md.inputs[0].shape)) == (
                "input", "FP32", [-1, 1, 32, 32])
            assert (md.outputs[0].name, list(md.outputs[0].shape)) == ("logits", [-1, 10])
            cfg = (await s.ModelConfig(pb.ModelConfigRequest(name="lenet5"))).config
            assert (cfg.max_batch_size, list(cfg.input[0].dims), list(cfg.output[0].dims)) == (
                64, [1, 32, 32], [10])
            assert cfg.parameters["execution_provider"].string_value == "CPUExecutionProvider"
            assert cfg.dynamic_batching.max_queue_delay_microseconds == 0
            index = await s.RepositoryIndex(pb.RepositoryIndexRequest())
            assert [(m.name, m.version, m.state) for m in index.models] == [
                ("lenet5", "1", "READY"), ("lenet5", "2", "READY")]
            health = health_pb2_grpc.HealthStub(ch)
            for service in ("", "lenet5", "inference.GRPCInferenceService"):
                resp = await health.Check(health_pb2.HealthCheckRequest(service=service))
                assert resp.status == health_pb2.HealthCheckResponse.SERVING
            with pytest.raises(grpc.aio.AioRpcError) as info:
                await health.Check(health_pb2.HealthCheckRequest(service="lenet6"))
            assert info.value.code() == grpc.StatusCode.NOT_FOUND
            from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

            refl = reflection_pb2_grpc.ServerReflectionStub(ch)

            async def ask() -> Any:
                yield reflection_pb2.ServerReflectionRequest(list_services="")

            async for answer in refl.ServerReflectionInfo(ask()):
                names = {svc.name for svc in answer.list_services_response.service}
                assert {"inference.GRPCInferenceService", "grpc.health.v1.Health"} <= names

    run(main())


def test_stream_infer_answers_each_request(artifacts: dict[str, Path], reference: Any,
                                           rng: np.random.Generator) -> None:
    async def main() -> None:
        async with running(config_for(artifacts["lenet5"])) as (_, ch):
            xs = [rng.standard_normal((1, 1, 32, 32), dtype=np.float32) for _ in range(3)]

            async def requests() -> Any:
                for i, x in enumerate(xs):
                    yield infer_request(x, rid=str(i))
                yield _request([("input", "FP32", [1, 3, 32, 32])], [b""], model="lenet5")

            answers = [a async for a in stub(ch).ModelStreamInfer(requests())]
            assert len(answers) == 4
            errors = [a.error_message for a in answers if a.error_message]
            assert errors == ["input 'input': shape [1, 3, 32, 32] does not match the model's "
                              "[-1, 1, 32, 32] (-1: any batch size from 1)"]
            for a in answers:
                if not a.error_message:
                    x = xs[int(a.infer_response.id)]
                    np.testing.assert_allclose(logits_of(a.infer_response), reference(x),
                                               rtol=1e-5, atol=1e-5)

    run(main())


def test_stream_keeps_no_finished_request(artifacts: dict[str, Path]) -> None:
    """A long-lived stream holds on to the requests it has not answered, not to every one."""
    import gc

    async def main() -> None:
        async with running(config_for(artifacts["lenet5"])) as (_, ch):
            x = np.zeros((1, 1, 32, 32), dtype=np.float32)
            done = asyncio.Event()

            async def requests() -> Any:
                for i in range(200):
                    yield infer_request(x, rid=str(i))
                await done.wait()  # the stream stays open while we look

            def finished_tasks() -> int:
                gc.collect()
                return sum(type(o) is asyncio.Task and o.done() for o in gc.get_objects())

            before = finished_tasks()
            call = stub(ch).ModelStreamInfer(requests())
            for _ in range(200):
                answer = await call.read()
                assert not answer.error_message
            kept = finished_tasks() - before
            done.set()
            assert kept < 10, f"{kept} finished tasks kept by an open stream of 200 requests"
            assert await call.read() == grpc.aio.EOF

    run(main())


@pytest.mark.parametrize("client_done_sending", [False, True])
def test_shutdown_ends_open_streams_once_their_requests_are_answered(
        artifacts: dict[str, Path], client_done_sending: bool) -> None:
    """An open stream does not hold the shutdown for the grace period: the requests it has read
    are answered (here still queued, waiting for batch company), then it ends UNAVAILABLE -
    whether or not the client has said it sends no more."""
    import time

    from cnnctl.serving.server import create_server

    async def main() -> None:
        server, port = await create_server(config_for(artifacts["lenet5"],
                                                      max_queue_delay_ms=300))
        await server.start()
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as ch:
            x = np.zeros((1, 1, 32, 32), dtype=np.float32)
            hold = asyncio.Event()

            async def requests() -> Any:
                yield infer_request(x, rid="a")
                yield infer_request(x, rid="b")
                if not client_done_sending:
                    await hold.wait()  # the client keeps the stream open

            call = stub(ch).ModelStreamInfer(requests())
            await asyncio.sleep(0.1)  # both read, queued for up to 300 ms
            start = time.monotonic()
            stopping = asyncio.create_task(server.stop(grace=20, linger=0))
            ids = sorted([(await call.read()).infer_response.id for _ in range(2)])
            assert ids == ["a", "b"]
            with pytest.raises(grpc.aio.AioRpcError) as info:
                await call.read()
            assert info.value.code() == grpc.StatusCode.UNAVAILABLE
            assert info.value.details() == ("the server is shutting down; this stream takes no "
                                            "more requests")
            await stopping
            assert time.monotonic() - start < 5, "the open stream held the shutdown"
            hold.set()

    run(main())


def test_shutdown_gives_grpc_only_a_flush_once_everything_is_answered(
        artifacts: dict[str, Path]) -> None:
    """Once every request taken in is answered, gRPC gets FLUSH_S to send the last answers, not
    the rest of the grace period (a call gRPC never dispatched would hold it that long)."""
    from cnnctl.serving import server as server_module

    async def main() -> None:
        server, _ = await server_module.create_server(config_for(artifacts["lenet5"]))
        await server.start()
        graces: list[float] = []
        stop = server.grpc_server.stop

        async def recording_stop(grace: float | None) -> None:
            graces.append(grace)  # type: ignore[arg-type]
            await stop(grace)

        server.grpc_server.stop = recording_stop  # type: ignore[method-assign]
        await server.stop(grace=60, linger=0)
        assert graces == [server_module.FLUSH_S]

    run(main())


def test_unimplemented_triton_rpc(artifacts: dict[str, Path]) -> None:
    async def main() -> None:
        async with running(config_for(artifacts["lenet5"])) as (_, ch):
            call = ch.unary_unary("/inference.GRPCInferenceService/CudaSharedMemoryStatus",
                                  request_serializer=lambda b: b, response_deserializer=lambda b: b)
            with pytest.raises(grpc.aio.AioRpcError) as info:
                await call(b"")
            assert info.value.code() == grpc.StatusCode.UNIMPLEMENTED

    run(main())
