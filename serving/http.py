"""The v2 REST endpoint (KServe's Open Inference Protocol over HTTP/1.1, Triton's port 8000).

aiohttp.web on the gRPC server's event loop, so that one process, one loop and one request core
serve both (docs/serving.md says why aiohttp). An infer request is turned into the same
``pb.ModelInferRequest`` the gRPC side receives and handed to ``InferenceServicer.infer``: the
limits, batching, image decoding, metrics and error table are the gRPC side's. The other routes call
the servicer's own gRPC handlers and write their answers as JSON, as Triton's HTTP frontend does.

Bodies are JSON, or (Triton's binary data extension) a JSON header of ``Inference-Header-Content-
Length`` bytes followed by the input tensors' bytes in the order of the inputs, each input saying
its size in ``parameters.binary_data_size``. Outputs go back as JSON ``data``, or as binary after
the JSON header when the request asks for it (``binary_data_output`` for all, an output's
``binary_data`` for one).
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import json
import math
import socket
import ssl
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import orjson
from aiohttp import web
from google.protobuf import json_format
from google.protobuf.descriptor import Descriptor, FieldDescriptor
from google.protobuf.message import Message

from cnnctl.errors import (
    MessageTooLargeError,
    NotEnabledError,
    OverloadedError,
    RequestTimeoutError,
    UsageError,
)
from cnnctl.protos import grpc_service_pb2 as pb
from cnnctl.serving.codec import ALLOWED, TENSOR_DTYPES
from cnnctl.serving.config import ServerConfig
from cnnctl.serving.errors import http_status_for
from cnnctl.serving.servicer import InferenceServicer

HEADER_LENGTH = "Inference-Header-Content-Length"
# A deadline for one request over HTTP, in ms (gRPC has its own; Triton's "timeout" request
# parameter, in µs, works on both).
TIMEOUT_HEADER = "Inference-Timeout-Ms"
JSON_TYPE = "application/json"
BINARY_TYPE = "application/octet-stream"
BINARY_SIZE = "binary_data_size"
BINARY_OUTPUT = "binary_data_output"  # request parameter: every output as binary
BINARY = "binary_data"  # output parameter: this output as binary
_SHM_KEYS = ("shared_memory_region", "shared_memory_byte_size", "shared_memory_offset")
_INT64 = (-(1 << 63), (1 << 63) - 1)
_SIZED = {name: dtype.itemsize for name, dtype in TENSOR_DTYPES.items()}
LINGER_S = 2.0  # after a 408 or 413: see HttpFrontend.start
_CACHE_MAX = 256  # parsed headers and written answer headers kept; beyond it, each is redone
_CACHED_HEADER_MAX = 4096  # bytes: a longer JSON header is parsed each time, never kept


@dataclass(frozen=True, slots=True)
class Plan:
    """How to write an infer answer: which outputs go as binary."""

    default_binary: bool  # the request's binary_data_output
    binary: tuple[tuple[str, bool], ...] = ()  # (output name, its own binary_data), where said

    def is_binary(self, output: str) -> bool:
        for name, flag in self.binary:
            if name == output:
                return flag
        return self.default_binary


@dataclass(frozen=True, slots=True)
class _Parsed:
    """A binary request's JSON header, parsed and checked: the request without its data."""

    template: pb.ModelInferRequest  # raw_input_contents empty
    sizes: tuple[int, ...]  # each input's binary_data_size, in order
    plan: Plan


