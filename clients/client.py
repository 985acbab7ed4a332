"""``Client`` (blocking) and ``AsyncClient`` (asyncio): classify images over KServe v2 gRPC.

    with Client("127.0.0.1:8001") as client:
        for p in client.predict("lenet5", ["seven.png", "two.png"], top_k=3):
            print(p.label, p.probability)

Both speak to any Triton-compatible server (cnnctl serve included) with the same API; they share
everything but the waiting (protocol.py builds and reads the messages, images.py prepares the
images). Per call: one deadline (``timeout``, measured on ``time.monotonic``) covers every chunk and
every retry; only UNAVAILABLE is retried, with exponential backoff, because it is the one failure
that says "nothing was computed, try again" - retrying INVALID_ARGUMENT or RESOURCE_EXHAUSTED would
repeat the failure or add load to an overloaded server. A failed call raises the typed exception of
clients/errors.py with the server's message.

Why ``preprocess="server"`` is the default: the server already decodes PNG/JPEG with the model's
own ImageSpec (the one export verified against), so one implementation of the preprocessing exists;
files travel as they are, and an encoded image is smaller on the wire than its float32 tensor
(a 28×28 digit: ~0.3 KB PNG vs 3.1 KB; 224×224 RGB JPEG: ~20 KB vs 602 KB). ``"client"`` moves the
decoding off a busy server, when the server publishes its ImageSpec.

Imports grpc, numpy and (lazily) PIL; never torch.
"""

from __future__ import annotations

import asyncio
import json
import logging
import socket
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Callable

import grpc
import numpy as np

from cnnctl.clients import protocol
from cnnctl.clients.errors import (ClientError, DeadlineExceeded, Unavailable, error_for,
                                  from_rpc_error)
from cnnctl.clients.images import ImageLike, expand, to_encoded
from cnnctl.clients.protocol import ModelInfo, Prediction
from cnnctl.errors import ShapeError, UsageError
from cnnctl.export.image import to_tensor
from cnnctl.protos import grpc_service_pb2 as pb
from cnnctl.protos import grpc_service_pb2_grpc as pb_grpc

log = logging.getLogger(__name__)

DEFAULT_PORT = 8001  # Triton's (and cnnctl serve's) gRPC port
PREPROCESS_MODES = ("server", "client")
# cnnctl serve's default --max-message-mb; a larger request is split on the client.
DEFAULT_MAX_MESSAGE_BYTES = 64 * 1024 * 1024
# ModelInfer as a bytes-in, bytes-out call (infer_serialized): a load generator's requests are
# serialised once, not per call.
MODEL_INFER = "/inference.GRPCInferenceService/ModelInfer"
MODEL_STREAM_INFER = "/inference.GRPCInferenceService/ModelStreamInfer"
# Several servers: calls round robin over those whose gRPC health is SERVING, so a draining
# server (cnnctl serve turns NOT_SERVING on SIGTERM) gets no new calls; servers without the
# health service count as healthy.
BALANCED_SERVICE_CONFIG = json.dumps({"loadBalancingConfig": [{"round_robin": {}}],
                                      "healthCheckConfig": {"serviceName": ""}})



def parse_url(url: str) -> tuple[str, bool]:
    """``host:port``, ``grpc://host:port`` or ``grpcs://host:port`` → (target, tls)."""
    tls = False
    for scheme, secure in (("grpcs://", True), ("grpc://", False)):
        if url.startswith(scheme):
            url, tls = url[len(scheme):], secure
            break
    if "://" in url:
        raise UsageError(f"server address {url!r}: unknown scheme; allowed: host:port, "
                         f"grpc://host:port, grpcs://host:port")
    host, sep, port = url.rpartition(":")
    if not sep or "]" in port:
        host, port = url, str(DEFAULT_PORT)
    if not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise UsageError(f"server address {url!r} is not host:port (port 1-65535)")
    return f"{host}:{port}", tls


