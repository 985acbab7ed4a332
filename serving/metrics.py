"""Prometheus metrics per model, and the Triton ModelStatistics read from the same counters.

Recorded through prometheus_client's metric objects; each server has its own CollectorRegistry
(tests run several servers in one process). With ``--workers N``, workers.py sets
PROMETHEUS_MULTIPROC_DIR before any worker imports prometheus_client: every worker then writes its
values to its own files in that directory, and /metrics and ModelStatistics read them all through
a MultiProcessCollector, so they add up across the workers.
"""

from __future__ import annotations

import os
import time

from prometheus_client import (CollectorRegistry, Counter, Gauge, Histogram,
                               disable_created_metrics, multiprocess)

from cnnctl.protos import grpc_service_pb2 as pb

LATENCY_BUCKETS = (0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 2.0, 5.0)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512)
LABELS = ("model", "version")


def multiprocess_registry(directory: str) -> CollectorRegistry:
    """A registry that reads every process's files in a multiprocess directory."""
    registry = CollectorRegistry()
    multiprocess.MultiProcessCollector(registry, path=directory)
    return registry


class ServerMetrics:
    """The metric families of one server; ``for_model`` gives a model version's share of them."""

    def __init__(self) -> None:
        # No *_created series: multiprocess mode has none, so /metrics reads the same either way.
        disable_created_metrics()
        self.registry = r = CollectorRegistry(auto_describe=True)
        by_size = (*LABELS, "batch_size")
        self.requests = Counter("cnnctl_requests", "Inference requests received", LABELS,
                                registry=r)
        self.failures = Counter("cnnctl_request_failures", "Inference requests answered with an "
                                "error, by status code", (*LABELS, "code"), registry=r)
        self.latency = Histogram("cnnctl_request_duration_seconds", "Request latency in the "
                                 "server, by outcome", (*LABELS, "outcome"),
                                 buckets=LATENCY_BUCKETS, registry=r)
        self.queue_time = Histogram("cnnctl_queue_duration_seconds", "Time a request waited in "
                                    "the batch queue", LABELS, buckets=LATENCY_BUCKETS, registry=r)
        self.compute = Histogram("cnnctl_execution_duration_seconds", "Model execution time per "
                                 "batch", LABELS, buckets=LATENCY_BUCKETS, registry=r)
        self.batch_size = Histogram("cnnctl_batch_size", "Images per model execution", LABELS,
                                    buckets=BATCH_BUCKETS, registry=r)
        self.batch_executions = Counter("cnnctl_batch_executions", "Model executions by batch "
                                        "size", by_size, registry=r)
        self.batch_seconds = Counter("cnnctl_batch_execution_seconds", "Model execution time by "
                                     "batch size", by_size, registry=r)
        # Triton counts compute per request (each request is charged its batch's execution time);
        # perf_analyzer insists these counts match across the compute stages.
        self.request_computes = Counter("cnnctl_request_computes", "Requests computed (each "
                                        "charged its batch's execution time)", LABELS, registry=r)
        self.request_compute_seconds = Counter("cnnctl_request_compute_seconds", "Execution time "
                                               "charged to requests", LABELS, registry=r)
        self.queue_depth = Gauge("cnnctl_queue_depth", "Requests waiting in the batch queue",
                                 LABELS, registry=r, multiprocess_mode="livesum")
        self.last_inference = Gauge("cnnctl_last_inference_timestamp_ms", "When the model last "
                                    "ran (ms since the epoch)", LABELS, registry=r,
                                    multiprocess_mode="max")

    def read_registry(self) -> CollectorRegistry:
        """Where to read totals from: this process's registry, or all workers' files."""
        directory = os.environ.get("PROMETHEUS_MULTIPROC_DIR")
        return multiprocess_registry(directory) if directory else self.registry

    def for_model(self, name: str, version: str) -> ModelMetrics:
        return ModelMetrics(self, name, version)


