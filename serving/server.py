"""The gRPC server: create_server(config) -> (server, port), and serve() until SIGTERM/SIGINT.

Graceful shutdown, in order (all within grace_s):
1. health goes NOT_SERVING (all names but ``live``) and ServerReady false, so balancers stop
   sending;
2. for drain_delay_s everything that arrives is still answered: requests a client sent just
   before the signal may still be on the wire or waiting in gRPC's queue of calls not yet handed
   to a handler, and grpc's own stop() would cancel those;
3. new inference requests are refused (UNAVAILABLE) and the server waits until every accepted one
   is answered, the batch queues included (the batchers keep running);
4. the gRPC server stops, the batchers are drained and the ORT thread pools closed.
The HTTP endpoint (http.py) follows the same steps: /v2/health/ready says false from step 1, new
infers get 503 from step 3, and its port closes with gRPC's in step 4.
"""

from __future__ import annotations

import asyncio
import dataclasses
import gc
import logging
import signal
import threading
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import grpc
from google.protobuf import descriptor, descriptor_pool
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from cnnctl import malloc
from cnnctl.errors import UsageError
from cnnctl.protos import grpc_service_pb2 as pb
from cnnctl.protos import grpc_service_pb2_grpc as pb_grpc
from cnnctl.serving.config import ServerConfig
from cnnctl.serving.http import HttpFrontend
from cnnctl.serving.metrics import ServerMetrics
from cnnctl.serving.repository import ModelRepository
from cnnctl.serving.servicer import InferenceServicer, lenient

log = logging.getLogger(__name__)

SERVICE_NAME = pb.DESCRIPTOR.services_by_name["GRPCInferenceService"].full_name
# The health service name for liveness: SERVING from start until the process exits, draining
# included (Kubernetes' liveness probe must not kill a pod that is draining). Every other name
# ("", the service, each model) means ready to take requests.
LIVE = "live"
RESERVED_HEALTH_NAMES = frozenset({"", LIVE, SERVICE_NAME})
# At shutdown, once every request taken in is answered: how long gRPC may still take to send the
# last answers before it cancels the calls it holds (s).
FLUSH_S = 5.0


@dataclass
class InferenceServer:
    config: ServerConfig
    grpc_server: grpc.aio.Server
    repository: ModelRepository
    servicer: InferenceServicer
    health: health.aio.HealthServicer
    metrics: ServerMetrics
    port: int
    http: HttpFrontend | None = None  # the REST endpoint; None with --no-http
    _stopped: bool = False

    _health_names: set[str] = dataclasses.field(default_factory=set)
    _health_task: asyncio.Task[None] | None = None

    @property
    def http_port(self) -> int | None:
        return self.http.port if self.http is not None else None

    async def start(self) -> None:
        self.repository.start()
        await self.grpc_server.start()
        if self.http is not None:
            await self.http.start()
        await self.health.set(LIVE, health_pb2.HealthCheckResponse.SERVING)
        await self._sync_health()
        # Model control changes the served set: per-model health follows it.
        self.repository.listeners.append(self._health_changed)

    def _health_changed(self) -> None:
        if self._health_task is None or self._health_task.done():
            self._health_task = asyncio.ensure_future(self._sync_health())
        else:  # one more pass after the running one, for what changed meanwhile
            self._health_task.add_done_callback(lambda _: self._health_changed())

    async def _sync_health(self) -> None:
        """Overall health: SERVING while every model the server was told to serve is ready
        (as ServerReady); each model name: SERVING while a version of it is ready."""
        if self._stopped or self.servicer.draining:
            return
        serving, not_serving = (health_pb2.HealthCheckResponse.SERVING,
                                health_pb2.HealthCheckResponse.NOT_SERVING)
        overall = serving if self.repository.ready() else not_serving
        # The model names besides the server-wide ones ("", the service, "live").
        ready = {m.name for m in self.repository if m.ready} - RESERVED_HEALTH_NAMES
        self._health_names |= ready
        updates = [("", overall), (SERVICE_NAME, overall),
                   *((name, serving if name in ready else not_serving)
                     for name in sorted(self._health_names))]
        for name, status in updates:
            # Each set may wait on a health watcher: a shutdown that began meanwhile wins.
            if self.servicer.draining:
                return
            await self.health.set(name, status)

    async def stop(self, grace: float | None = None, linger: float | None = None) -> None:
        """Stop accepting, answer everything in flight and queued, release the models."""
        if self._stopped:
            return
        loop = asyncio.get_running_loop()
        grace = self.config.grace_s if grace is None else grace
        linger = self.config.drain_delay_s if linger is None else linger
        end = loop.time() + grace
        self.servicer.draining = True
        self.repository.closing = True
        if self._health_task is not None and not self._health_task.done():
            await asyncio.shield(self._health_task)  # it stops at its next set: draining
        names = {"", SERVICE_NAME, *self._health_names, *self.repository.names()}
        for name in sorted(names - {LIVE}):
            await self.health.set(name, health_pb2.HealthCheckResponse.NOT_SERVING)
        await asyncio.sleep(min(linger, grace))
        self.servicer.stop_accepting()
        try:
            await asyncio.wait_for(self.servicer.wait_idle(), max(0.0, end - loop.time()))
            # Open streams end by themselves once their requests are answered (servicer.py).
            await asyncio.wait_for(self.servicer.wait_streams_closed(),
                                   max(0.0, end - loop.time()))
        except asyncio.TimeoutError:  # not the builtin TimeoutError before Python 3.11
            log.warning("grace period over with %d requests unanswered", self.servicer.active)
        if self.http is not None:
            await self.http.stop()
        # Every request we took in is answered. What gRPC still holds is an answer on its way
        # out, or a call that arrived as the shutdown began and that it will never hand to a
        # handler, which it would keep until the grace period ends: so only FLUSH_S more.
        await self.grpc_server.stop(min(FLUSH_S, max(0.0, end - loop.time())))
        self.servicer.close()
        await self.repository.drain()
        self._stopped = True


