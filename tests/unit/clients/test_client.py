"""Client and AsyncClient against a real cnnctl server on 127.0.0.1:0: every image kind, top-k,
logits equal to in-process ONNX Runtime, metadata, readiness, chunking, TLS, and every error type
with its status code and the server's exact message."""

from __future__ import annotations

import asyncio
import dataclasses
import io
import socket
import time
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest
from PIL import Image

from cnnctl.clients import errors
from cnnctl.clients.client import AsyncClient, Client, parse_url
from cnnctl.clients.images import encode_png, expand
from cnnctl.errors import ShapeError, UsageError
from cnnctl.export.image import to_tensor
from cnnctl.export.manifest import load_manifest
from tests.support.serving import config_for

from .conftest import ServerThread


def _server_view(artifact: Path, images: np.ndarray) -> np.ndarray:
    """What the server computes from these uint8 digits: its own PNG decoding + normalisation."""
    spec = load_manifest(artifact).image
    return to_tensor([encode_png(x) for x in expand(list(images))], spec)


def _count_infers(client: Any) -> list[int]:
    calls = [0]
    original = client._call

    def counting(method: str, request: Any, deadline: float) -> Any:
        calls[0] += method == "ModelInfer"
        return original(method, request, deadline)

    client._call = counting
    return calls


def test_parse_url() -> None:
    assert parse_url("localhost:9000") == ("localhost:9000", False)
    assert parse_url("grpcs://example.org:443") == ("example.org:443", True)
    assert parse_url("grpc://h:1") == ("h:1", False)
    assert parse_url("myhost") == ("myhost:8001", False)
    with pytest.raises(UsageError, match=r"^server address 'http://h:1': unknown scheme"):
        parse_url("http://h:1")
    with pytest.raises(UsageError, match=r"^server address 'h:0' is not host:port"):
        parse_url("h:0")


def test_health_and_metadata(server: ServerThread, artifact: Path) -> None:
    with Client(server.address) as c:
        assert c.server_live() and c.server_ready()
        assert c.model_ready("lenet5") and not c.model_ready("nope")
        assert c.server_metadata().name == "cnnctl"
        info = c.model_info("lenet5")
        assert (info.input_name, info.input_shape, info.output_name) == (
            "input", (-1, 1, 32, 32), "logits")
        assert info.max_batch_size == 8 and info.versions == ("1",)
        manifest = load_manifest(artifact)
        assert info.class_names == tuple(manifest.class_names)  # from ModelConfig parameters
        assert info.image == manifest.image


def test_every_image_kind_gives_the_same_answer(server: ServerThread, artifact: Path,
                                                digits: np.ndarray, reference: Any,
                                                tmp_path: Path) -> None:
    d = digits[3]
    path = tmp_path / "d.png"
    Image.fromarray(d).save(path)
    kinds = {
        "path": path, "str": str(path), "bytes": path.read_bytes(), "pil": Image.fromarray(d),
        "uint8 HxW": d, "uint8 HxWx1": d[:, :, None], "uint8 1xHxW": d[None],
        "float HxW": d.astype(np.float32) / 255, "jpeg-ish RGB PIL": Image.fromarray(d).convert(
            "RGB"),
    }
    want = reference(_server_view(artifact, d[None]))[0]
    with Client(server.address) as c:
        for kind, image in kinds.items():
            [p] = c.predict("lenet5", image, return_logits=True)
            np.testing.assert_allclose(p.logits, want, rtol=1e-5, atol=1e-5, err_msg=kind)
            assert p.class_id == int(np.argmax(want)), kind


def test_top_k_probabilities_and_logits_match_onnxruntime(server: ServerThread, artifact: Path,
                                                          digits: np.ndarray,
                                                          reference: Any) -> None:
    want = reference(_server_view(artifact, digits))
    probs = np.exp(want - want.max(1, keepdims=True))
    probs /= probs.sum(1, keepdims=True)
    with Client(server.address) as c:
        results = c.predict("lenet5", digits[:, None], top_k=3, return_logits=True)
    assert len(results) == len(digits)
    for r, w, p in zip(results, want, probs):
        np.testing.assert_allclose(r.logits, w, rtol=1e-5, atol=1e-5)
        top = np.argsort(-p)[:3]
        assert list(r.class_ids) == list(top)
        assert r.labels == tuple(str(i) for i in top)
        np.testing.assert_allclose(r.probabilities, p[top], rtol=1e-5)