class ModelMetrics:
    """The metrics of one model version; also the batcher's observer (BatchObserver).

    Every request updates several of them on the event loop, so each model holds its labelled
    children: ``labels()`` costs a lock and a dict lookup on top of the update.
    """

    def __init__(self, server: ServerMetrics, name: str, version: str) -> None:
        self.server = server
        self.name = name
        self.version = version
        s, key = server, (name, version)
        self._requests = s.requests.labels(*key)
        self._ok = s.latency.labels(*key, "success")
        self._fail = s.latency.labels(*key, "failure")
        self._queue = s.queue_time.labels(*key)
        self._compute = s.compute.labels(*key)
        self._batch = s.batch_size.labels(*key)
        self._computes = s.request_computes.labels(*key)
        self._compute_seconds = s.request_compute_seconds.labels(*key)
        self._depth = s.queue_depth.labels(*key)
        self._last = s.last_inference.labels(*key)
        self._failures: dict[str, Counter] = {}
        self._by_size: dict[int, tuple[Counter, Counter]] = {}

    # -- the servicer's side
    def request(self) -> None:
        self._requests.inc()

    def succeeded(self, seconds: float) -> None:
        self._ok.observe(seconds)

    def failed(self, code: str, seconds: float) -> None:
        counter = self._failures.get(code)
        if counter is None:
            counter = self._failures[code] = self.server.failures.labels(self.name, self.version,
                                                                         code)
        counter.inc()
        self._fail.observe(seconds)

    # -- the batcher's side
    def queue_depth(self, depth: int) -> None:
        self._depth.set(depth)

    def queued_for(self, seconds: float) -> None:
        self._queue.observe(seconds)

    def executed(self, images: int, seconds: float, requests: int = 1) -> None:
        self._computes.inc(requests)
        self._compute_seconds.inc(seconds * requests)
        self._compute.observe(seconds)
        self._batch.observe(images)
        pair = self._by_size.get(images)
        if pair is None:
            size = str(images)
            pair = self._by_size[images] = (
                self.server.batch_executions.labels(self.name, self.version, size),
                self.server.batch_seconds.labels(self.name, self.version, size))
        pair[0].inc()
        pair[1].inc(seconds)
        self._last.set(time.time() * 1000.0)

    # -- ModelStatistics, from the same counters
    def statistics(self) -> pb.ModelStatistics:
        mine: dict[tuple[str, tuple[tuple[str, str], ...]], float] = {}
        for family in self.server.read_registry().collect():
            for s in family.samples:
                if (s.labels.get("model"), s.labels.get("version")) == (self.name, self.version):
                    extra = tuple(sorted((k, v) for k, v in s.labels.items() if k not in LABELS))
                    mine[s.name, extra] = s.value

        def value(name: str, **extra: str) -> float:
            return mine.get((name, tuple(sorted(extra.items()))), 0.0)

        def duration(prefix: str, **extra: str) -> pb.StatisticDuration:
            return pb.StatisticDuration(count=int(value(f"{prefix}_count", **extra)),
                                        ns=int(value(f"{prefix}_sum", **extra) * 1e9))

        stats = pb.ModelStatistics(name=self.name, version=self.version)
        stats.last_inference = int(value("cnnctl_last_inference_timestamp_ms"))
        stats.inference_count = int(value("cnnctl_batch_size_sum"))
        stats.execution_count = int(value("cnnctl_batch_size_count"))
        inf = stats.inference_stats
        inf.success.CopyFrom(duration("cnnctl_request_duration_seconds", outcome="success"))
        inf.fail.CopyFrom(duration("cnnctl_request_duration_seconds", outcome="failure"))
        inf.queue.CopyFrom(duration("cnnctl_queue_duration_seconds"))
        computes = int(value("cnnctl_request_computes_total"))
        inf.compute_infer.CopyFrom(pb.StatisticDuration(
            count=computes, ns=int(value("cnnctl_request_compute_seconds_total") * 1e9)))
        # Decoding and encoding are not timed apart from the whole request (they are in
        # success.ns); the counts match compute_infer's, as Triton's do and perf_analyzer checks.
        inf.compute_input.count = computes
        inf.compute_output.count = computes
        sizes = sorted(int(dict(extra)["batch_size"]) for name, extra in mine
                       if name == "cnnctl_batch_executions_total")
        for size in sizes:
            count = value("cnnctl_batch_executions_total", batch_size=str(size))
            secs = value("cnnctl_batch_execution_seconds_total", batch_size=str(size))
            stats.batch_stats.add(batch_size=size, compute_infer=pb.StatisticDuration(
                count=int(count), ns=int(secs * 1e9)))
        return stats