def _credentials(config: ServerConfig) -> grpc.ServerCredentials | None:
    if not config.tls_cert and not config.tls_key:
        return None
    if not (config.tls_cert and config.tls_key):
        raise UsageError("--tls-cert and --tls-key go together; give both or neither")
    try:
        key = Path(config.tls_key).read_bytes()
        cert = Path(config.tls_cert).read_bytes()
        client_ca = Path(config.tls_client_ca).read_bytes() if config.tls_client_ca else None
    except OSError as exc:
        raise UsageError(f"cannot read TLS file: {exc}") from None
    # With a client CA, a client without a certificate it signed fails the handshake.
    return grpc.ssl_server_credentials([(key, cert)], root_certificates=client_ca,
                                       require_client_auth=client_ca is not None)


class _LenientParsing:
    """What the generated ``add_..._to_server`` registers with, every request deserializer made
    lenient (servicer.py): a malformed message is then INVALID_ARGUMENT, not UNKNOWN."""

    def __init__(self, server: grpc.aio.Server) -> None:
        self._server = server

    def add_generic_rpc_handlers(self, handlers: object) -> None:
        pass  # the same handlers come again, by name, in add_registered_method_handlers

    def add_registered_method_handlers(self, service: str,
                                       handlers: dict[str, grpc.RpcMethodHandler]) -> None:
        handlers = {
            name: h._replace(request_deserializer=lenient(  # type: ignore[attr-defined]
                h.request_deserializer, f"{name} request"))
            for name, h in handlers.items()}
        self._server.add_generic_rpc_handlers(
            (grpc.method_handlers_generic_handler(service, handlers),))
        self._server.add_registered_method_handlers(service, handlers)


def _reflection_pool() -> descriptor_pool.DescriptorPool:
    """The files reflection describes: ours live in cnnctl's own pool (protos/__init__.py),
    health's and reflection's in protobuf's default one; reflection reads a single pool."""
    from grpc_reflection.v1alpha import reflection_pb2

    pool = descriptor_pool.DescriptorPool()
    added: set[str] = set()

    def add(file: descriptor.FileDescriptor) -> None:
        if file.name in added:
            return
        for dependency in file.dependencies:
            add(dependency)
        pool.AddSerializedFile(file.serialized_pb)
        added.add(file.name)

    for file in (pb.DESCRIPTOR, health_pb2.DESCRIPTOR, reflection_pb2.DESCRIPTOR):
        add(file)
    return pool


def _ms(seconds: float) -> int:
    return max(1, round(seconds * 1000))


