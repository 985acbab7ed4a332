"""Prometheus metrics per model, and the Triton ModelStatistics built from the same counters.

Each server gets its own CollectorRegistry (tests run several servers in one process). With
``--workers N`` every worker writes prometheus_client's multiprocess files into one directory
(PROMETHEUS_MULTIPROC_DIR, set before prometheus_client is imported); both /metrics and
ModelStatistics then read through a MultiProcessCollector, so they add up across the workers.
"""

from __future__ import annotations

import os
import time

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from cnnctl.protos import grpc_service_pb2 as pb

LATENCY_BUCKETS = (0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 2.0, 5.0)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512)
LABELS = ("model", "version")


def multiprocess_dir() -> str | None:
    return os.environ.get("PROMETHEUS_MULTIPROC_DIR") or None


class ServerMetrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
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
                                        "size", (*LABELS, "batch_size"), registry=r)
        self.batch_seconds = Counter("cnnctl_batch_execution_seconds", "Model execution time by "
                                     "batch size", (*LABELS, "batch_size"), registry=r)
        # Triton counts compute per request (each request is charged its batch's execution
        # time); perf_analyzer insists these counts match across the compute stages.
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
        directory = multiprocess_dir()
        if directory is None:
            return self.registry
        from prometheus_client import multiprocess

        merged = CollectorRegistry()
        multiprocess.MultiProcessCollector(merged, path=directory)
        return merged

    def for_model(self, name: str, version: str) -> ModelMetrics:
        return ModelMetrics(self, name, version)


class ModelMetrics:
    """The metrics of one model version; also the batcher's observer."""

    def __init__(self, metrics: ServerMetrics, name: str, version: str) -> None:
        self.m = metrics
        self.name = name
        self.version = version
        labels = (name, version)
        self._requests = metrics.requests.labels(*labels)
        self._ok = metrics.latency.labels(*labels, "success")
        self._fail = metrics.latency.labels(*labels, "failure")
        self._queue = metrics.queue_time.labels(*labels)
        self._compute = metrics.compute.labels(*labels)
        self._batch = metrics.batch_size.labels(*labels)
        self._depth = metrics.queue_depth.labels(*labels)
        self._last = metrics.last_inference.labels(*labels)
        self._computes = metrics.request_computes.labels(*labels)
        self._compute_seconds = metrics.request_compute_seconds.labels(*labels)
        self._failures: dict[str, Counter] = {}
        self._by_size: dict[int, tuple[Counter, Counter]] = {}  # labels() costs a lock + lookup

    # -- the servicer's side
    def request(self) -> None:
        self._requests.inc()

    def succeeded(self, seconds: float) -> None:
        self._ok.observe(seconds)

    def failed(self, code: str, seconds: float) -> None:
        counter = self._failures.get(code)
        if counter is None:
            counter = self._failures[code] = self.m.failures.labels(self.name, self.version, code)
        counter.inc()
        self._fail.observe(seconds)

    # -- the batcher's side (BatchObserver)
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
                self.m.batch_executions.labels(self.name, self.version, size),
                self.m.batch_seconds.labels(self.name, self.version, size))
        pair[0].inc()
        pair[1].inc(seconds)
        self._last.set(time.time() * 1000.0)

    # -- ModelStatistics, from the same counters
    def statistics(self) -> pb.ModelStatistics:
        reg = self.m.read_registry()
        labels = {"model": self.name, "version": self.version}

        def value(name: str, **extra: str) -> float:
            return reg.get_sample_value(name, {**labels, **extra}) or 0.0

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
        sizes = set()
        for family in reg.collect():
            if family.name == "cnnctl_batch_executions":
                for s in family.samples:
                    if (s.labels.get("model"), s.labels.get("version")) == (self.name,
                                                                           self.version):
                        sizes.add(int(s.labels["batch_size"]))
        for size in sorted(sizes):
            count = value("cnnctl_batch_executions_total", batch_size=str(size))
            secs = value("cnnctl_batch_execution_seconds_total", batch_size=str(size))
            stats.batch_stats.add(batch_size=size, compute_infer=pb.StatisticDuration(
                count=int(count), ns=int(secs * 1e9)))
        return stats
