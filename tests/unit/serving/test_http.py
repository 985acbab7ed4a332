"""The v2 REST endpoint (serving/http.py) on a real server: tritonclient.http works unchanged and
its answers equal gRPC's and in-process ONNX Runtime's; every malformed or hostile request gets its
HTTP status and a {"error": ...} body naming the bad value; drain and limits hold as on gRPC."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import gc
import http.client
import io
import json
import re
import shutil
import struct
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest
from PIL import Image

from cnnctl.protos import grpc_service_pb2 as pb
from cnnctl.serving.http import (
    LINGER_S,
    InferParser,
    InferRenderer,
    parse_infer,
    render_infer,
)
from cnnctl.serving.server import ServerThread
from tests.support.serving import config_for, infer_request, logits_of, stub

httpclient = pytest.importorskip("tritonclient.http")
from tritonclient.utils import InferenceServerException  # noqa: E402


@pytest.fixture(scope="module")
def server(artifacts: dict[str, Path]) -> Iterator[ServerThread]:
    with ServerThread(config_for(artifacts["lenet5"], artifacts["lenet5-v2"],
                                 max_message_mb=1)) as running:
        yield running


@pytest.fixture(scope="module")
def url(server: ServerThread) -> str:
    return f"127.0.0.1:{server.server.http_port}"


@contextlib.contextmanager
def triton_client(url: str) -> Iterator[Any]:
    client = httpclient.InferenceServerClient(url)
    try:
        yield client
    finally:
        client.close()
        # It sits in reference cycles; collected later, in the server's thread, its __del__
        # would close it again and gevent refuses a hub used from another thread.
        del client
        gc.collect()


@pytest.fixture
def triton(url: str) -> Iterator[Any]:
    with triton_client(url) as client:
        yield client


def call(url: str, method: str, path: str, body: bytes | str | None = None,
         headers: dict[str, str] | None = None) -> tuple[int, dict[str, str], bytes]:
    host, port = url.split(":")
    conn = http.client.HTTPConnection(host, int(port), timeout=30)
    try:
        conn.request(method, path, body=body, headers=headers or {})
        answer = conn.getresponse()
        return answer.status, dict(answer.getheaders()), answer.read()
    finally:
        conn.close()


def grpc_logits(server: ServerThread, x: np.ndarray, model: str = "lenet5",
                version: str = "") -> np.ndarray:
    with grpc.insecure_channel(server.address) as channel:
        return logits_of(stub(channel).ModelInfer(infer_request(x, model, version)))


def png(pixels: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(pixels, "L").save(buf, format="PNG")
    return buf.getvalue()


def test_tritonclient_http_health_metadata_config_index(triton: Any) -> None:
    assert triton.is_server_live() and triton.is_server_ready()
    assert triton.is_model_ready("lenet5") and triton.is_model_ready("lenet5", "2")
    assert not triton.is_model_ready("nope")
    meta = triton.get_server_metadata()
    assert meta["name"] == "cnnctl" and "binary_tensor_data" in meta["extensions"]
    model = triton.get_model_metadata("lenet5", "1")
    assert model["inputs"] == [{"name": "input", "datatype": "FP32", "shape": [-1, 1, 32, 32]}]
    assert model["outputs"][0]["shape"] == [-1, 10]
    config = triton.get_model_config("lenet5")
    assert config["max_batch_size"] == 64 and config["input"][0]["dims"] == [1, 32, 32]
    index = triton.get_model_repository_index()
    assert {(m["name"], m["version"], m["state"]) for m in index} == {
        ("lenet5", "1", "READY"), ("lenet5", "2", "READY")}
    with pytest.raises(InferenceServerException) as info:
        triton.get_model_metadata("lenet6")
    assert info.value.status() == "404" and "unknown model 'lenet6'" in info.value.message()


@pytest.mark.parametrize("binary_in,binary_out", [(True, True), (False, False), (True, False)])
def test_tritonclient_http_infer_equals_grpc_and_onnxruntime(
        server: ServerThread, triton: Any, reference: Any, rng: np.random.Generator,
        binary_in: bool, binary_out: bool) -> None:
    for n, version, key in ((1, "1", "lenet5"), (5, "2", "lenet5-v2")):
        x = rng.standard_normal((n, 1, 32, 32), dtype=np.float32)
        tensor = httpclient.InferInput("input", list(x.shape), "FP32")
        tensor.set_data_from_numpy(x, binary_data=binary_in)
        out = httpclient.InferRequestedOutput("logits", binary_data=binary_out)
        result = triton.infer("lenet5", [tensor], model_version=version, outputs=[out],
                              request_id="r7")
        got = result.as_numpy("logits")
        assert result.get_response()["id"] == "r7"
        assert got.shape == (n, 10)
        np.testing.assert_array_equal(got, grpc_logits(server, x, version=version))
        np.testing.assert_allclose(got, reference(x, key), rtol=1e-5, atol=1e-5)


def test_tritonclient_http_statistics_count_http_requests(triton: Any,
                                                          rng: np.random.Generator) -> None:
    def count() -> int:
        stats = triton.get_inference_statistics("lenet5", "1")["model_stats"]
        return stats[0]["inference_stats"]["success"]["count"]

    before = count()
    x = rng.standard_normal((2, 1, 32, 32), dtype=np.float32)
    tensor = httpclient.InferInput("input", [2, 1, 32, 32], "FP32")
    tensor.set_data_from_numpy(x)
    triton.infer("lenet5", [tensor], model_version="1")
    assert count() == before + 1
    assert isinstance(triton.get_inference_statistics()["model_stats"], list)


def test_images_as_binary_bytes_and_as_base64_json(server: ServerThread, url: str,
                                                   triton: Any, reference: Any,
                                                   rng: np.random.Generator) -> None:
    pixels = [rng.integers(0, 256, (28, 28), dtype=np.uint8) for _ in range(2)]
    images = [png(p) for p in pixels]
    with grpc.insecure_channel(server.address) as channel:
        req = infer_request(np.zeros(0), datatype="BYTES")
        del req.inputs[:]
        del req.raw_input_contents[:]
        req.inputs.add(name="input", datatype="BYTES", shape=[2])
        req.raw_input_contents.append(b"".join(struct.pack("<I", len(b)) + b for b in images))
        expected = logits_of(stub(channel).ModelInfer(req))
    tensor = httpclient.InferInput("input", [2], "BYTES")
    tensor.set_data_from_numpy(np.array(images, dtype=np.object_))
    np.testing.assert_array_equal(triton.infer("lenet5", [tensor]).as_numpy("logits"), expected)
    body = {"inputs": [{"name": "input", "shape": [2], "datatype": "BYTES",
                        "parameters": {"content_type": "base64"},
                        "data": [base64.b64encode(b).decode() for b in images]}]}
    status, _, answer = call(url, "POST", "/v2/models/lenet5/infer", json.dumps(body))
    assert status == 200, answer
    out = json.loads(answer)["outputs"][0]
    np.testing.assert_allclose(np.array(out["data"], np.float32).reshape(out["shape"]), expected)


def test_health_routes_answer_with_the_status_alone(url: str) -> None:
    for path in ("/v2/health/live", "/v2/health/ready", "/v2/models/lenet5/ready",
                 "/v2/models/lenet5/versions/2/ready"):
        status, _, body = call(url, "GET", path)
        assert (status, body) == (200, b""), path
    assert call(url, "GET", "/v2/models/nope/ready")[0] == 400


def test_metrics_on_the_http_port(url: str) -> None:
    status, headers, body = call(url, "GET", "/metrics")
    assert status == 200 and headers["Content-Type"].startswith("text/plain")
    assert b'cnnctl_requests_total{model="lenet5",version="1"}' in body


INFER = "/v2/models/lenet5/infer"


def _json_input(**changes: Any) -> str:
    tensor = {"name": "input", "shape": [1, 1, 32, 32], "datatype": "FP32", "data": [0.5] * 1024}
    tensor.update(changes)
    return json.dumps({"inputs": [tensor]})


BAD_REQUESTS = [
    # (method, path, body, headers, status, the error must contain)
    ("POST", INFER, "{not json", {}, 400, "not valid JSON"),
    ("POST", INFER, "[1, 2]", {}, 400, "must be a JSON object, got a list"),
    ("POST", INFER, '{"inputs": []}', {}, 400, "'inputs' must be a non-empty list"),
    ("POST", INFER, _json_input(datatype="INT32"), {}, 400,
     "datatype 'INT32' is not supported; allowed: FP32, FP16, BYTES"),
    ("POST", INFER, _json_input(shape=[1, 1, 28, 28], data=[0.0] * 784), {}, 400,
     "shape [1, 1, 28, 28] does not match the model's [-1, 1, 32, 32]"),
    ("POST", INFER, _json_input(data=[0.0] * 3), {}, 400,
     "'data' holds 3 values; shape [1, 1, 32, 32] needs 1024"),
    ("POST", INFER, _json_input(data=[[0.0, 1.0], [2.0]]), {}, 400, "this one is ragged"),
    ("POST", INFER, _json_input(data=["a"] * 1024), {}, 400, "'data' must hold numbers for FP32"),
    ("POST", INFER, _json_input(shape=[1, -1, 32, 32]), {}, 400,
     "'shape' must be a list of non-negative integers, got [1, -1, 32, 32]"),
    ("POST", INFER, _json_input(name="image"), {}, 400, "missing input 'input'"),
    ("POST", INFER, _json_input(parameters={"shared_memory_region": "r"}), {}, 400,
     "shared memory is served over gRPC only"),
    ("POST", "/v2/models/lenet6/infer", _json_input(), {}, 404, "unknown model 'lenet6'"),
    ("POST", "/v2/models/lenet5/versions/9/infer", _json_input(), {}, 404, "version '9'"),
    ("POST", INFER, _json_input(), {"Inference-Header-Content-Length": "99999"}, 400,
     "Inference-Header-Content-Length is '99999'"),
    ("POST", INFER, _json_input(), {"Inference-Timeout-Ms": "soon"}, 400,
     "Inference-Timeout-Ms must be a positive number of milliseconds, got 'soon'"),
    ("POST", INFER, _json_input(), {"Inference-Timeout-Ms": "0.000001"}, 504, "deadline passed"),
    ("POST", INFER, json.dumps({"parameters": {"timeout": -5}, "inputs": json.loads(
        _json_input())["inputs"]}), {}, 400, "parameter 'timeout' must be a positive integer"),
    ("POST", INFER, "x" * (1 << 21), {}, 413, "over --max-message-mb 1"),
    ("POST", "/v2/repository/models/lenet5/load", "", {}, 400,
     "model load requests need --model-control-mode explicit; this server runs with "
     "--model-control-mode none"),
    ("POST", "/v2/repository/models/lenet5/unload", "", {}, 400,
     "model unload requests need --model-control-mode explicit"),
    ("POST", "/v2/repository/models/lenet5/load", '{"parameters": {"config": "{}"}}', {}, 400,
     "parameters ['config'] are not supported"),
    ("POST", "/v2/repository/index", "[]", {}, 400, "the request body must be a JSON object"),
    ("GET", "/v2/nothing", None, {}, 404, "Not Found: GET /v2/nothing"),
    ("GET", "/v2/models/lenet5/", None, {}, 404, "Not Found: GET /v2/models/lenet5/"),
    ("GET", "/v2/models//ready", None, {}, 404, "Not Found"),
    ("GET", "/v2/models/lenet5/versions/1/infer/x", None, {}, 404, "Not Found"),
    ("GET", "/v2/repository/models/lenet5/reload", None, {}, 404, "Not Found"),
    ("PUT", INFER, "{}", {}, 405, "Method Not Allowed: PUT /v2/models/lenet5/infer"),
    ("GET", "/v2/repository/index", None, {}, 405, "Method Not Allowed"),
]


@pytest.mark.parametrize("method,path,body,headers,status,message", BAD_REQUESTS,
                         ids=[f"{r[4]}-{r[5][:30]}" for r in BAD_REQUESTS])
def test_bad_requests_get_their_status_and_a_named_error(
        url: str, method: str, path: str, body: str | None, headers: dict[str, str],
        status: int, message: str) -> None:
    got, answer_headers, answer = call(url, method, path, body, headers)
    assert got == status, answer
    assert answer_headers["Content-Type"].startswith("application/json")
    assert message in json.loads(answer)["error"]


def _binary_body(header: dict[str, Any], data: bytes) -> tuple[bytes, dict[str, str]]:
    text = json.dumps(header).encode()
    return text + data, {"Inference-Header-Content-Length": str(len(text)),
                         "Content-Type": "application/octet-stream"}


def test_binary_sizes_are_checked_against_the_body(url: str) -> None:
    x = np.zeros((1, 1, 32, 32), np.float32).tobytes()
    tensor = {"name": "input", "shape": [1, 1, 32, 32], "datatype": "FP32",
              "parameters": {"binary_data_size": 4096}}
    body, headers = _binary_body({"inputs": [tensor]}, x[:100])
    status, _, answer = call(url, "POST", INFER, body, headers)
    assert status == 400 and "'binary_data_size' is 4096 but only 100 bytes" in answer.decode()
    body, headers = _binary_body({"inputs": [tensor]}, x + b"extra")
    status, _, answer = call(url, "POST", INFER, body, headers)
    assert status == 400 and "holds 4101 bytes after the JSON header" in answer.decode()
    tensor["parameters"] = {"binary_data_size": 400}
    body, headers = _binary_body({"inputs": [tensor]}, x[:400])
    status, _, answer = call(url, "POST", INFER, body, headers)
    assert status == 400 and "shape [1, 1, 32, 32] of FP32 needs 4096" in answer.decode()
    # and the good one, with its output as binary
    tensor["parameters"] = {"binary_data_size": 4096}
    body, headers = _binary_body({"inputs": [tensor], "parameters": {"binary_data_output": True}},
                                 x)
    status, answer_headers, answer = call(url, "POST", INFER, body, headers)
    assert status == 200
    n = int(answer_headers["Inference-Header-Content-Length"])
    out = json.loads(answer[:n])["outputs"][0]
    assert out["parameters"]["binary_data_size"] == 40 == len(answer) - n


def test_hostile_images_are_refused_over_http(url: str) -> None:
    from tests.unit.serving.test_hostile import png_header

    bomb = png_header(20000, 20000)
    tensor = {"name": "input", "shape": [1], "datatype": "BYTES",
              "parameters": {"binary_data_size": 4 + len(bomb)}}
    body, headers = _binary_body({"inputs": [tensor]}, struct.pack("<I", len(bomb)) + bomb)
    status, _, answer = call(url, "POST", INFER, body, headers)
    assert status == 400 and "element 0" in json.loads(answer)["error"]
    assert "pixels" in json.loads(answer)["error"]
    tensor = {"name": "input", "shape": [65], "datatype": "BYTES", "data": ["x"] * 65}
    status, _, answer = call(url, "POST", INFER, json.dumps({"inputs": [tensor]}))
    assert status == 400 and "over the max batch size 64" in json.loads(answer)["error"]


def test_full_and_draining_are_429_and_503(server: ServerThread, url: str) -> None:
    servicer = server.server.servicer

    def on_loop(fn: Any) -> Any:
        async def run() -> Any:
            return fn()
        return asyncio.run_coroutine_threadsafe(run(), server.loop).result(10)

    on_loop(lambda: setattr(servicer, "pending_bytes", servicer._max_pending))
    try:
        status, _, answer = call(url, "POST", INFER, _json_input())
        assert status == 429 and "--max-pending-mb" in json.loads(answer)["error"]
    finally:
        on_loop(lambda: setattr(servicer, "pending_bytes", 0))
    on_loop(lambda: setattr(servicer, "draining", True))
    try:
        assert call(url, "GET", "/v2/health/ready")[0] == 400
        assert call(url, "GET", "/v2/models/lenet5/ready")[0] == 400
        assert call(url, "GET", "/v2/health/live")[0] == 200
        on_loop(lambda: setattr(servicer, "accepting", False))
        status, _, answer = call(url, "POST", INFER, _json_input())
        assert status == 503 and "shutting down" in json.loads(answer)["error"]
    finally:
        on_loop(lambda: (setattr(servicer, "draining", False),
                         setattr(servicer, "accepting", True)))
    assert call(url, "POST", INFER, _json_input())[0] == 200


def test_stop_closes_the_http_port(artifacts: dict[str, Path]) -> None:
    running = ServerThread(config_for(artifacts["lenet5"]))
    url = f"127.0.0.1:{running.server.http_port}"
    assert call(url, "GET", "/v2/health/live")[0] == 200
    running.stop()
    with pytest.raises(ConnectionRefusedError):
        call(url, "GET", "/v2/health/live")


def test_no_http_and_a_busy_port(artifacts: dict[str, Path]) -> None:
    from cnnctl.errors import UsageError

    with ServerThread(config_for(artifacts["lenet5"], http_port=None)) as running:
        assert running.server.http is None and running.server.http_port is None
        with pytest.raises(UsageError, match=f"cannot listen on 127.0.0.1:{running.port} "
                                             r"\(HTTP\).*--http-port"):
            ServerThread(config_for(artifacts["lenet5"], http_port=running.port))


def test_parse_infer_names_each_bad_field() -> None:
    def error(doc: Any) -> str:
        with pytest.raises(Exception) as info:
            parse_infer(json.dumps(doc).encode(), None, "m", "")
        return str(info.value)

    good = {"name": "input", "shape": [1], "datatype": "FP32", "data": [1.0]}
    assert "'id' must be a string, got a number" in error({"id": 7, "inputs": [good]})
    assert "parameter 'p' must be a string, number or boolean, got a list" in error(
        {"parameters": {"p": [1]}, "inputs": [good]})
    assert "'binary_data_output' must be true or false" in error(
        {"parameters": {"binary_data_output": "yes"}, "inputs": [good]})
    assert "output 'logits': parameter 'classification' is not supported" in error(
        {"inputs": [good], "outputs": [{"name": "logits", "parameters": {"classification": 3}}]})
    assert "has both 'data' and 'binary_data_size'" in error(
        {"inputs": [{**good, "parameters": {"binary_data_size": 4}}]})
    assert "input 'input' has no data" in error({"inputs": [{k: v for k, v in good.items()
                                                             if k != "data"}]})
    request, plan = parse_infer(json.dumps({"id": "a", "parameters": {"timeout": 5, "x": 1.5},
                                            "inputs": [good]}).encode(), None, "m", "3")
    assert (request.model_name, request.model_version, request.id) == ("m", "3", "a")
    assert request.parameters["timeout"].int64_param == 5
    assert request.parameters["x"].double_param == 1.5
    assert np.frombuffer(request.raw_input_contents[0], "<f4").tolist() == [1.0]
    assert not plan.default_binary


def _doc_commands() -> list[tuple[str, str]]:
    """(command, expected output) for each `$ ` line of docs/serving.md's console blocks that
    talk to localhost:8000; ``...`` in an expected line matches anything."""
    text = (Path(__file__).resolve().parents[3] / "docs" / "serving.md").read_text()
    pairs: list[tuple[str, str]] = []
    for block in re.findall(r"```console\n(.*?)```", text, re.DOTALL):
        if "localhost:8000" not in block:
            continue
        for chunk in re.split(r"^\$ ", block, flags=re.MULTILINE)[1:]:
            command, _, expected = chunk.partition("\n")
            pairs.append((command, expected.rstrip("\n")))
    return pairs


@pytest.mark.skipif(shutil.which("curl") is None, reason="curl is not installed")
def test_the_curl_examples_in_the_docs(artifacts: dict[str, Path], tmp_path: Path,
                                       rng: np.random.Generator) -> None:
    commands = _doc_commands()
    assert len(commands) >= 5 and all("curl" in c for c, _ in commands)
    (tmp_path / "digit.png").write_bytes(png(rng.integers(0, 256, (28, 28), dtype=np.uint8)))
    # a fresh server: the statistics example counts the infers before it
    with ServerThread(config_for(artifacts["lenet5"])) as running:
        address = f"127.0.0.1:{running.server.http_port}"
        for command, expected in commands:
            done = subprocess.run(["bash", "-c", command.replace("localhost:8000", address)],
                                  capture_output=True, text=True, cwd=tmp_path, timeout=60)
            assert done.returncode == 0, (command, done.stderr)
            pattern = ".*".join(re.escape(part) for part in expected.split("..."))
            assert re.fullmatch(pattern, done.stdout.rstrip("\n"), re.DOTALL), (
                command, done.stdout)


def test_compressed_bodies_count_decompressed(url: str, triton: Any, server: ServerThread,
                                              rng: np.random.Generator) -> None:
    import gzip

    bomb = gzip.compress(b" " * (16 << 20))  # 16 KiB on the wire, 16 MiB decompressed
    status, _, answer = call(url, "POST", INFER, bomb, {"Content-Encoding": "gzip"})
    assert status == 413 and "over --max-message-mb 1" in json.loads(answer)["error"]
    x = rng.standard_normal((1, 1, 32, 32), dtype=np.float32)
    tensor = httpclient.InferInput("input", [1, 1, 32, 32], "FP32")
    tensor.set_data_from_numpy(x)
    got = triton.infer("lenet5", [tensor], model_version="1",
                       request_compression_algorithm="gzip").as_numpy("logits")
    np.testing.assert_array_equal(got, grpc_logits(server, x, version="1"))


def test_a_chunked_body_over_the_limit_is_cut_off(url: str) -> None:
    def chunks() -> Iterator[bytes]:
        for _ in range(20):
            yield b" " * (64 << 10)  # 1.25 MiB in all, no Content-Length

    host, port = url.split(":")
    conn = http.client.HTTPConnection(host, int(port), timeout=30)
    try:
        conn.request("POST", INFER, body=chunks(), encode_chunked=True)
        answer = conn.getresponse()
        assert answer.status == 413
        assert json.loads(answer.read())["error"] == (
            "request body is over --max-message-mb 1 (1048576 bytes)")
    finally:
        conn.close()


def test_explicit_model_control_over_http(tmp_path: Path, artifacts: dict[str, Path],
                                          reference: Any, rng: np.random.Generator) -> None:
    repo = tmp_path / "repo"
    shutil.copytree(artifacts["lenet5"], repo / "lenet5" / "1")
    config = config_for(repository=str(repo), model_control_mode="explicit")
    with ServerThread(config) as running:
        url = f"127.0.0.1:{running.server.http_port}"
        with triton_client(url) as client:
            assert client.get_model_repository_index() == [
                {"name": "lenet5", "version": "", "state": "UNAVAILABLE",
                 "reason": "not loaded"}]
            client.load_model("lenet5")
            assert client.is_model_ready("lenet5")
            x = rng.standard_normal((2, 1, 32, 32), dtype=np.float32)
            tensor = httpclient.InferInput("input", [2, 1, 32, 32], "FP32")
            tensor.set_data_from_numpy(x)
            np.testing.assert_allclose(client.infer("lenet5", [tensor]).as_numpy("logits"),
                                       reference(x), rtol=1e-5, atol=1e-5)
            client.unload_model("lenet5")
            assert not client.is_model_ready("lenet5")
            with pytest.raises(InferenceServerException) as info:
                client.infer("lenet5", [tensor])
            assert info.value.status() == "503"
            assert "model 'lenet5' is not ready: version 1 UNAVAILABLE: unloaded" in (
                info.value.message())


def test_routes_head_and_allow(url: str) -> None:
    """HEAD answers as GET without a body; a wrong method is told the ones allowed."""
    status, headers, body = call(url, "HEAD", "/v2/models/lenet5/versions/1")
    assert status == 200 and body == b""
    status, headers, _ = call(url, "GET", INFER)
    assert status == 405 and headers["Allow"] == "POST"
    status, headers, _ = call(url, "DELETE", "/v2/health/ready")
    assert status == 405 and headers["Allow"] == "GET,HEAD"
    assert call(url, "GET", "/v2/models/stats")[0] == 200  # the fixed route, not a model


def _with_binary(header: dict[str, Any], *chunks: bytes) -> tuple[bytes, str]:
    head = json.dumps(header).encode()
    return head + b"".join(chunks), str(len(head))


def test_parser_remembers_binary_headers_and_checks_each_body() -> None:
    header = {"inputs": [{"name": "input", "shape": [1, 2], "datatype": "FP32",
                          "parameters": {"binary_data_size": 8}}],
              "outputs": [{"name": "logits", "parameters": {"binary_data": True}}]}
    parser = InferParser()
    for value in (1.0, 2.0, 3.0):  # the first parses, the others come from the cache
        body, length = _with_binary(header, np.full(2, value, "<f4").tobytes())
        got, plan = parser.parse(body, length, "m", "2")
        want, want_plan = parse_infer(body, length, "m", "2")
        assert got == want and plan == want_plan and plan.is_binary("logits")
        assert np.frombuffer(got.raw_input_contents[0], "<f4").tolist() == [value, value]
    assert len(parser._parsed) == 1
    # the same header with a body of another length: refused as parse_infer refuses it
    body, length = _with_binary(header, bytes(12))
    with pytest.raises(Exception, match="holds 12 bytes after the JSON header; the inputs' "
                                        "binary_data_size add up to 8"):
        parser.parse(body, length, "m", "2")
    # another model or version is another entry; an id, or JSON data, is never kept
    parser.parse(*_with_binary(header, bytes(8)), "m", "3")
    parser.parse(*_with_binary({**header, "id": "x"}, bytes(8)), "m", "3")
    json_body = json.dumps({"inputs": [{"name": "input", "shape": [1], "datatype": "FP32",
                                        "data": [1.0]}]}).encode()
    with pytest.raises(Exception, match="not valid JSON"):  # a header of 0 bytes
        parser.parse(json_body, "0", "m", "3")
    assert parser.parse(json_body, None, "m", "3")[0].raw_input_contents[0] == \
        np.ones(1, "<f4").tobytes()
    assert len(parser._parsed) == 2
    # a long header is parsed each time, never kept (a client cannot fill memory with them)
    long_header = {**header, "parameters": {"pad": "x" * 5000}}
    assert parser.parse(*_with_binary(long_header, bytes(8)), "m", "3")[0].parameters["pad"]
    assert len(parser._parsed) == 2


def test_renderer_remembers_binary_headers_only() -> None:
    def answer(shape: list[int], rid: str = "") -> pb.ModelInferResponse:
        response = pb.ModelInferResponse(model_name="m", model_version="1", id=rid)
        response.outputs.add(name="logits", datatype="FP32", shape=shape)
        response.raw_output_contents.append(np.arange(np.prod(shape), dtype="<f4").tobytes())
        return response

    renderer = InferRenderer()
    binary = parse_infer(json.dumps({"parameters": {"binary_data_output": True}, "inputs": [
        {"name": "input", "shape": [1], "datatype": "FP32", "data": [1.0]}]}).encode(),
        None, "m", "")[1]
    as_json = parse_infer(json.dumps({"inputs": [
        {"name": "input", "shape": [1], "datatype": "FP32", "data": [1.0]}]}).encode(),
        None, "m", "")[1]
    for response in (answer([1, 10]), answer([1, 10]), answer([2, 10]), answer([1, 10], "r")):
        for plan in (binary, as_json, binary):
            assert renderer.render(response, plan) == render_infer(response, plan)
    assert len(renderer._headers) == 2  # per shape, binary only


def test_a_body_that_does_not_arrive_is_refused_408(artifacts: dict[str, Path]) -> None:
    """A client that sends its headers and then part of its body (slowloris) is answered 408
    after --request-read-timeout-s and its connection closed; others are served meanwhile."""
    import socket
    import time

    with ServerThread(config_for(artifacts["lenet5"], request_read_timeout_s=1.0)) as running:
        port = running.server.http_port
        slow = socket.create_connection(("127.0.0.1", port), timeout=10)
        start = time.monotonic()
        slow.sendall(f"POST {INFER} HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                     f"Content-Length: 5000\r\n\r\n{{\"inputs\": [".encode())
        # meanwhile a good client is answered at once
        status, _, answer = call(f"127.0.0.1:{port}", "POST", INFER, _json_input())
        assert status == 200 and json.loads(answer)["outputs"][0]["shape"] == [1, 10]
        answer = b""
        while chunk := slow.recv(4096):  # the answer, then the server closes the connection
            answer += chunk
        waited = time.monotonic() - start
        slow.close()
        head, _, body = answer.partition(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 408"), answer
        assert "did not arrive in full within --request-read-timeout-s 1 s" in \
            json.loads(body)["error"]
        assert 0.9 < waited < 1.0 + LINGER_S + 2.0  # answered, then closed after lingering