class InferParser:
    """``parse_infer`` with its answers for binary requests remembered under their JSON header.

    A client sends the same header with every binary request (names, datatypes, shapes, sizes;
    only the bytes after it change), so a header seen before costs a dict lookup and a copy,
    as the codec does for gRPC's input descriptions. Headers with an ``id`` are not kept (it
    changes with every request), nor ones over _CACHED_HEADER_MAX bytes, nor more than
    _CACHE_MAX of them: what a client can make the cache hold is bounded."""

    def __init__(self) -> None:
        self._parsed: dict[tuple[str, str, bytes], _Parsed] = {}

    def parse(self, body: bytes, header_length: str | None, model: str,
              version: str) -> tuple[pb.ModelInferRequest, Plan]:
        if header_length is None or not header_length.isdigit():
            return parse_infer(body, header_length, model, version)
        n = int(header_length)
        if n > _CACHED_HEADER_MAX:
            return parse_infer(body, header_length, model, version)
        key = (model, version, body[:n])
        parsed = self._parsed.get(key)
        if parsed is None or len(body) - n != sum(parsed.sizes):
            request, plan = parse_infer(body, header_length, model, version)
            if parsed is None and len(self._parsed) < _CACHE_MAX:
                self._remember(key, request, plan)
            return request, plan
        request = pb.ModelInferRequest()
        request.CopyFrom(parsed.template)
        raws = request.raw_input_contents
        if len(parsed.sizes) == 1:
            raws.append(body[n:])
        else:
            offset = n
            for size in parsed.sizes:
                raws.append(body[offset:offset + size])
                offset += size
        return request, parsed.plan

    def _remember(self, key: tuple[str, str, bytes], request: pb.ModelInferRequest,
                  plan: Plan) -> None:
        """Keep a parsed header whose every input's data is binary, and that has no id."""
        raws = request.raw_input_contents
        if request.id or len(raws) != len(request.inputs):
            return
        template = pb.ModelInferRequest()
        template.CopyFrom(request)
        del template.raw_input_contents[:]
        self._parsed[key] = _Parsed(template, tuple(len(r) for r in raws), plan)


# -- request: JSON (+ binary) -> pb.ModelInferRequest
def parse_infer(body: bytes, header_length: str | None, model: str,
                version: str) -> tuple[pb.ModelInferRequest, Plan]:
    """An infer request's body → the gRPC request and how to write its answer; UsageError names
    what is wrong."""
    if header_length is None:
        header, binary = body, memoryview(b"")
    else:
        try:
            n = int(header_length)
        except ValueError:
            n = -1
        if not 0 <= n <= len(body):
            raise UsageError(f"{HEADER_LENGTH} is {header_length!r}; it must be the JSON "
                             f"header's length in bytes, from 0 to the body's {len(body)}")
        header, binary = body[:n], memoryview(body)[n:]
    try:
        doc = orjson.loads(header)
    except orjson.JSONDecodeError as exc:
        raise UsageError(f"the request body is not valid JSON: {exc}") from None
    if not isinstance(doc, dict):
        raise UsageError(f"the request body must be a JSON object, got {_kind(doc)}")
    request = pb.ModelInferRequest(model_name=model, model_version=version)
    rid = doc.get("id")
    if rid is not None:
        if not isinstance(rid, str):
            raise UsageError(f"'id' must be a string, got {_kind(rid)}")
        request.id = rid
    default_binary = False
    for key, value in _object(doc.get("parameters"), "'parameters'").items():
        if key == BINARY_OUTPUT:
            default_binary = _bool(value, f"parameter '{BINARY_OUTPUT}'")
        else:
            _set_parameter(request.parameters[key], value, key)
    inputs = doc.get("inputs")
    if not isinstance(inputs, list) or not inputs:
        raise UsageError(f"'inputs' must be a non-empty list of tensors, got {_kind(inputs)}")
    offset = 0
    for i, tensor in enumerate(inputs):
        offset = _add_input(request, tensor, i, binary, offset)
    if offset != len(binary):
        raise UsageError(f"the body holds {len(binary)} bytes after the JSON header; the inputs' "
                         f"{BINARY_SIZE} add up to {offset}")
    outputs = doc.get("outputs")
    binary_outputs: dict[str, bool] = {}
    if outputs is not None:
        if not isinstance(outputs, list):
            raise UsageError(f"'outputs' must be a list, got {_kind(outputs)}")
        for i, out in enumerate(outputs):
            out = _object(out, f"output {i}")
            name = out.get("name")
            if not isinstance(name, str):
                raise UsageError(f"output {i}: 'name' must be a string, got {_kind(name)}")
            params = _object(out.get("parameters"), f"output '{name}': 'parameters'")
            _refuse_shm(params, f"output '{name}'")
            if "classification" in params:
                raise UsageError(f"output '{name}': parameter 'classification' is not supported; "
                                 f"request the output and take the top classes on the client")
            if BINARY in params:
                binary_outputs[name] = _bool(params[BINARY], f"output '{name}': '{BINARY}'")
            request.outputs.add(name=name)
    return request, Plan(default_binary, tuple(binary_outputs.items()))