def balanced_target(urls: str | Sequence[str]) -> tuple[str, bool, str | None]:
    """One or several server addresses → (gRPC target, tls, authority to present or None).

    Several (a sequence, or one string with commas) become one channel that balances calls over
    all of them round robin (``_options``): each name is resolved now, to all its addresses,
    and a server that goes away is skipped until it is back. ``dns:///host:port`` is passed to
    gRPC's resolver as is (a Kubernetes headless Service: every pod's address, re-resolved).
    """
    if isinstance(urls, str):
        urls = [u.strip() for u in urls.split(",")]
    urls = [u for u in urls if u]
    if not urls:
        raise UsageError("no server address given; expected host:port (several: comma-separated)")
    if len(urls) == 1 and urls[0].startswith("dns:///"):
        return urls[0], False, None
    parsed = [parse_url(u) for u in urls]
    if len({tls for _, tls in parsed}) > 1:
        raise UsageError(f"server addresses {', '.join(urls)} mix grpc:// and grpcs://; "
                         f"use one scheme for all")
    tls = parsed[0][1]
    if len(parsed) == 1:
        return parsed[0][0], tls, None
    v4: list[str] = []
    v6: list[str] = []
    for target, _ in parsed:
        host, _, port = target.rpartition(":")
        try:
            infos = socket.getaddrinfo(host.strip("[]"), int(port), type=socket.SOCK_STREAM)
        except socket.gaierror as exc:
            raise UsageError(f"server address {target!r}: cannot resolve {host!r} "
                             f"({exc.strerror})") from None
        for family, _, _, _, address in infos:
            if family == socket.AF_INET and f"{address[0]}:{port}" not in v4:
                v4.append(f"{address[0]}:{port}")
            elif family == socket.AF_INET6 and f"[{address[0]}]:{port}" not in v6:
                v6.append(f"[{address[0]}]:{port}")
    # gRPC's static resolvers take one address family per target; IPv4 where there is any.
    if v4 and v6 and (only_v6 := [t for t, _ in parsed if not _resolves_v4(t)]):
        raise UsageError(f"server addresses {', '.join(only_v6)} resolve to IPv6 only and the "
                         f"others to IPv4; one channel balances over one address family: list "
                         f"IPv4 or IPv6 servers only")
    target = "ipv4:" + ",".join(v4) if v4 else "ipv6:" + ",".join(v6)
    return target, tls, parsed[0][0]


def _resolves_v4(target: str) -> bool:
    host, _, port = target.rpartition(":")
    try:
        return bool(socket.getaddrinfo(host.strip("[]"), int(port), socket.AF_INET,
                                       socket.SOCK_STREAM))
    except socket.gaierror:
        return False


def _pem(value: bytes | str | Path | None, what: str) -> bytes | None:
    """PEM bytes, read from the file when given a path."""
    if not isinstance(value, (str, Path)):
        return value
    try:
        return Path(value).read_bytes()
    except OSError as exc:
        raise UsageError(f"cannot read {what} {str(value)!r} ({exc.strerror})") from None


