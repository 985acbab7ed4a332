"""Server configuration: one frozen dataclass, defaults in one place (how they were chosen:
docs/serving.md)."""

from __future__ import annotations

from dataclasses import dataclass

from cnnctl.errors import UsageError
from cnnctl.serving.shm import is_loopback_host

MODEL_CONTROL_MODES = ("none", "explicit", "poll")
DEVICES = ("auto", "cpu", "cuda")


@dataclass(frozen=True)
class BatchingConfig:
    enabled: bool = True
    # Images per model execution: large enough that a small model's per-call overhead is paid once
    # per many images, small enough that a costly model's batch still computes in tens of ms. It
    # also caps a request (INVALID_ARGUMENT beyond, as Triton), batching on or off.
    max_batch_size: int = 64
    # How long the oldest queued request may wait for company while an instance is idle (ms).
    # 0: batches are whatever queued while the instances were busy. A wait only slows a lone
    # client, who has no company to wait for; under load gathering (below) batches without it.
    max_queue_delay_ms: float = 0.0
    # Requests waiting per model, those whose images are being decoded included; beyond it
    # RESOURCE_EXHAUSTED.
    max_queue_size: int = 1024
    # A batch expected to compute in less than this (µs of CPU, a moving average per batch size;
    # a size not yet seen runs in the pool first) runs on the event loop thread instead of the
    # thread pool: handing a run to the pool and back costs the loop about this much, so a
    # cheaper batch delays the other requests less inline. Never on CUDA (repository.py), where
    # the thread's CPU time says nothing about the wait. 0 (and inline_full_below_us 0) = always
    # the pool.
    inline_below_us: float = 200.0
    # The same for a full batch (max_batch_size images or more, batching on or off): nothing
    # could join it, and a multi-threaded run handed to the pool costs far more under load (the
    # GIL going back and forth with the busy loop). Other batches keep the low threshold, so that
    # costly models still queue up behind a pooled run and batch. 0 = never.
    inline_full_below_us: float = 2000.0
    # Gathering (ms; 0 = off): with no queue delay, a cheap request that finds the model idle is
    # computed at once, so a small model would never batch. While requests keep arriving
    # (serving/policies.py: on once a probe gathers 16+ images, off when batches average fewer)
    # such a request waits instead; the batch goes when none has arrived for 1 ms, when it is
    # full, or after this long (at most half the time left to the earliest deadline in it).
    gather_max_ms: float = 10.0


@dataclass(frozen=True)
class LimitsConfig:
    """What a client can hold the server to (docs/security.md): past any of these it is refused
    at once, and the others are served as before."""

    # Pixels an encoded image may declare (read from its header before it is decoded), and all of
    # a request's images together: 4096x4096 takes a 12-megapixel photo; a 0.5 MB PNG can declare
    # 13000x13000 (830 MB decoded).
    max_image_pixels: int = 4096 * 4096
    max_request_pixels: int = 8192 * 8192
    # Requests accepted and not yet answered, all models together (MiB): each counts its message
    # and its float32 input and output.
    max_pending_mb: int = 512
    max_concurrent_rpcs: int = 1024  # beyond it gRPC answers RESOURCE_EXHAUSTED at once
    # Requests of one ModelStreamInfer stream read and not yet answered: the stream reads no more
    # until an answer is sent, so a client that does not read its answers holds only this many.
    max_stream_inflight: int = 128
    # Connections: the server pings one idle this long (s) and closes it if no answer comes in
    # keepalive_timeout_s; closes one idle (no calls) for max_connection_idle_s (0: never); a
    # client pinging more often than min_client_ping_interval_s is sent GOAWAY (too_many_pings);
    # a connection that has not finished its handshake in handshake_timeout_s is closed.
    keepalive_time_s: float = 60.0
    keepalive_timeout_s: float = 20.0
    max_connection_idle_s: float = 300.0
    min_client_ping_interval_s: float = 10.0
    handshake_timeout_s: float = 10.0
    # REST: an HTTP request's body must have arrived in full this long after its headers, or it is
    # answered 408 and its connection closed (a client sending slowly holds no request slot for
    # longer). A connection with no request in progress closes after max_connection_idle_s.
    request_read_timeout_s: float = 30.0

    @property
    def max_pending_bytes(self) -> int:
        return self.max_pending_mb * 1024 * 1024