async def create_server(config: ServerConfig,
                        metrics: ServerMetrics | None = None) -> tuple[InferenceServer, int]:
    """Load the models and bind the port; the caller starts it (``await server.start()``)."""
    metrics = metrics or ServerMetrics()
    # Pillow warns (once per process, on stderr) of images over its size limit; ours is checked
    # from the header and refuses them with INVALID_ARGUMENT (export/image.py).
    warnings.filterwarnings("ignore", message=r"Image size \(\d+ pixels\) exceeds limit")
    repository = ModelRepository.load(config, metrics)
    limits = config.limits
    options = [
        ("grpc.max_receive_message_length", config.max_message_bytes),
        ("grpc.max_send_message_length", config.max_message_bytes),
        # Only --workers shares the port; otherwise a second server on a busy port must fail.
        ("grpc.so_reuseport", 1 if config.reuse_port else 0),
        # Connections that hold resources and do nothing (LimitsConfig says which).
        ("grpc.keepalive_time_ms", _ms(limits.keepalive_time_s)),
        ("grpc.keepalive_timeout_ms", _ms(limits.keepalive_timeout_s)),
        ("grpc.http2.min_recv_ping_interval_without_data_ms",
         _ms(limits.min_client_ping_interval_s)),
        ("grpc.http2.max_ping_strikes", 2),
        ("grpc.server_handshake_timeout_ms", _ms(limits.handshake_timeout_s)),
    ]
    if limits.max_connection_idle_s > 0:
        options.append(("grpc.max_connection_idle_ms", _ms(limits.max_connection_idle_s)))
    if config.max_connection_age_s > 0:
        options += [("grpc.max_connection_age_ms", _ms(config.max_connection_age_s)),
                    ("grpc.max_connection_age_grace_ms", _ms(config.grace_s))]
    server = grpc.aio.server(options=options,
                             maximum_concurrent_rpcs=limits.max_concurrent_rpcs)
    address = f"{config.host}:{config.port}"
    credentials = _credentials(config)
    try:
        if credentials is None:
            port = server.add_insecure_port(address)
        else:
            port = server.add_secure_port(address, credentials)
    except RuntimeError as exc:
        raise UsageError(f"cannot listen on {address}: {exc}") from None
    if port == 0:
        raise UsageError(f"cannot listen on {address} (in use, or not an address of this host)")
    servicer = InferenceServicer(repository, config, port)
    pb_grpc.add_GRPCInferenceServiceServicer_to_server(servicer, _LenientParsing(server))
    health_servicer = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    if config.reflection:
        reflection.enable_server_reflection(
            (SERVICE_NAME, health.SERVICE_NAME, reflection.SERVICE_NAME), server,
            pool=_reflection_pool())
    http = None
    if config.http_port is not None:
        http = HttpFrontend(servicer, config, metrics.read_registry())
        http.bind()
    return InferenceServer(config, server, repository, servicer, health_servicer, metrics,
                           port, http), port


# glibc malloc (cnnctl/malloc.py): left to itself glibc raises its thresholds only after freeing a
# big block, so whether every 256 KiB request payload (lenet5, batch 64) cost an mmap, 64 page
# faults and an munmap depended on what start-up happened to free: 28% of batch-64 throughput
# (docs/benchmarks.md).
MMAP_THRESHOLD = 4 << 20
TRIM_THRESHOLD = 32 << 20


async def serve(config: ServerConfig, announce: bool = True,
                on_started: Callable[[str], None] | None = None) -> None:
    """Run until SIGTERM or SIGINT, then shut down gracefully."""
    malloc.keep_freed_memory(MMAP_THRESHOLD, TRIM_THRESHOLD)
    server, port = await create_server(config)
    # Everything loaded so far (modules, sessions, protobuf descriptors) lives as long as the
    # process; frozen, a full collection no longer walks it and pauses the event loop for ms.
    gc.collect()
    gc.freeze()
    metrics_server = None
    if config.metrics_port is not None:
        from prometheus_client import start_http_server

        metrics_server, _ = start_http_server(config.metrics_port, addr=config.metrics_host,
                                              registry=server.metrics.read_registry())
    loop = asyncio.get_running_loop()
    stop_requested = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop_requested.set)
    await server.start()
    models = "; ".join(
        f"model {m.name} version {m.version} on {m.runtime.info.provider} "
        f"({m.runtime.info.precision}, {m.runtime.info.intra_op_threads} intra-op threads)"
        for m in server.repository)
    if announce:
        scheme = "grpcs" if config.tls_cert else "grpc"
        for m in server.repository:
            info = m.runtime.info
            print(f"serving model {m.name} version {m.version} on {info.provider} "
                  f"({info.precision}, {info.intra_op_threads} intra-op threads)", flush=True)
        extra = (f"; metrics on http://{config.metrics_host}:{metrics_server.server_port}"
                 f"/metrics"
                 if metrics_server else "")
        web = ""
        if server.http is not None:
            http = "https" if config.tls_cert else "http"
            web = f" and {http}://{config.host}:{server.http_port}"
        print(f"listening on {scheme}://{config.host}:{port}{web}{extra}", flush=True)
    if on_started is not None:
        on_started(f"serving {models}")
    await stop_requested.wait()
    log.info("signal received: draining (grace %.0f s)", config.grace_s)
    await server.stop()
    if metrics_server is not None:
        metrics_server.shutdown()
    log.info("stopped")


class ServerThread:
    """A started server on an event loop of its own thread, so that the calling thread can be its
    client (``cnnctl demo``, tests); ``stop()`` drains it."""

    def __init__(self, config: ServerConfig, timeout: float = 60.0) -> None:
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, name="cnnctl-server",
                                        daemon=True)
        self._thread.start()

        async def start() -> tuple[InferenceServer, int]:
            server, port = await create_server(config)
            await server.start()
            return server, port

        try:
            self.server, self.port = asyncio.run_coroutine_threadsafe(start(), self.loop).result(
                timeout)
        except BaseException:
            self._stop_loop()
            raise
        self.address = f"{config.host}:{self.port}"

    def stop(self, grace: float = 5.0) -> None:
        try:
            asyncio.run_coroutine_threadsafe(self.server.stop(grace=grace), self.loop).result(
                grace + 30)
        finally:
            self._stop_loop()

    def _stop_loop(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(10)
        self.loop.close()

    def __enter__(self) -> ServerThread:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()