class _ClientBase:
    """Configuration, validation and the I/O-free halves of every call."""

    def __init__(self, url: str | Sequence[str], *, timeout: float = 30.0, retries: int = 3,
                 backoff: float = 0.1, max_backoff: float = 2.0, tls: bool = False,
                 root_certificates: bytes | str | Path | None = None,
                 server_name: str | None = None,
                 certificate_chain: bytes | str | Path | None = None,
                 private_key: bytes | str | Path | None = None,
                 max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES,
                 preprocess: str = "server", max_in_flight: int = 4) -> None:
        self.target, url_tls, self._authority = balanced_target(url)
        if timeout <= 0:
            raise UsageError(f"timeout must be positive seconds, got {timeout}")
        if retries < 0:
            raise UsageError(f"retries must be 0 or more, got {retries}")
        if backoff < 0 or max_backoff < backoff:
            raise UsageError(f"backoff {backoff} s / max_backoff {max_backoff} s: need "
                             f"0 <= backoff <= max_backoff")
        if preprocess not in PREPROCESS_MODES:
            raise UsageError(f"preprocess {preprocess!r} is not known; allowed: "
                             f"{', '.join(PREPROCESS_MODES)}")
        if max_message_bytes < 1024 * 1024:
            raise UsageError(f"max_message_bytes {max_message_bytes} is below the 1 MiB minimum")
        if max_in_flight < 1:
            raise UsageError(f"max_in_flight must be at least 1, got {max_in_flight}")
        self.timeout = timeout  # s, per call: covers every chunk and retry
        self.retries = retries  # extra attempts after an UNAVAILABLE
        self.backoff = backoff  # s before the first retry; doubles each time up to max_backoff
        self.max_backoff = max_backoff
        self.max_message_bytes = max_message_bytes
        self.preprocess = preprocess
        self.max_in_flight = max_in_flight  # AsyncClient: chunks of one call in flight at once
        if (certificate_chain is None) != (private_key is None):
            raise UsageError("a client certificate and its private key go together; give both "
                             "or neither")
        self.tls = (tls or url_tls or root_certificates is not None
                    or certificate_chain is not None)
        self.root_certificates = _pem(root_certificates, "root certificates")
        # For servers that require one (cnnctl serve --tls-client-ca): mutual TLS.
        self.certificate_chain = _pem(certificate_chain, "client certificate")
        self.private_key = _pem(private_key, "client private key")
        self.server_name = server_name
        self._infos: dict[tuple[str, str], ModelInfo] = {}

    # -- channel
    def _options(self) -> list[tuple[str, Any]]:
        options: list[tuple[str, Any]] = [
            ("grpc.max_send_message_length", self.max_message_bytes),
            ("grpc.max_receive_message_length", self.max_message_bytes),
        ]
        if self.server_name:
            options.append(("grpc.ssl_target_name_override", self.server_name))
        elif self._authority:  # several servers: TLS checks the first name given
            options.append(("grpc.default_authority", self._authority))
        if "," in self.target or self.target.startswith("dns:"):
            options.append(("grpc.service_config", BALANCED_SERVICE_CONFIG))
        return options

    def _credentials(self) -> grpc.ChannelCredentials | None:
        if not self.tls:
            return None
        return grpc.ssl_channel_credentials(root_certificates=self.root_certificates,
                                            private_key=self.private_key,
                                            certificate_chain=self.certificate_chain)

    # -- deadlines and retries
    def _deadline(self, timeout: float | None) -> float:
        return time.monotonic() + (self.timeout if timeout is None else timeout)

    @staticmethod
    def _remaining(deadline: float, what: str) -> float:
        left = deadline - time.monotonic()
        if left <= 0:
            raise DeadlineExceeded(grpc.StatusCode.DEADLINE_EXCEEDED,
                                   f"deadline passed before {what} could be sent")
        return left

    def _retry_delay(self, error: ClientError, attempt: int, deadline: float) -> float | None:
        """Seconds to wait before attempt ``attempt + 1``, or None to give up with ``error``."""
        if not isinstance(error, Unavailable) or attempt > self.retries:
            return None
        delay = min(self.max_backoff, self.backoff * 2 ** (attempt - 1))
        if time.monotonic() + delay >= deadline:
            return None
        log.info("%s unavailable (%s); retry %d/%d in %.2f s", self.target, error.message,
                 attempt, self.retries, delay)
        return delay

    @staticmethod
    def _final(error: ClientError, attempt: int) -> ClientError:
        if isinstance(error, Unavailable) and attempt > 1:
            return Unavailable(error.code, f"{error.message} (gave up after {attempt} attempts)",
                               attempts=attempt)
        error.attempts = attempt
        return error

    # -- predict / infer, the halves without I/O
    def _predict_requests(self, info: ModelInfo, images: ImageLike | Sequence[ImageLike]
                          ) -> list[pb.ModelInferRequest]:
        items = expand(images)
        if self.preprocess == "client":
            if info.image is None:
                raise UsageError(
                    f"model '{info.name}' does not publish its image preprocessing (ModelConfig "
                    f"parameter '{protocol.IMAGE_PARAMETER}'); use preprocess='server'")
            return self._tensor_requests(info, to_tensor(items, info.image))
        encoded = [to_encoded(item) for item in items]
        chunks = protocol.plan_chunks([len(e) + 4 for e in encoded], info.max_batch_size,
                                      self.max_message_bytes)
        return [protocol.bytes_request(info, encoded[c]) for c in chunks]

    def _tensor_requests(self, info: ModelInfo, x: np.ndarray) -> list[pb.ModelInferRequest]:
        x = np.asarray(x)
        expected = info.input_shape
        if x.ndim == len(expected) - 1:
            x = x[None]
        if x.ndim != len(expected) or any(e > 0 and s != e for s, e in zip(x.shape[1:],
                                                                            expected[1:])):
            raise ShapeError(f"tensor of shape {list(x.shape)} does not fit model '{info.name}' "
                             f"input {list(expected)} (-1: any batch size)")
        row = int(np.prod(x.shape[1:])) * 4
        chunks = protocol.plan_chunks([row] * len(x), info.max_batch_size, self.max_message_bytes)
        return [protocol.tensor_request(info, x[c]) for c in chunks]

    @staticmethod
    def _join(info: ModelInfo, requests: list[pb.ModelInferRequest],
              responses: list[pb.ModelInferResponse]) -> np.ndarray:
        parts = [protocol.answered_logits(resp, req, info)
                 for req, resp in zip(requests, responses)]
        return np.concatenate(parts) if len(parts) > 1 else parts[0]


