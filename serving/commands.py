"""``cnnctl serve``: the click command. Heavy imports (grpc, onnxruntime) happen inside it."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import click

from cnnctl.errors import UsageError
from cnnctl.serving.config import (
    DEVICES, MODEL_CONTROL_MODES, BatchingConfig, LimitsConfig, ServerConfig,
)

_DEFAULT = ServerConfig()
_BATCH = BatchingConfig()
_LIMITS = LimitsConfig()
_COUNT = click.IntRange(min=1)
_NONNEG = click.FloatRange(min=0)


_POSITIVE = click.FloatRange(min=0, min_open=True)
# What a client may hold the server to (LimitsConfig; docs/security.md): option -> help.
_LIMIT_HELP = {
    "max_image_pixels": (_COUNT, "Refuse an encoded image that declares more pixels (read from "
                         "its header, before decoding)."),
    "max_request_pixels": (_COUNT, "The same for all the images of one request."),
    "max_pending_mb": (_COUNT, "MiB of requests accepted and not yet answered, all models "
                       "together (message, input and output); beyond it RESOURCE_EXHAUSTED."),
    "max_concurrent_rpcs": (_COUNT, "RPCs in progress at once (open streams included); beyond "
                            "it RESOURCE_EXHAUSTED."),
    "max_stream_inflight": (_COUNT, "Requests of one stream read and not yet answered; the "
                            "stream reads no more until an answer is sent."),
    "keepalive_time_s": (_POSITIVE, "Ping a connection idle this long, to find dead peers."),
    "keepalive_timeout_s": (_POSITIVE, "Close a connection whose ping is not answered in this "
                            "long."),
    "max_connection_idle_s": (_NONNEG, "Close a connection with no calls for this long "
                              "(clients reconnect on their next call); 0 = never."),
    "min_client_ping_interval_s": (_NONNEG, "Send GOAWAY to a client that pings more often "
                                   "than this without calls in flight."),
    "handshake_timeout_s": (_POSITIVE, "Close a connection that has not finished its "
                            "HTTP/2 (and TLS) handshake in this long."),
    "request_read_timeout_s": (_POSITIVE, "REST: answer 408 and close the connection when a "
                               "request's body has not arrived in full this long after its "
                               "headers."),
}


def _limit_options(command: Callable[..., Any]) -> Callable[..., Any]:
    for field, (kind, text) in reversed(_LIMIT_HELP.items()):
        flag = "--" + field.replace("_", "-")
        command = click.option(flag, field, type=kind, default=getattr(_LIMITS, field),
                               show_default=True, help=text)(command)
    return command


@click.command("serve")
@click.argument("artifact_dirs", nargs=-1, type=click.Path(file_okay=False))
@click.option("--repository", type=click.Path(file_okay=False), default=None,
              help="Serve the models in DIR: DIR/NAME/ holds one artifact, or one per version "
              "(DIR/NAME/<version>/); DIR/NAME/config.pbtxt may set Triton's version_policy "
              "(default: the latest version).")
@click.option("--model-control-mode", type=click.Choice(MODEL_CONTROL_MODES),
              default=_DEFAULT.model_control_mode, show_default=True,
              help="none: serve what start-up loads (a model that fails stops it). explicit: "
              "load and unload on RepositoryModelLoad/Unload requests. poll: rescan "
              "--repository and load, swap and unload versions as they appear and go. Loads "
              "run beside serving; a new version is swapped in only once warmed up and "
              "verified.")
@click.option("--repository-poll-secs", type=_POSITIVE, default=_DEFAULT.repository_poll_secs,
              show_default=True, help="Poll mode: seconds between rescans of --repository; a "
              "version is loaded once its files are unchanged for one interval.")
@click.option("--load-model", "load_models", multiple=True, metavar="NAME",
              help="Explicit mode: a --repository model to load at start-up (repeatable); "
              "others wait for a load request.")
@click.option("--golden-check/--no-golden-check", default=_DEFAULT.golden_check,
              show_default=True, help="At every load, run the artifact's golden set on the "
              "provider and precision it will serve with; the model is ready only if the "
              "answers match.")
@click.option("--host", default=_DEFAULT.host, show_default=True)
@click.option("--port", type=click.IntRange(0, 65535), default=_DEFAULT.port, show_default=True,
              help="0 picks a free port (printed at startup).")
@click.option("--http-port", type=click.IntRange(0, 65535), default=_DEFAULT.http_port,
              show_default=True, help="The v2 REST endpoint (curl, HTTP probes, KServe's REST "
              "path) on --host; 0 picks a free port (printed at startup).")
@click.option("--no-http", is_flag=True, default=False, help="Serve gRPC only.")
@click.option("--max-batch-size", type=_COUNT, default=_BATCH.max_batch_size, show_default=True,
              help="Images per merged model execution.")
@click.option("--max-queue-delay-ms", type=_NONNEG, default=_BATCH.max_queue_delay_ms,
              show_default=True, help="How long the oldest request may wait for a fuller batch "
              "while an instance is idle.")
@click.option("--max-queue-size", type=_COUNT, default=_BATCH.max_queue_size, show_default=True,
              help="Requests queued per model before RESOURCE_EXHAUSTED.")
@click.option("--inline-below-us", type=_NONNEG, default=_BATCH.inline_below_us, show_default=True,
              help="Run batches expected to compute faster than this (µs of CPU) on the event "
              "loop instead of handing them to the thread pool (0, with --inline-full-below-us "
              "0: always the pool).")
@click.option("--inline-full-below-us", type=_NONNEG, default=_BATCH.inline_full_below_us,
              show_default=True, help="The same for full batches (--max-batch-size images or "
              "more), which no other request could join; 0 = always the pool.")
@click.option("--gather-max-ms", type=_NONNEG, default=_BATCH.gather_max_ms, show_default=True,
              help="Under load, let a cheap request that finds the model idle wait up to this "
              "long while new requests keep arriving, so that small models batch too (used only "
              "while it forms batches of 16+ images); 0 = off.")
@click.option("--dynamic-batching/--no-dynamic-batching", default=True, show_default=True,
              help="Off: every request runs as its own execution.")
@click.option("--instances", type=_COUNT, default=_DEFAULT.instances, show_default=True,
              help="Model executions in flight at once per model.")
@click.option("--intra-op-threads", type=click.IntRange(min=0), default=0,
              help="ONNX Runtime threads for big batches (0: cores / instances); small "
              "batches use 1.")
@click.option("--device", type=click.Choice(DEVICES), default=_DEFAULT.device, show_default=True)
@click.option("--metrics-port", type=int, default=None, help="Serve Prometheus /metrics here.")
@click.option("--metrics-host", default=_DEFAULT.metrics_host, show_default=True,
              help="Address /metrics listens on, whatever --host is (0.0.0.0: every machine "
              "that reaches this one may read the metrics).")
@click.option("--tls-cert", type=click.Path(dir_okay=False), default=None)
@click.option("--tls-key", type=click.Path(dir_okay=False), default=None)
@click.option("--tls-client-ca", type=click.Path(dir_okay=False), default=None,
              help="PEM of the CAs whose client certificates are accepted: clients without one "
              "are refused at the handshake (mutual TLS; needs --tls-cert/--tls-key).")
@click.option("--reflection/--no-reflection", default=_DEFAULT.reflection, show_default=True,
              help="gRPC server reflection (grpcurl and similar tools list the services).")
@click.option("--workers", type=_COUNT, default=_DEFAULT.workers, show_default=True,
              help="Server processes sharing the port (SO_REUSEPORT).")
@click.option("--max-message-mb", type=_COUNT, default=_DEFAULT.max_message_mb, show_default=True,
              help="Largest request/response message (MiB); larger ones get RESOURCE_EXHAUSTED.")
@click.option("--grace-s", type=float, default=_DEFAULT.grace_s, show_default=True,
              help="On SIGTERM/SIGINT, how long to wait for in-flight and queued requests.")
@click.option("--drain-delay-s", type=float, default=_DEFAULT.drain_delay_s, show_default=True,
              help="On SIGTERM/SIGINT: health turns NOT_SERVING at once, and the server keeps "
              "answering new requests this long (so load balancers stop sending) before it "
              "refuses them and drains. Part of --grace-s.")
@click.option("--max-connection-age-s", type=float, default=_DEFAULT.max_connection_age_s,
              show_default=True, help="Close client connections after this long (0: never), so "
              "long-lived gRPC connections spread over replicas added since; calls in flight "
              "get --grace-s to finish.")
@click.option("--allow-shared-memory", is_flag=True, default=False,
              help="Let clients on this host register POSIX shared-memory regions and pass "
              "tensors through them (Triton's system shared-memory extension; Triton's "
              "--allow-client-shm). Only clients connecting through a loopback address, each "
              "to the objects and regions of its own Unix user.")
@click.option("--allow-shared-memory-non-loopback-host", is_flag=True, default=False,
              help="Allow --allow-shared-memory with a --host that other machines can reach. "
              "Remote peers are still refused, but a proxy or tunnel on this host makes remote "
              "clients look local, with the relaying process's user.")
@click.option("--max-shared-memory-regions", type=_COUNT,
              default=_DEFAULT.max_shared_memory_regions, show_default=True,
              help="Shared-memory regions each client user may register (one open descriptor "
              "each); beyond it RESOURCE_EXHAUSTED.")
@_limit_options
def serve(artifact_dirs: tuple[str, ...], repository: str | None, model_control_mode: str,
          repository_poll_secs: float, load_models: tuple[str, ...], golden_check: bool,
          host: str, port: int, http_port: int, no_http: bool,
          max_batch_size: int, max_queue_delay_ms: float, max_queue_size: int,
          inline_below_us: float, inline_full_below_us: float, gather_max_ms: float,
          dynamic_batching: bool,
          instances: int, intra_op_threads: int, device: str,
          metrics_port: int | None, metrics_host: str, tls_cert: str | None,
          tls_key: str | None, tls_client_ca: str | None, reflection: bool, workers: int,
          max_message_mb: int, grace_s: float, drain_delay_s: float,
          max_connection_age_s: float, allow_shared_memory: bool,
          allow_shared_memory_non_loopback_host: bool, max_shared_memory_regions: int,
          **limits: Any) -> None:
    """Serve exported artifacts over the KServe v2 protocol, gRPC and REST (Triton-compatible)."""
    if bool(tls_cert) != bool(tls_key):
        raise UsageError("--tls-cert and --tls-key go together; give both or neither")
    if not artifact_dirs and not repository:
        raise UsageError("nothing to serve: give ARTIFACT_DIR arguments or --repository DIR"
                         + (" (the models that explicit model control may load)"
                            if model_control_mode == "explicit" else ""))
    config = ServerConfig(
        artifact_dirs=tuple(artifact_dirs), repository=repository,
        model_control_mode=model_control_mode, repository_poll_secs=repository_poll_secs,
        load_models=tuple(load_models), golden_check=golden_check, host=host, port=port,
        http_port=None if no_http else http_port,
        batching=BatchingConfig(enabled=dynamic_batching, max_batch_size=max_batch_size,
                                max_queue_delay_ms=max_queue_delay_ms,
                                max_queue_size=max_queue_size,
                                inline_below_us=inline_below_us,
                                inline_full_below_us=inline_full_below_us,
                                gather_max_ms=gather_max_ms),
        limits=LimitsConfig(**limits),
        instances=instances, device=device, intra_op_threads=intra_op_threads,
        metrics_port=metrics_port, metrics_host=metrics_host, tls_cert=tls_cert,
        tls_key=tls_key, tls_client_ca=tls_client_ca, reflection=reflection, workers=workers,
        reuse_port=workers > 1, max_message_mb=max_message_mb, grace_s=grace_s,
        drain_delay_s=drain_delay_s, max_connection_age_s=max_connection_age_s,
        allow_shared_memory=allow_shared_memory,
        allow_shared_memory_non_loopback_host=allow_shared_memory_non_loopback_host,
        max_shared_memory_regions=max_shared_memory_regions)
    if workers > 1:
        from cnnctl.serving.workers import run_workers

        raise SystemExit(run_workers(config))
    import asyncio

    from cnnctl.serving.server import serve as run

    asyncio.run(run(config))