def _add_input(request: pb.ModelInferRequest, tensor: Any, index: int, binary: memoryview,
               offset: int) -> int:
    """Append one JSON input; returns the binary offset after its data."""
    tensor = _object(tensor, f"input {index}")
    name = tensor.get("name")
    if not isinstance(name, str):
        raise UsageError(f"input {index}: 'name' must be a string, got {_kind(name)}")
    what = f"input '{name}'"
    datatype = tensor.get("datatype")
    if not isinstance(datatype, str):
        raise UsageError(f"{what}: 'datatype' must be a string, got {_kind(datatype)}")
    if datatype != "BYTES" and datatype not in TENSOR_DTYPES:
        raise UsageError(f"{what}: datatype '{datatype}' is not supported; allowed: {ALLOWED}")
    shape = tensor.get("shape")
    if (not isinstance(shape, list)
            or not all(type(s) is int and 0 <= s <= _INT64[1] for s in shape)):
        raise UsageError(f"{what}: 'shape' must be a list of non-negative integers, got "
                         f"{_clip(shape)}")
    params = _object(tensor.get("parameters"), f"{what}: 'parameters'")
    _refuse_shm(params, what)
    entry = request.inputs.add(name=name, datatype=datatype, shape=shape)
    count = math.prod(shape)
    if BINARY_SIZE in params:
        size = params[BINARY_SIZE]
        if type(size) is not int or size < 0:
            raise UsageError(f"{what}: '{BINARY_SIZE}' must be a non-negative integer, got "
                             f"{_clip(size)}")
        if "data" in tensor:
            raise UsageError(f"{what} has both 'data' and '{BINARY_SIZE}'; send one")
        if offset + size > len(binary):
            raise UsageError(f"{what}: '{BINARY_SIZE}' is {size} but only {len(binary) - offset} "
                             f"bytes of binary data remain after the JSON header")
        itemsize = _SIZED.get(datatype)
        if itemsize is not None and size != count * itemsize:
            raise UsageError(f"{what}: '{BINARY_SIZE}' is {size} bytes; shape "
                             f"{_fmt(shape)} of {datatype} needs {count * itemsize}")
        request.raw_input_contents.append(bytes(binary[offset:offset + size]))
        return offset + size
    if "data" not in tensor:
        raise UsageError(f"{what} has no data: send 'data', or binary data with "
                         f"'{BINARY_SIZE}' in its parameters")
    data = tensor["data"]
    if datatype == "BYTES":
        items = _strings(data, what, params.get("content_type") == "base64")
        entry.contents.bytes_contents.extend(items)
        return offset
    # raw, as a gRPC client sends it: one decode path in the codec
    request.raw_input_contents.append(_numbers(data, datatype, count, what, shape).tobytes())
    return offset


def _numbers(data: Any, datatype: str, count: int, what: str, shape: list[int]) -> np.ndarray:
    """JSON tensor data (flat, or nested as the shape) as ``count`` values of ``datatype``."""
    dtype = TENSOR_DTYPES[datatype]
    if isinstance(data, list) and len(data) == count:
        try:  # the usual flat list, in one pass
            return np.fromiter(data, dtype, count)
        except (TypeError, ValueError):
            pass  # nested, or not numbers: said below
    try:
        values = np.array(data)
    except (ValueError, TypeError):
        raise UsageError(f"{what}: 'data' must be a list of numbers (flat, or nested as the "
                         f"shape); this one is ragged") from None
    if values.dtype.kind not in "iuf":
        raise UsageError(f"{what}: 'data' must hold numbers for {datatype}, got "
                         f"{_clip(data)}")
    if values.size != count:
        raise UsageError(f"{what}: 'data' holds {values.size} values; shape {_fmt(shape)} "
                         f"needs {count}")
    return values.astype(dtype)