@dataclass(frozen=True)
class ServerConfig:
    artifact_dirs: tuple[str, ...] = ()
    repository: str | None = None  # a directory of artifact directories
    host: str = "127.0.0.1"  # --host 0.0.0.0 to serve other machines
    port: int = 8001  # Triton's gRPC port; 0 picks a free one
    # The v2 REST endpoint (serving/http.py) on --host beside gRPC: Triton's HTTP port; 0 picks a
    # free one; None: off.
    http_port: int | None = 8000
    batching: BatchingConfig = BatchingConfig()
    limits: LimitsConfig = LimitsConfig()
    instances: int = 1  # model executions in flight at once per model
    device: str = "auto"  # auto | cpu | cuda
    intra_op_threads: int = 0  # ORT threads for big batches (runtime.py); 0 = cores / instances
    metrics_port: int | None = None  # Prometheus /metrics over HTTP; None = off
    # Its own address, not --host: serving other machines need not publish the metrics to them.
    metrics_host: str = "127.0.0.1"
    tls_cert: str | None = None
    tls_key: str | None = None
    tls_client_ca: str | None = None  # PEM: clients must present a certificate it signed
    reflection: bool = True  # gRPC server reflection (lists the services and their messages)
    workers: int = 1  # server processes sharing the port (SO_REUSEPORT)
    reuse_port: bool = False  # set for --workers; otherwise a second server on the port fails
    max_message_mb: int = 64  # largest request or response message (MiB)
    grace_s: float = 30.0  # how long shutdown waits for in-flight and queued requests (s)
    # After the signal, with health already NOT_SERVING, keep answering new arrivals this long (s):
    # load balancers and Kubernetes endpoints take time to stop sending, and requests sent just
    # before the signal may still be in transit (server.py, shutdown step 2).
    drain_delay_s: float = 0.5
    # Close each client connection after this long (s; 0 = never): clients reconnect, and their
    # calls spread over replicas added since. Calls in flight get grace_s to finish.
    max_connection_age_s: float = 0.0
    # Triton's system shared-memory extension (serving/shm.py): off unless asked for, as Triton's
    # --allow-client-shm; then loopback clients only, each to its own user's objects and regions.
    allow_shared_memory: bool = False
    # Shared memory with a --host that other machines may reach: refused unless this is set.
    # Remote peers are refused either way; what it admits is the risk of a relay on this host
    # (proxy, tunnel) making remote clients look local.
    allow_shared_memory_non_loopback_host: bool = False
    # Regions per client user: each holds one descriptor (and no memory: shm.py).
    max_shared_memory_regions: int = 64
    shm_dir: str | None = None  # set for --workers: where the workers share their registrations
    # Model control (repository.py), as Triton's --model-control-mode: none | explicit | poll.
    model_control_mode: str = "none"
    repository_poll_secs: float = 15.0  # poll mode: how often the repository is rescanned (s)
    load_models: tuple[str, ...] = ()  # explicit mode: the repository models loaded at start
    # Run each artifact's golden set at load (readiness.py); off: ready once warmed up.
    golden_check: bool = True

    def __post_init__(self) -> None:
        if not 0 <= self.drain_delay_s <= self.grace_s:
            raise UsageError(f"--drain-delay-s {self.drain_delay_s:g} must be between 0 and "
                             f"--grace-s ({self.grace_s:g}): the delay is part of the grace period")
        if self.max_connection_age_s < 0:
            raise UsageError(f"--max-connection-age-s {self.max_connection_age_s:g} must be 0 "
                             f"(never) or positive seconds")
        if self.tls_client_ca and not (self.tls_cert and self.tls_key):
            raise UsageError("--tls-client-ca needs --tls-cert and --tls-key: client "
                             "certificates are checked only over TLS")
        if (self.allow_shared_memory and not self.allow_shared_memory_non_loopback_host
                and not is_loopback_host(self.host)):
            raise UsageError(f"--allow-shared-memory with --host {self.host}, which other "
                             f"machines may reach: shared memory is for clients on this host; "
                             f"use a loopback --host, or add "
                             f"--allow-shared-memory-non-loopback-host (remote peers are still "
                             f"refused)")
        if self.model_control_mode not in MODEL_CONTROL_MODES:
            raise UsageError(f"--model-control-mode {self.model_control_mode!r} is not one of "
                             f"{', '.join(MODEL_CONTROL_MODES)}")
        if self.model_control_mode == "poll" and not self.repository:
            raise UsageError("--model-control-mode poll needs --repository DIR (the directory "
                             "it rescans)")
        if self.load_models and not (self.model_control_mode == "explicit" and self.repository):
            raise UsageError("--load-model goes with --model-control-mode explicit and "
                             "--repository DIR (the other modes load every repository model)")
        if self.model_control_mode == "explicit" and self.workers > 1:
            raise UsageError("--model-control-mode explicit with --workers: a load request "
                             "reaches one worker only; use poll mode (each worker rescans "
                             "the repository) or one worker")
        if not self.repository_poll_secs > 0:
            raise UsageError(f"--repository-poll-secs must be positive, got "
                             f"{self.repository_poll_secs}")
        if self.max_shared_memory_regions < 1:
            raise UsageError(f"max_shared_memory_regions must be at least 1, got "
                             f"{self.max_shared_memory_regions}")

    @property
    def max_message_bytes(self) -> int:
        return self.max_message_mb * 1024 * 1024