def test_infer_tensor_equals_onnxruntime(server: ServerThread, reference: Any) -> None:
    x = np.random.default_rng(0).standard_normal((5, 1, 32, 32), dtype=np.float32)
    with Client(server.address) as c:
        np.testing.assert_allclose(c.infer("lenet5", x), reference(x), rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(c.infer("lenet5", x[0]), reference(x[:1]), rtol=1e-5,
                                   atol=1e-5)
        with pytest.raises(ShapeError, match=r"^tensor of shape \[5, 1, 28, 28\] does not fit "
                                             r"model 'lenet5' input \[-1, 1, 32, 32\]"):
            c.infer("lenet5", np.zeros((5, 1, 28, 28), np.float32))


def test_client_side_preprocessing_matches_the_servers(server: ServerThread, artifact: Path,
                                                      digits: np.ndarray, tmp_path: Path) -> None:
    path = tmp_path / "d.png"
    Image.fromarray(digits[0]).save(path)
    images = [path, *digits[1:4], Image.fromarray(digits[4]).convert("RGB")]
    with Client(server.address) as c, Client(server.address, preprocess="client") as cc:
        info = cc.model_info("lenet5")
        assert info.image == load_manifest(artifact).image  # published in ModelConfig
        assert cc._predict_requests(info, images)[0].inputs[0].datatype == "FP32"
        on_server = c.predict("lenet5", images, return_logits=True)
        on_client = cc.predict("lenet5", images, return_logits=True)
    for a, b in zip(on_server, on_client):
        np.testing.assert_allclose(a.logits, b.logits, rtol=1e-4, atol=1e-4)
        assert a.labels == b.labels
    # A server that does not publish its preprocessing: client mode refuses, naming the field.
    bare = dataclasses.replace(info, image=None)
    with pytest.raises(UsageError, match=r"^model 'lenet5' does not publish its image "
                                         r"preprocessing \(ModelConfig parameter 'image'\); use "
                                         r"preprocess='server'$"):
        cc._predict_requests(bare, digits[0])


def test_large_inputs_are_split_to_the_servers_max_batch(server: ServerThread,
                                                         digits: np.ndarray) -> None:
    images = np.concatenate([digits] * 3)[:20]  # 20 images; the server batches at most 8
    with Client(server.address) as c:
        calls = _count_infers(c)
        chunked = c.predict("lenet5", list(images), return_logits=True)
        assert calls[0] == 3  # 8 + 8 + 4
        one_by_one = [c.predict("lenet5", x, return_logits=True)[0] for x in images[:4]]
    assert len(chunked) == 20
    for a, b in zip(chunked[:4], one_by_one):
        np.testing.assert_allclose(a.logits, b.logits, rtol=1e-5, atol=1e-5)


def test_large_tensors_are_split_to_the_message_size(artifact: Path, reference: Any) -> None:
    # 300 × 4 KiB of FP32 = 1.2 MB: over a 1 MiB message, so the client sends two requests.
    x = np.random.default_rng(1).standard_normal((300, 1, 32, 32), dtype=np.float32)
    with ServerThread(config_for(artifact, max_message_mb=1, max_batch_size=512)) as s:
        with Client(s.address, max_message_bytes=1 << 20) as c:
            calls = _count_infers(c)
            np.testing.assert_allclose(c.infer("lenet5", x), reference(x), rtol=1e-5, atol=1e-5)
            assert calls[0] == 2
        # A client that allows bigger messages than the server gets the server's refusal.
        with Client(s.address, max_message_bytes=16 << 20) as c:
            with pytest.raises(errors.ResourceExhausted) as info:
                c.infer("lenet5", x)
            assert info.value.code is grpc.StatusCode.RESOURCE_EXHAUSTED
            assert info.value.message.startswith("SERVER: Received message larger than max (")
            assert info.value.message.endswith(" vs. 1048576)")


def test_unknown_model_and_version_are_not_found(server: ServerThread) -> None:
    with Client(server.address) as c:
        with pytest.raises(errors.NotFound) as info:
            c.predict("lenet6", np.zeros((28, 28), np.uint8))
        assert info.value.code is grpc.StatusCode.NOT_FOUND
        assert str(info.value) == "unknown model 'lenet6'; served models: lenet5"
        assert info.value.attempts == 1  # never retried
        with pytest.raises(errors.NotFound, match=r"^model 'lenet5' has no version '7'; served "
                                                  r"versions: 1$"):
            c.model_info("lenet5", "7")


def test_bad_inputs_are_invalid_argument_with_the_servers_message(server: ServerThread) -> None:
    with Client(server.address) as c:
        with pytest.raises(errors.InvalidArgument) as info:
            c.predict("lenet5", b"not an image at all")
        assert str(info.value) == ("input 'input': element 0 (19 bytes) is not a PNG or JPEG "
                                   "image; allowed: PNG, JPEG")
        assert info.value.attempts == 1
        gif = io.BytesIO()
        Image.new("L", (28, 28)).save(gif, format="GIF")
        with pytest.raises(errors.InvalidArgument, match=r"^input 'input': element 0 \(\d+ "
                                                         r"bytes\) is not a PNG or JPEG image; "
                                                         r"allowed: PNG, JPEG$"):
            c.predict("lenet5", gif.getvalue())


def test_bad_shape_from_a_raw_request_is_invalid_argument(server: ServerThread) -> None:
    from cnnctl.clients import protocol

    async def main() -> None:
        async with AsyncClient(server.address) as c:
            info = await c.model_info("lenet5")
            req = protocol.tensor_request(info, np.zeros((2, 1, 28, 28), np.float32))
            with pytest.raises(errors.InvalidArgument) as exc:
                await c.infer_request(req)
            assert exc.value.code is grpc.StatusCode.INVALID_ARGUMENT
            assert str(exc.value) == ("input 'input': shape [2, 1, 28, 28] does not match the "
                                      "model's [-1, 1, 32, 32] (-1: any batch size from 1)")

    asyncio.run(main())


def test_serialized_fast_path_answers_and_errors_typed(server: ServerThread) -> None:
    """``infer_serialized`` (cnnctl bench's hot path): the same answer as the parsed call, and a
    server error still arrives as the typed exception with the server's message."""
    from cnnctl.clients import protocol
    from cnnctl.protos import grpc_service_pb2 as pb

    async def main() -> None:
        async with AsyncClient(server.address) as c:
            info = await c.model_info("lenet5")
            req = protocol.tensor_request(info, np.ones((3, 1, 32, 32), np.float32))
            raw = await c.infer_serialized(req.SerializeToString())
            parsed = await c.infer_request(req)
            np.testing.assert_array_equal(
                protocol.logits_of(pb.ModelInferResponse.FromString(raw), info),
                protocol.logits_of(parsed, info))
            req.model_name = "nope"
            with pytest.raises(errors.NotFound) as exc:
                await c.infer_serialized(req.SerializeToString())
            assert exc.value.code is grpc.StatusCode.NOT_FOUND and "nope" in str(exc.value)

    asyncio.run(main())


def test_stream_answers_in_order_and_survives_a_bad_request(server: ServerThread,
                                                             reference: Any) -> None:
    """``InferStream`` (cnnctl bench --streaming): answers equal to in-process ORT, one after
    another; a bad request raises with the server's message and the stream goes on."""
    from cnnctl.clients import protocol

    async def main() -> None:
        async with AsyncClient(server.address) as c:
            info = await c.model_info("lenet5")
            rng = np.random.default_rng(3)
            xs = [rng.standard_normal((n, 1, 32, 32), dtype=np.float32) for n in (1, 3, 2)]
            bad = protocol.tensor_request(info, np.zeros((1, 1, 28, 28), np.float32))
            stream = c.open_stream()
            for i, x in enumerate(xs):
                req = protocol.tensor_request(info, x)
                req.id = str(i)
                answer = await stream.send(req.SerializeToString())
                assert answer.id == str(i)
                np.testing.assert_allclose(protocol.logits_of(answer, info), reference(x),
                                           rtol=1e-5, atol=1e-5)
                if i == 0:
                    with pytest.raises(errors.ServerError) as exc:
                        await stream.send(bad.SerializeToString())
                    assert exc.value.code is grpc.StatusCode.UNKNOWN
                    assert str(exc.value) == (
                        "input 'input': shape [1, 1, 28, 28] does not match the model's "
                        "[-1, 1, 32, 32] (-1: any batch size from 1)")
            await stream.close()

    asyncio.run(main())


def test_stream_ended_by_a_shutdown_raises_unavailable(artifact: Path) -> None:
    """A stream the server ended (shutdown) raises Unavailable with the server's reason on the
    next send, not an asyncio error."""
    from cnnctl.clients import protocol

    server = ServerThread(config_for(artifact))

    async def main() -> None:
        async with AsyncClient(server.address) as c:
            info = await c.model_info("lenet5")
            payload = protocol.tensor_request(
                info, np.zeros((1, 1, 32, 32), np.float32)).SerializeToString()
            stream = c.open_stream()
            await stream.send(payload)
            await asyncio.get_running_loop().run_in_executor(None, server.stop)
            with pytest.raises(errors.Unavailable) as exc:
                await stream.send(payload)
            assert exc.value.code is grpc.StatusCode.UNAVAILABLE
            assert str(exc.value) == ("the server is shutting down; this stream takes no more "
                                      "requests")

    asyncio.run(main())


def test_deadline_and_queue_full(artifact: Path) -> None:
    # A 300 ms batching window: a lone request waits in the queue long enough to time out, and a
    # one-place queue is full while it waits.
    cfg = config_for(artifact, max_queue_size=1, max_queue_delay_ms=300)
    x = np.zeros((1, 1, 32, 32), np.float32)
    with ServerThread(cfg) as s:
        with Client(s.address) as c:
            c.model_info("lenet5")
            start = time.monotonic()
            with pytest.raises(errors.DeadlineExceeded) as info:
                c.infer("lenet5", x, timeout=0.1)
            assert info.value.code is grpc.StatusCode.DEADLINE_EXCEEDED
            assert str(info.value) == "Deadline Exceeded"
            assert time.monotonic() - start < 0.29  # not retried, not waited out
        time.sleep(0.4)  # the expired request leaves the queue when its batch window closes

        async def full() -> None:
            async with AsyncClient(s.address) as ac:
                await ac.model_info("lenet5")
                waiting = asyncio.ensure_future(ac.infer("lenet5", x))
                await asyncio.sleep(0.1)
                with pytest.raises(errors.ResourceExhausted) as exc:
                    await ac.infer("lenet5", x)
                assert str(exc.value) == ("model 'lenet5' queue is full (1 requests waiting); "
                                          "retry later or raise --max-queue-size")
                assert exc.value.attempts == 1
                assert (await waiting).shape == (1, 10)

        asyncio.run(full())


def _closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_server_down_is_unavailable_after_retries_with_backoff() -> None:
    port = _closed_port()
    with Client(f"127.0.0.1:{port}", retries=3, backoff=0.05, max_backoff=1.0) as c:
        start = time.monotonic()
        with pytest.raises(errors.Unavailable) as info:
            c.server_ready()
        elapsed = time.monotonic() - start
    assert info.value.attempts == 4
    assert info.value.code is grpc.StatusCode.UNAVAILABLE
    assert str(info.value).endswith("(gave up after 4 attempts)")
    assert elapsed >= 0.05 + 0.1 + 0.2  # three backoffs, doubling
    with Client(f"127.0.0.1:{port}", retries=0) as c:
        with pytest.raises(errors.Unavailable) as info:
            c.predict("lenet5", np.zeros((28, 28), np.uint8))
    assert info.value.attempts == 1 and "gave up" not in str(info.value)


def test_retries_never_outlive_the_deadline() -> None:
    with Client(f"127.0.0.1:{_closed_port()}", retries=50, backoff=0.1, max_backoff=0.1) as c:
        start = time.monotonic()
        with pytest.raises(errors.Unavailable) as info:
            c.server_live(timeout=0.5)
        assert time.monotonic() - start < 0.8
        assert 2 <= info.value.attempts <= 6


def test_tls(artifact: Path, tls_files: tuple[Path, Path], digits: np.ndarray) -> None:
    cert, key = tls_files
    with ServerThread(config_for(artifact, tls_cert=str(cert), tls_key=str(key))) as s:
        with Client(s.address, root_certificates=cert) as c:
            assert c.tls and c.server_ready()
            assert len(c.predict("lenet5", digits[:2][:, None])) == 2
        with Client(f"grpcs://{s.address}", root_certificates=cert.read_bytes(),
                    server_name="localhost") as c:
            assert c.server_live()
        # Without the root that signed it, the handshake fails: UNAVAILABLE, after its retries.
        with Client(s.address, tls=True, retries=1, backoff=0.01) as c:
            with pytest.raises(errors.Unavailable) as info:
                c.server_live(timeout=5)
            assert info.value.attempts == 2
        with pytest.raises(UsageError, match=r"^cannot read root certificates '/nonexistent.pem'"):
            Client(s.address, root_certificates="/nonexistent.pem")
        # cnnctl bench over TLS: the blocking level (1) and the asyncio one (2) both connect.
        from cnnctl.clients import bench

        rows = bench.run_grpc(bench.BenchConfig(
            server=s.address, model="lenet5", levels=(1, 2), duration_s=0.2, warmup_s=0.0,
            tls=True, root_certificates=str(cert), progress=False))
        assert [(r.concurrency, r.errors) for r in rows] == [(1, 0), (2, 0)]
        assert all(r.requests > 0 for r in rows)


def test_async_client_same_answers_and_concurrent_chunks(server: ServerThread,
                                                         digits: np.ndarray) -> None:
    images = list(np.concatenate([digits, digits, digits]))  # 24 images: three chunks of 8
    with Client(server.address) as c:
        want = c.predict("lenet5", images, top_k=2, return_logits=True)

    async def main() -> None:
        async with AsyncClient(server.address, max_in_flight=3) as ac:
            assert await ac.server_live() and await ac.server_ready()
            assert await ac.model_ready("lenet5")
            await ac.wait_until_ready(timeout=5)
            got, again = await asyncio.gather(
                ac.predict("lenet5", images, top_k=2, return_logits=True),
                ac.predict("lenet5", images[:1], top_k=2))
            assert [g.labels for g in got] == [w.labels for w in want]
            for g, w in zip(got, want):
                np.testing.assert_allclose(g.logits, w.logits, rtol=1e-5, atol=1e-5)
            assert again[0].labels == want[0].labels
            with pytest.raises(errors.NotFound, match="^unknown model 'x'; served models: lenet5$"):
                await ac.predict("x", images[:1])

    asyncio.run(main())


def test_bad_client_settings_name_the_value() -> None:
    for kwargs, message in [
        ({"timeout": 0}, "timeout must be positive seconds, got 0"),
        ({"retries": -1}, "retries must be 0 or more, got -1"),
        ({"preprocess": "gpu"}, "preprocess 'gpu' is not known; allowed: server, client"),
        ({"max_message_bytes": 10}, "max_message_bytes 10 is below the 1 MiB minimum"),
    ]:
        with pytest.raises(UsageError, match=f"^{message}$"):
            Client("127.0.0.1:1", **kwargs)


def test_labels_are_the_manifests_class_names(artifact: Path, tmp_path: Path,
                                               digits: np.ndarray) -> None:
    import json
    import shutil

    words = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]
    named = tmp_path / "named"
    shutil.copytree(artifact, named)
    doc = json.loads((named / "manifest.json").read_text())
    doc["class_names"] = words
    (named / "manifest.json").write_text(json.dumps(doc))
    with ServerThread(config_for(named)) as s, Client(s.address) as c:
        results = c.predict("lenet5", digits[:3][:, None], top_k=10, return_logits=True)
    for r in results:
        assert sorted(r.labels) == sorted(words)
        assert r.label == words[int(np.argmax(r.logits))]


def test_closing_a_client_ends_a_blocking_call_in_flight() -> None:
    """What bench's blocking level relies on: close() from another thread ends a call that sent
    no deadline, with a typed error, instead of leaving the caller blocked."""
    import threading
    import time
    from concurrent.futures import ThreadPoolExecutor

    import grpc

    from cnnctl.clients.client import Client
    from cnnctl.clients.errors import ClientError

    release = threading.Event()

    def never(request: bytes, context: grpc.ServicerContext) -> bytes:
        release.wait(10)
        return b""

    handler = grpc.method_handlers_generic_handler("inference.GRPCInferenceService", {
        "ModelInfer": grpc.unary_unary_rpc_method_handler(never)})
    server = grpc.server(ThreadPoolExecutor(2), handlers=[handler])
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    try:
        client = Client(f"127.0.0.1:{port}")
        threading.Timer(0.3, client.close).start()
        start = time.monotonic()
        with pytest.raises(ClientError) as info:
            client.infer_serialized(b"", timeout=None)
        assert time.monotonic() - start < 5
        assert info.value.code == grpc.StatusCode.CANCELLED
    finally:
        release.set()
        server.stop(0)