class Client(_ClientBase):
    """Blocking client over one gRPC channel. Thread-safe; close it (or use ``with``)."""

    def __init__(self, url: str | Sequence[str], **kwargs: Any) -> None:
        super().__init__(url, **kwargs)
        credentials = self._credentials()
        self._channel = (grpc.insecure_channel(self.target, options=self._options())
                         if credentials is None else
                         grpc.secure_channel(self.target, credentials, options=self._options()))
        self._stub = pb_grpc.GRPCInferenceServiceStub(self._channel)
        self._infer_raw = self._channel.unary_unary(MODEL_INFER)

    def close(self) -> None:
        """Close the channel; calls still in flight end with CANCELLED (from any thread)."""
        self._channel.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _call(self, method: str, request: Any, deadline: float) -> Any:
        rpc: Callable[..., Any] = getattr(self._stub, method)
        attempt = 0
        while True:
            attempt += 1
            try:
                return rpc(request, timeout=self._remaining(deadline, method))
            except grpc.RpcError as exc:
                error = from_rpc_error(exc, attempts=attempt)
            delay = self._retry_delay(error, attempt, deadline)
            if delay is None:
                raise self._final(error, attempt) from None
            time.sleep(delay)

    # -- health and metadata
    def server_live(self, *, timeout: float | None = None) -> bool:
        return self._call("ServerLive", pb.ServerLiveRequest(), self._deadline(timeout)).live

    def server_ready(self, *, timeout: float | None = None) -> bool:
        return self._call("ServerReady", pb.ServerReadyRequest(), self._deadline(timeout)).ready

    def model_ready(self, model: str, version: str = "", *, timeout: float | None = None) -> bool:
        return self._call("ModelReady", pb.ModelReadyRequest(name=model, version=version),
                          self._deadline(timeout)).ready

    def server_metadata(self, *, timeout: float | None = None) -> pb.ServerMetadataResponse:
        return self._call("ServerMetadata", pb.ServerMetadataRequest(), self._deadline(timeout))

    def health(self, service: str = "", *, timeout: float | None = None) -> str:
        """gRPC health checking (grpc.health.v1): the status name of ``service`` ("" = the
        server; cnnctl serve also answers "live" and each model's name), e.g. "SERVING"."""
        from grpc_health.v1 import health_pb2, health_pb2_grpc

        deadline = self._deadline(timeout)
        try:
            reply = health_pb2_grpc.HealthStub(self._channel).Check(
                health_pb2.HealthCheckRequest(service=service),
                timeout=self._remaining(deadline, "Check"))
        except grpc.RpcError as exc:
            raise from_rpc_error(exc, attempts=1) from None
        return health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)

    def wait_until_ready(self, timeout: float = 30.0, poll: float = 0.1) -> None:
        """Block until the server answers ready; Unavailable when ``timeout`` passes first."""
        deadline = time.monotonic() + timeout
        last = "not ready"
        while True:
            try:
                if self.server_ready(timeout=max(0.05, min(1.0, deadline - time.monotonic()))):
                    return
            except (Unavailable, DeadlineExceeded) as exc:
                last = exc.message
            if time.monotonic() + poll >= deadline:
                raise Unavailable(grpc.StatusCode.UNAVAILABLE,
                                  f"server {self.target} not ready after {timeout} s ({last})")
            time.sleep(poll)

    def model_info(self, model: str, version: str = "", *, timeout: float | None = None,
                   refresh: bool = False) -> ModelInfo:
        """Names, shapes, class names and batch limit of a model (cached per client)."""
        key = (model, version)
        if refresh or key not in self._infos:
            deadline = self._deadline(timeout)
            meta = self._call("ModelMetadata", pb.ModelMetadataRequest(name=model, version=version),
                              deadline)
            config = self._call("ModelConfig", pb.ModelConfigRequest(name=model, version=version),
                                deadline).config
            self._infos[key] = protocol.model_info(version, meta, config)
        return self._infos[key]

    # -- inference
    def _send_all(self, requests: list[pb.ModelInferRequest], deadline: float
                  ) -> list[pb.ModelInferResponse]:
        return [self._call("ModelInfer", req, deadline) for req in requests]

    def infer_request(self, request: pb.ModelInferRequest,
                      timeout: float | None = None) -> pb.ModelInferResponse:
        """One prepared ModelInferRequest, as is (the load generator's fast path)."""
        return self._call("ModelInfer", request, self._deadline(timeout))

    def infer_serialized(self, payload: bytes, timeout: float | None = None) -> bytes:
        """One ModelInferRequest already serialised; the serialised response, unparsed. No
        retries: every call counts once (``cnnctl bench``'s hot path at concurrency 1; errors
        still arrive typed). ``timeout=None`` sends no deadline: the caller bounds the wait, e.g.
        by closing the client from another thread."""
        try:
            return self._infer_raw(payload, timeout=timeout)
        except grpc.RpcError as exc:
            raise from_rpc_error(exc, attempts=1) from None

    def predict(self, model: str, images: ImageLike | Sequence[ImageLike], *, top_k: int = 5,
                return_logits: bool = False, version: str = "",
                timeout: float | None = None) -> list[Prediction]:
        """Top-k classes per image, in the order given (see images.py for what an image is)."""
        deadline = self._deadline(timeout)
        info = self.model_info(model, version, timeout=self._remaining(deadline, "ModelMetadata"))
        top_k = protocol.check_top_k(top_k, info)
        requests = self._predict_requests(info, images)
        logits = self._join(info, requests, self._send_all(requests, deadline))
        return protocol.predictions(logits, info, top_k, return_logits)

    def infer(self, model: str, tensor: np.ndarray, *, version: str = "",
              timeout: float | None = None) -> np.ndarray:
        """Logits for an already-normalised float32 tensor (N×C×H×W, or C×H×W for one)."""
        deadline = self._deadline(timeout)
        info = self.model_info(model, version, timeout=self._remaining(deadline, "ModelMetadata"))
        requests = self._tensor_requests(info, tensor)
        return self._join(info, requests, self._send_all(requests, deadline))