def _strings(data: Any, what: str, b64: bool) -> list[bytes]:
    """BYTES elements: JSON strings (flat, or [n, 1]), base64 if the input says so."""
    if not isinstance(data, list):
        raise UsageError(f"{what}: 'data' must be a list of strings, got {_kind(data)}")
    if all(isinstance(d, list) and len(d) == 1 for d in data):
        data = [d[0] for d in data]
    out = []
    for i, item in enumerate(data):
        if not isinstance(item, str):
            raise UsageError(f"{what}: element {i} must be a string, got {_kind(item)}")
        if b64:
            try:
                out.append(base64.b64decode(item, validate=True))
            except (binascii.Error, ValueError):
                raise UsageError(f"{what}: element {i} is not valid base64 (content_type "
                                 f"'base64')") from None
        else:
            out.append(item.encode())
    return out


def _set_parameter(param: pb.InferParameter | pb.ModelRepositoryParameter, value: Any,
                   key: str) -> None:
    """A JSON parameter into the protocol's oneof (a repository parameter has no double)."""
    numbers = "double_param" in param.DESCRIPTOR.fields_by_name
    if isinstance(value, bool):
        param.bool_param = value
    elif isinstance(value, int):
        if not _INT64[0] <= value <= _INT64[1]:
            raise UsageError(f"parameter '{key}' is {value}, out of the int64 range")
        param.int64_param = value
    elif isinstance(value, float) and numbers:
        param.double_param = value
    elif isinstance(value, str):
        param.string_param = value
    else:
        allowed = "string, number or boolean" if numbers else "string, integer or boolean"
        raise UsageError(f"parameter '{key}' must be a {allowed}, got {_kind(value)}")


def _refuse_shm(params: dict[str, Any], what: str) -> None:
    if any(k in params for k in _SHM_KEYS):
        raise NotEnabledError(f"{what} names a shared-memory region; shared memory is served "
                              f"over gRPC only")


def _object(value: Any, what: str) -> dict[str, Any]:
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise UsageError(f"{what} must be a JSON object, got {_kind(value)}")
    return value


def _bool(value: Any, what: str) -> bool:
    if not isinstance(value, bool):
        raise UsageError(f"{what} must be true or false, got {_clip(value)}")
    return value


def _kind(value: Any) -> str:
    names = {dict: "an object", list: "a list", str: "a string", bool: "a boolean",
             int: "a number", float: "a number", type(None): "null"}
    return names.get(type(value), type(value).__name__)


def _clip(value: Any, limit: int = 80) -> str:
    text = json.dumps(value) if not isinstance(value, bytes) else repr(value)
    return text if len(text) <= limit else text[:limit] + "…"


def _fmt(shape: list[int]) -> str:
    return "[" + ", ".join(str(s) for s in shape) + "]"


# -- answer: pb.ModelInferResponse -> JSON (+ binary)
class InferRenderer:
    """``render_infer`` with the JSON header of all-binary answers remembered: for one model
    version, output shape and plan it is the same every time (answers with an id are
    written each time)."""

    def __init__(self) -> None:
        self._headers: dict[tuple[object, ...], bytes] = {}

    def render(self, response: pb.ModelInferResponse, plan: Plan) -> tuple[bytes, int | None]:
        outputs = response.outputs
        if response.id or len(outputs) != 1:
            return render_infer(response, plan)
        tensor = outputs[0]
        key = (response.model_name, response.model_version, tensor.name, tensor.datatype,
               tuple(tensor.shape), plan)
        header = self._headers.get(key)
        if header is None:
            body, length = render_infer(response, plan)
            if length is not None and len(self._headers) < _CACHE_MAX:
                self._headers[key] = body[:length]
            return body, length
        return header + response.raw_output_contents[0], len(header)


