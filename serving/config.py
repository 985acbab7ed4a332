"""Server configuration: one frozen dataclass, defaults in one place (chosen by measurement, see
docs/serving.md "Choosing the defaults")."""

from __future__ import annotations

from dataclasses import dataclass

DEVICES = ("auto", "cpu", "cuda")


@dataclass(frozen=True)
class BatchingConfig:
    enabled: bool = True
    # Images per model execution. 64 keeps lenet5's per-image cost at its floor on the CPU (the
    # ORT call overhead, ~40 µs, is paid once per batch) while one batch of cifar-net-v3 still
    # computes in ~60 ms; a request larger than this runs as a batch of its own, never split.
    max_batch_size: int = 64
    # How long the oldest queued request may wait for company while an instance is idle (ms).
    # 0: batches are whatever queued while the instances were busy. Measured (docs/serving.md):
    # 0.5 ms halves lenet5's batch-1 throughput at concurrency 1 (a closed-loop client has no
    # company to wait for) and gains nothing clear at concurrency 64.
    max_queue_delay_ms: float = 0.0
    max_queue_size: int = 1024  # requests waiting per model; beyond it RESOURCE_EXHAUSTED
    # A batch expected to compute in less than this (µs of CPU, a moving average per batch size;
    # a size not yet seen runs in the pool first) runs on the event loop thread instead of the
    # ORT thread pool. The hand-off to the pool and back costs ~120-140 µs of CPU per batch
    # (measured: a do-nothing gRPC server's CPU per request rose from 493 to 614 µs at
    # concurrency 1, 389 to 531 at 8, when it added one run_in_executor), and a gRPC call costs
    # the loop ~400 µs of its own, so a batch shorter than this delays the others less than one
    # more call would. lenet5 batches up to ~8 images stay inline; cifar-net-v3 (~700 µs an
    # image) never does. Measured end to end (docs/serving.md): 0 → 200 µs cut lenet5's server
    # CPU per batch-1 request by 50-190 µs. Never on CUDA (repository.py): there the thread's
    # CPU time says nothing about the wait. 0 (and inline_full_below_us 0) = always the pool.
    inline_below_us: float = 200.0
    # The same for a full batch (max_batch_size images or more, batching on or off: nothing could
    # join it). Handing a multi-threaded ORT run to the pool and back costs far more under load
    # than the ~130 µs above: measured 600-900 µs of server CPU per lenet5 batch of 64
    # (2,700-3,200 vs 2,150-2,300 µs per request at concurrency 8, the GIL going back and forth
    # between the loop and the ORT thread while gRPC keeps the loop busy), so a full batch that
    # computes within 2 ms runs on the loop: the loop is blocked at most that long, and there was
    # no batching to wait for. Other batches keep the low threshold, so that costly models
    # (cifar-net-v3: ~700 µs an image) still queue up behind a pooled run and batch under load.
    # 0 = never.
    inline_full_below_us: float = 2000.0
    # Gathering under load (ms; 0 = off). With no queue delay, a cheap request that finds the
    # model idle is computed at once on the loop, so a small model never batched: nothing ever
    # queued behind a run. Gathering lets such a request wait instead while new requests keep
    # arriving, and sends the batch when none has arrived for 1 ms (nothing more is coming), as
    # soon as every client the last gathered batches answered is back (a closed-loop group of up
    # to 16: batcher.py), when it is full, or after this long (or at half the earliest deadline
    # in it). It is used only while it pays (batcher.py): a probe (0.1 s after the last, the wait
    # doubling up to 0.8 s while they fail) turns it on when it gathers 6+ images, and it stays
    # on while its batches average 5+, so a lone client or a few barely ever wait. Measured on
    # lenet5 batch-1 requests (docs/serving.md): at concurrency 64 batches of 32-58 images and
    # +31-55% throughput against the rule before (2026-11-29; 17-20 images and +10-45% against
    # no gathering on 2026-11-23, when 20 ms gave +15-39% with p99 up by a few more ms, hence
    # 10); sent as soon as everyone is back: +9% / +17% at concurrency 8 (perf_analyzer / ours)
    # and +35% at 16, -5% at 32 and -3-4% at 64 against the quiet period alone (2026-11-29).
    gather_max_ms: float = 10.0


@dataclass(frozen=True)
class ServerConfig:
    artifact_dirs: tuple[str, ...] = ()
    repository: str | None = None  # a directory of artifact directories
    host: str = "127.0.0.1"  # --host 0.0.0.0 to serve other machines
    port: int = 8001  # Triton's gRPC port; 0 picks a free one
    batching: BatchingConfig = BatchingConfig()
    instances: int = 1  # model executions in flight at once per model
    device: str = "auto"  # auto | cpu | cuda
    intra_op_threads: int = 0  # ORT threads for big batches (runtime.py); 0 = cores / instances
    metrics_port: int | None = None  # Prometheus /metrics over HTTP; None = off
    tls_cert: str | None = None
    tls_key: str | None = None
    workers: int = 1  # server processes sharing the port (SO_REUSEPORT)
    reuse_port: bool = False  # set for --workers; otherwise a second server on the port fails
    max_message_mb: int = 64  # largest request or response message (MiB)
    grace_s: float = 30.0  # how long shutdown waits for in-flight and queued requests (s)
    # After the signal, keep answering new arrivals this long (s): requests sent just before it may
    # still be in transit or in gRPC's not-yet-dispatched queue (server.py, shutdown step 2).
    drain_linger_s: float = 0.5
    # Triton's system shared-memory extension (serving/shm.py): off unless asked for, as Triton's
    # --allow-client-shm, since a client could then map any shared-memory object we may open.
    allow_shared_memory: bool = False
    shm_dir: str | None = None  # set for --workers: where the workers share their registrations

    @property
    def max_message_bytes(self) -> int:
        return self.max_message_mb * 1024 * 1024