class AsyncClient(_ClientBase):
    """asyncio client over one grpc.aio channel; the same API as ``Client``, awaited.

    The chunks of one large call go concurrently (``max_in_flight`` at a time)."""

    def __init__(self, url: str | Sequence[str], **kwargs: Any) -> None:
        super().__init__(url, **kwargs)
        credentials = self._credentials()
        self._channel = (grpc.aio.insecure_channel(self.target, options=self._options())
                         if credentials is None else
                         grpc.aio.secure_channel(self.target, credentials, options=self._options()))
        self._stub = pb_grpc.GRPCInferenceServiceStub(self._channel)
        self._infer_raw = self._channel.unary_unary(MODEL_INFER)
        self._stream_raw = self._channel.stream_stream(MODEL_STREAM_INFER)

    def open_stream(self) -> InferStream:
        """A ModelStreamInfer stream on this client's channel (``cnnctl bench --streaming``)."""
        return InferStream(self._stream_raw())

    async def close(self) -> None:
        await self._channel.close()

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def _call(self, method: str, request: Any, deadline: float) -> Any:
        rpc: Callable[..., Any] = getattr(self._stub, method)
        attempt = 0
        while True:
            attempt += 1
            try:
                return await rpc(request, timeout=self._remaining(deadline, method))
            except grpc.RpcError as exc:
                error = from_rpc_error(exc, attempts=attempt)
            delay = self._retry_delay(error, attempt, deadline)
            if delay is None:
                raise self._final(error, attempt) from None
            await asyncio.sleep(delay)

    async def server_live(self, *, timeout: float | None = None) -> bool:
        return (await self._call("ServerLive", pb.ServerLiveRequest(),
                                 self._deadline(timeout))).live

    async def server_ready(self, *, timeout: float | None = None) -> bool:
        return (await self._call("ServerReady", pb.ServerReadyRequest(),
                                 self._deadline(timeout))).ready

    async def model_ready(self, model: str, version: str = "", *,
                          timeout: float | None = None) -> bool:
        return (await self._call("ModelReady", pb.ModelReadyRequest(name=model, version=version),
                                 self._deadline(timeout))).ready

    async def server_metadata(self, *, timeout: float | None = None) -> pb.ServerMetadataResponse:
        return await self._call("ServerMetadata", pb.ServerMetadataRequest(),
                                self._deadline(timeout))

    async def wait_until_ready(self, timeout: float = 30.0, poll: float = 0.1) -> None:
        deadline = time.monotonic() + timeout
        last = "not ready"
        while True:
            try:
                if await self.server_ready(
                        timeout=max(0.05, min(1.0, deadline - time.monotonic()))):
                    return
            except (Unavailable, DeadlineExceeded) as exc:
                last = exc.message
            if time.monotonic() + poll >= deadline:
                raise Unavailable(grpc.StatusCode.UNAVAILABLE,
                                  f"server {self.target} not ready after {timeout} s ({last})")
            await asyncio.sleep(poll)

    async def model_info(self, model: str, version: str = "", *, timeout: float | None = None,
                         refresh: bool = False) -> ModelInfo:
        key = (model, version)
        if refresh or key not in self._infos:
            deadline = self._deadline(timeout)
            meta = await self._call("ModelMetadata",
                                    pb.ModelMetadataRequest(name=model, version=version), deadline)
            config = (await self._call("ModelConfig",
                                       pb.ModelConfigRequest(name=model, version=version),
                                       deadline)).config
            self._infos[key] = protocol.model_info(version, meta, config)
        return self._infos[key]

    async def _send_all(self, requests: list[pb.ModelInferRequest], deadline: float
                        ) -> list[pb.ModelInferResponse]:
        if len(requests) == 1:
            return [await self._call("ModelInfer", requests[0], deadline)]
        gate = asyncio.Semaphore(self.max_in_flight)

        async def one(req: pb.ModelInferRequest) -> pb.ModelInferResponse:
            async with gate:
                return await self._call("ModelInfer", req, deadline)

        return list(await asyncio.gather(*(one(r) for r in requests)))

    async def infer_request(self, request: pb.ModelInferRequest,
                            timeout: float | None = None) -> pb.ModelInferResponse:
        """One prepared ModelInferRequest, as is (the load generator's fast path)."""
        return await self._call("ModelInfer", request, self._deadline(timeout))

    async def infer_serialized(self, payload: bytes, timeout: float | None = None) -> bytes:
        """One ModelInferRequest already serialised; the serialised response, unparsed. No
        retries: every call counts once (``cnnctl bench``'s hot path; errors still arrive typed,
        from the gRPC status). ``timeout=None`` sends no deadline: the caller bounds the wait."""
        try:
            return await self._infer_raw(payload, timeout=timeout)
        except grpc.RpcError as exc:
            raise from_rpc_error(exc, attempts=1) from None

    async def predict(self, model: str, images: ImageLike | Sequence[ImageLike], *,
                      top_k: int = 5, return_logits: bool = False, version: str = "",
                      timeout: float | None = None) -> list[Prediction]:
        deadline = self._deadline(timeout)
        info = await self.model_info(model, version,
                                     timeout=self._remaining(deadline, "ModelMetadata"))
        top_k = protocol.check_top_k(top_k, info)
        requests = self._predict_requests(info, images)
        logits = self._join(info, requests, await self._send_all(requests, deadline))
        return protocol.predictions(logits, info, top_k, return_logits)

    async def infer(self, model: str, tensor: np.ndarray, *, version: str = "",
                    timeout: float | None = None) -> np.ndarray:
        deadline = self._deadline(timeout)
        info = await self.model_info(model, version,
                                     timeout=self._remaining(deadline, "ModelMetadata"))
        requests = self._tensor_requests(info, tensor)
        return self._join(info, requests, await self._send_all(requests, deadline))