def render_infer(response: pb.ModelInferResponse, plan: Plan) -> tuple[bytes, int | None]:
    """(body, JSON header length or None when the body is JSON only)."""
    outputs = []
    chunks = []
    for tensor, raw in zip(response.outputs, response.raw_output_contents):
        out: dict[str, Any] = {"name": tensor.name, "datatype": tensor.datatype,
                               "shape": list(tensor.shape)}
        if plan.is_binary(tensor.name):
            out["parameters"] = {BINARY_SIZE: len(raw)}
            chunks.append(raw)
        else:  # orjson writes float32 in their shortest form that reads back the same
            out["data"] = np.frombuffer(raw, TENSOR_DTYPES[tensor.datatype])
        outputs.append(out)
    doc: dict[str, Any] = {"model_name": response.model_name,
                           "model_version": response.model_version}
    if response.id:
        doc["id"] = response.id
    doc["outputs"] = outputs
    header = orjson.dumps(doc, option=orjson.OPT_SERIALIZE_NUMPY)
    if not chunks:
        return header, None
    return b"".join((header, *chunks)), len(header)


# -- protobuf answers as JSON, as Triton writes them
def message_json(message: Message) -> Any:
    """A protobuf message as Triton's HTTP frontend writes it: field names as in the .proto,
    every field present, 64-bit integers as JSON numbers (protobuf's JSON mapping quotes them;
    perf_analyzer reads them as numbers)."""
    doc = json_format.MessageToDict(message, preserving_proto_field_name=True,
                                    always_print_fields_with_no_presence=True)
    _unquote(message.DESCRIPTOR, doc)
    return doc


_INT64_TYPES = {FieldDescriptor.TYPE_INT64, FieldDescriptor.TYPE_UINT64,
                FieldDescriptor.TYPE_SINT64, FieldDescriptor.TYPE_FIXED64,
                FieldDescriptor.TYPE_SFIXED64}


def _unquote(descriptor: Descriptor, doc: dict[str, Any]) -> None:
    for field in descriptor.fields:
        if field.name not in doc:
            continue
        value = doc[field.name]
        kind = field.message_type
        repeated = isinstance(value, list)
        if kind is not None and kind.GetOptions().map_entry:
            item = kind.fields_by_name["value"]
            if item.message_type is not None:
                for v in value.values():
                    _unquote(item.message_type, v)
            elif item.type in _INT64_TYPES:
                doc[field.name] = {k: int(v) for k, v in value.items()}
        elif kind is not None:
            for v in value if repeated else [value]:
                if isinstance(v, dict):
                    _unquote(kind, v)
        elif field.type in _INT64_TYPES:
            doc[field.name] = [int(v) for v in value] if repeated else int(value)


# -- the server
def _json(doc: Any, status: int = 200) -> web.Response:
    return web.Response(body=orjson.dumps(doc), status=status, content_type=JSON_TYPE)


def error_response(exc: BaseException) -> web.Response:
    status, message = http_status_for(exc)
    return _json({"error": message}, status)


def _ok(flag: bool) -> web.Response:
    # Health answers: the status is the answer, the body empty (the protocol's 200 or 4xx).
    return web.Response(status=200 if flag else 400)


def bind_socket(host: str, port: int, reuse_port: bool) -> socket.socket:
    """A bound (not yet listening) socket for the HTTP endpoint; UsageError if it cannot be."""
    address = host.strip("[]")
    try:
        family, kind, proto, _, addr = socket.getaddrinfo(
            address, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)[0]
        sock = socket.socket(family, kind, proto)
    except OSError as exc:
        raise UsageError(f"cannot listen on {host}:{port} (HTTP): {exc}") from None
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if reuse_port:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        sock.bind(addr)
    except OSError as exc:
        sock.close()
        raise UsageError(f"cannot listen on {host}:{port} (HTTP): {exc.strerror or exc}; "
                         f"choose another --http-port, or --no-http") from None
    sock.setblocking(False)
    return sock


def _ssl_context(config: ServerConfig) -> ssl.SSLContext | None:
    """The gRPC side's certificate (and client CA) for HTTPS: one TLS setting for both."""
    if not config.tls_cert or not config.tls_key:
        return None
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    try:
        context.load_cert_chain(config.tls_cert, config.tls_key)
        if config.tls_client_ca:
            context.load_verify_locations(config.tls_client_ca)
            context.verify_mode = ssl.CERT_REQUIRED
    except (OSError, ssl.SSLError) as exc:
        raise UsageError(f"cannot use the TLS files for HTTPS: {exc}") from None
    return context


Info = dict[str, str]  # what a route's path names: {"name": ..., "version": ...}
Handler = Callable[[web.BaseRequest, Info], Awaitable[web.StreamResponse]]


class _Context:
    """What the servicer's non-infer handlers ask of a gRPC context, for an HTTP caller."""

    def __init__(self) -> None:
        self.trailing_metadata: tuple[tuple[str, str], ...] = ()

    def set_trailing_metadata(self, metadata: tuple[tuple[str, str], ...]) -> None:
        self.trailing_metadata = tuple(metadata)


class HttpFrontend:
    """The REST routes over one InferenceServicer; ``bind`` then ``start``, ``stop`` at shutdown."""

    def __init__(self, servicer: InferenceServicer, config: ServerConfig,
                 registry: Any) -> None:
        self.servicer = servicer
        self.config = config
        self.registry = registry  # prometheus_client's, for /metrics
        self.max_bytes = config.max_message_bytes
        self.max_inflight = config.limits.max_concurrent_rpcs
        self.read_timeout = config.limits.request_read_timeout_s
        self.inflight = 0
        self._parser = InferParser()
        self._renderer = InferRenderer()
        self.sock: socket.socket | None = None
        self.port = 0
        self._runner: web.ServerRunner | None = None
        # Fixed paths, and the model routes by what follows /v2/models/{name}[/versions/{v}]
        self._fixed: dict[str, dict[str, Handler]] = {
            "/v2": {"GET": self._metadata},
            "/v2/health/live": {"GET": self._live},
            "/v2/health/ready": {"GET": self._ready},
            "/v2/models/stats": {"GET": self._stats},
            "/v2/repository/index": {"POST": self._index},
            "/metrics": {"GET": self._metrics},
        }
        self._model_routes: dict[str, dict[str, Handler]] = {
            "": {"GET": self._model_metadata},
            "ready": {"GET": self._model_ready},
            "config": {"GET": self._config},
            "stats": {"GET": self._stats},
            "infer": {"POST": self._infer},
        }
        self._control_routes: dict[str, Handler] = {"load": self._control,
                                                   "unload": self._control}

    def route(self, method: str, path: str) -> tuple[Handler, Info]:
        """The handler for a request and what its path names; HTTPNotFound or
        HTTPMethodNotAllowed (with the methods allowed) when there is none. Path segments are
        matched whole (a name is one non-empty segment), as aiohttp's router matches {name}."""
        info: Info = {}
        methods = self._fixed.get(path)
        if methods is None:
            parts = path.split("/")
            n = len(parts)
            # ['', 'v2', 'models', name, ('versions', v,) (what)]
            if n >= 4 and parts[1] == "v2" and parts[2] == "models" and parts[3]:
                info["name"] = parts[3]
                rest = parts[4:]
                if len(rest) >= 2 and rest[0] == "versions" and rest[1]:
                    info["version"] = rest[1]
                    rest = rest[2:]
                if not rest:
                    methods = self._model_routes[""]
                elif len(rest) == 1 and rest[0]:
                    methods = self._model_routes.get(rest[0])
            elif (n == 6 and parts[1] == "v2" and parts[2] == "repository"
                    and parts[3] == "models" and parts[4] and parts[5] in self._control_routes):
                info["name"] = parts[4]
                methods = {"POST": self._control_routes[parts[5]]}
        if methods is None:
            raise web.HTTPNotFound()
        handler = methods.get("GET" if method == "HEAD" else method)
        if handler is None:
            allowed = {*methods, *(["HEAD"] if "GET" in methods else [])}
            raise web.HTTPMethodNotAllowed(method, sorted(allowed))
        return handler, info

    def bind(self) -> int:
        self.sock = bind_socket(self.config.host, self.config.http_port or 0,
                                self.config.reuse_port)
        self.port = self.sock.getsockname()[1]
        return self.port

    async def start(self) -> None:
        assert self.sock is not None, "bind() first"
        idle = self.config.limits.max_connection_idle_s
        # aiohttp's low-level server: its HTTP, our routing (route()); an Application's router
        # and middleware cost ~10 µs a request, a tenth of a do-nothing server's whole answer.
        # lingering_time: after answering a request whose body was not read in full (413,
        # 408), read and drop what else comes for this long, so that the client gets the
        # answer before the connection closes (not a reset), then close.
        server = web.Server(self._handle, request_factory=self._request,
                            keepalive_timeout=idle if idle > 0 else 3600.0, access_log=None,
                            lingering_time=LINGER_S)
        # Every infer is answered before stop() (server.py): the shutdown only closes
        # connections, so a short timeout.
        self._runner = web.ServerRunner(server, handle_signals=False, shutdown_timeout=5.0)
        await self._runner.setup()
        await web.SockSite(self._runner, self.sock,
                           ssl_context=_ssl_context(self.config)).start()

    async def stop(self) -> None:
        """Close the port and the connections (every infer is answered by then: server.py)."""
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None
        elif self.sock is not None:
            self.sock.close()

    def _request(self, message: Any, payload: Any, protocol: Any, writer: Any,
                 task: asyncio.Task[None]) -> web.BaseRequest:
        """aiohttp's request, reading bodies up to --max-message-mb (its default is 1 MiB)."""
        return web.BaseRequest(message, payload, protocol, writer, task,
                               asyncio.get_running_loop(), client_max_size=self.max_bytes)

    async def _handle(self, request: web.BaseRequest) -> web.StreamResponse:
        """Every request: routed, answered, and every failure as the protocol's error body
        (unknown route, wrong method, and the handlers' errors through the status table)."""
        method, path = request.method, request.path
        try:
            handler, info = self.route(method, path)
            return await handler(request, info)
        except web.HTTPException as exc:
            if exc.status < 400:
                raise
            response = _json({"error": f"{exc.reason}: {method} {path}"}, exc.status)
            if "Allow" in exc.headers:
                response.headers["Allow"] = exc.headers["Allow"]
            return response
        except Exception as exc:  # noqa: BLE001 - every failure leaves through the table
            return error_response(exc)

    # -- routes answered by the gRPC handlers
    async def _grpc(self, method: str, message: Message) -> Any:
        """The servicer's handler for ``method`` without its gRPC wrapper (its errors raise)."""
        handler = getattr(InferenceServicer, method).__wrapped__
        return await handler(self.servicer, message, _Context())

    async def _live(self, request: web.BaseRequest, info: Info) -> web.Response:
        return _ok((await self._grpc("ServerLive", pb.ServerLiveRequest())).live)

    async def _ready(self, request: web.BaseRequest, info: Info) -> web.Response:
        return _ok((await self._grpc("ServerReady", pb.ServerReadyRequest())).ready)

    async def _model_ready(self, request: web.BaseRequest, info: Info) -> web.Response:
        answer = await self._grpc("ModelReady", pb.ModelReadyRequest(**_model(info)))
        return _ok(answer.ready)

    async def _answer(self, method: str, message: Message,
                      pick: Callable[[Any], Any] = message_json) -> web.Response:
        return _json(pick(await self._grpc(method, message)))

    async def _metadata(self, request: web.BaseRequest, info: Info) -> web.Response:
        return await self._answer("ServerMetadata", pb.ServerMetadataRequest())

    async def _model_metadata(self, request: web.BaseRequest, info: Info) -> web.Response:
        return await self._answer("ModelMetadata", pb.ModelMetadataRequest(**_model(info)))

    async def _config(self, request: web.BaseRequest, info: Info) -> web.Response:
        # Triton's HTTP answer is the config itself, not {"config": ...}
        return await self._answer("ModelConfig", pb.ModelConfigRequest(**_model(info)),
                                  lambda a: message_json(a.config))

    async def _stats(self, request: web.BaseRequest, info: Info) -> web.Response:
        return await self._answer("ModelStatistics",
                                  pb.ModelStatisticsRequest(**_model(info)))

    async def _json_body(self, request: web.BaseRequest) -> dict[str, Any]:
        """A small JSON object body (empty: {})."""
        body = await self._read(request)
        try:
            doc = orjson.loads(body) if body.strip() else {}
        except orjson.JSONDecodeError as exc:
            raise UsageError(f"the request body is not valid JSON: {exc}") from None
        return _object(doc, "the request body")

    async def _index(self, request: web.BaseRequest, info: Info) -> web.Response:
        ready = _bool((await self._json_body(request)).get("ready", False), "'ready'")
        # Triton's HTTP answer is the list itself
        return await self._answer("RepositoryIndex", pb.RepositoryIndexRequest(ready=ready),
                                  lambda a: message_json(a).get("models", []))

    async def _control(self, request: web.BaseRequest, info: Info) -> web.Response:
        """Load or unload (Triton's model repository extension): the gRPC handler's checks, mode
        and answer; the body's "parameters" go along as the gRPC request's."""
        load = request.path.endswith("/load")
        message = (pb.RepositoryModelLoadRequest if load else pb.RepositoryModelUnloadRequest)(
            model_name=info["name"])
        params = _object((await self._json_body(request)).get("parameters"), "'parameters'")
        for key, value in params.items():
            _set_parameter(message.parameters[key], value, key)
        await self._grpc("RepositoryModelLoad" if load else "RepositoryModelUnload", message)
        return web.Response()

    async def _metrics(self, request: web.BaseRequest, info: Info) -> web.Response:
        from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

        return web.Response(body=generate_latest(self.registry),
                            headers={"Content-Type": CONTENT_TYPE_LATEST})

    # -- inference
    async def _infer(self, request: web.BaseRequest, info: Info) -> web.Response:
        if self.inflight >= self.max_inflight:
            return error_response(OverloadedError(
                f"{self.inflight} HTTP requests in progress, the most --max-concurrent-rpcs "
                f"allows; retry later"))
        self.inflight += 1
        try:
            deadline = _deadline(request.headers.get(TIMEOUT_HEADER))
            body = await self._read(request)
            message, plan = self._parser.parse(body, request.headers.get(HEADER_LENGTH),
                                               info["name"], info.get("version", ""))
            answer = await self.servicer.infer(message, deadline)
            data, header_length = self._renderer.render(answer, plan)
        except Exception as exc:  # noqa: BLE001 - every failure leaves through the table
            response = error_response(exc)
            if isinstance(exc, (MessageTooLargeError, RequestTimeoutError)):
                response.force_close()  # not reading the rest of the body
            return response
        finally:
            self.inflight -= 1
        if header_length is None:
            return web.Response(body=data, content_type=JSON_TYPE)
        return web.Response(body=data, content_type=BINARY_TYPE,
                            headers={HEADER_LENGTH: str(header_length)})

    async def _read(self, request: web.BaseRequest) -> bytes:
        """The body, refused before it is read when it says it is over --max-message-mb, and
        when it has not arrived in full --request-read-timeout-s after the headers."""
        length = request.content_length
        if length is not None and length > self.max_bytes:
            raise MessageTooLargeError(self._too_large(f" of {length} bytes"))
        try:  # chunked, or compressed: counted as it arrives, decompressed
            if request.content.is_eof():  # arrived with the headers: nothing to wait for
                return await request.read()
            return await asyncio.wait_for(request.read(), self.read_timeout)
        except web.HTTPRequestEntityTooLarge:
            raise MessageTooLargeError(self._too_large("")) from None
        except asyncio.TimeoutError:  # TimeoutError from 3.11 on
            raise RequestTimeoutError(
                f"the request body did not arrive in full within --request-read-timeout-s "
                f"{self.read_timeout:g} s of its headers") from None

    def _too_large(self, size: str) -> str:
        return (f"request body{size} is over --max-message-mb {self.max_bytes >> 20} "
                f"({self.max_bytes} bytes)")


def _model(info: Info) -> dict[str, str]:
    return {"name": info.get("name", ""), "version": info.get("version", "")}


def _deadline(header: str | None) -> float | None:
    if header is None:
        return None
    try:
        ms = float(header)
    except ValueError:
        ms = -1.0
    if not 0 < ms < 1e12:
        raise UsageError(f"{TIMEOUT_HEADER} must be a positive number of milliseconds, got "
                         f"{header[:40]!r}")
    return asyncio.get_running_loop().time() + ms / 1000.0