class InferStream:
    """One ModelStreamInfer stream that carries serialised ModelInferRequests one at a time: each
    answer is read before the next request goes, so they come back in order. gRPC's per-call cost
    (a new HTTP/2 stream, its headers and trailers) is paid once per stream, not per request: on
    the 2-core bench machine a stream carried about twice the lenet5 batch-1 requests per second
    of separate ModelInfer calls (docs/benchmarks.md). No retries and no deadline per request.

    A failed request does not end the stream: the server answers it with an error message, which
    KServe v2 sends without a status code, so it raises ``ServerError`` (code UNKNOWN) with the
    server's message; a failure of the stream itself raises the class of its status code (when
    the server ends a stream while this client is writing to it, grpc's client core may report
    INTERNAL "Internal error from Core" instead of the server's status)."""

    def __init__(self, call: Any) -> None:
        self._call = call

    async def send(self, payload: bytes) -> pb.ModelInferResponse:
        """Send one serialised ModelInferRequest; its response."""
        try:
            await self._call.write(payload)
            answer = await self._call.read()
        except grpc.RpcError as exc:
            raise from_rpc_error(exc) from None
        except (asyncio.InvalidStateError, grpc.aio.UsageError):  # it ended before this request
            answer = grpc.aio.EOF
        if answer is grpc.aio.EOF:
            code = await self._call.code()
            if code is grpc.StatusCode.OK:
                raise Unavailable(grpc.StatusCode.UNAVAILABLE, "the server ended the stream")
            raise error_for(code, await self._call.details())
        message = pb.ModelStreamInferResponse.FromString(answer)
        if message.error_message:
            raise error_for(grpc.StatusCode.UNKNOWN, message.error_message)
        return message.infer_response

    async def close(self) -> None:
        """Tell the server no more requests come, and wait for the stream to end."""
        try:
            await self._call.done_writing()
            while await self._call.read() is not grpc.aio.EOF:
                pass
        except grpc.RpcError as exc:
            raise from_rpc_error(exc) from None


__all__ = ["Client", "AsyncClient", "InferStream", "ModelInfo", "Prediction", "balanced_target",
           "parse_url"]
