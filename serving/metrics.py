"""Prometheus metrics per model, and the Triton ModelStatistics built from the same counters.

Each server gets its own CollectorRegistry (tests run several servers in one process). Recording
runs on the event loop for every request, so in one process it only adds to plain numbers
(LocalModelMetrics) that a prometheus_client custom collector turns into the metric families when
/metrics or ModelStatistics reads them: a prometheus_client Counter or Histogram update costs a
few microseconds (Python layers and a lock), and a request made ~10 of them. With ``--workers N``
every worker writes prometheus_client's multiprocess files into one directory
(PROMETHEUS_MULTIPROC_DIR, set before prometheus_client is imported) through its metric objects
(SharedModelMetrics); both /metrics and ModelStatistics then read through a
MultiProcessCollector, so they add up across the workers. Both kinds expose the same families
(tests/unit/serving/test_metrics.py compares them).
"""

from __future__ import annotations

import os
import time
from abc import ABC, abstractmethod
from bisect import bisect_left
from collections.abc import Iterator

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.core import (CounterMetricFamily, GaugeMetricFamily,
                                    HistogramMetricFamily, Metric)
from prometheus_client.utils import floatToGoString

from cnnctl.protos import grpc_service_pb2 as pb

LATENCY_BUCKETS = (0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 2.0, 5.0)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512)
LABELS = ("model", "version")

# The families: name -> help text (one place for both kinds of ModelMetrics).
REQUESTS = ("cnnctl_requests", "Inference requests received")
FAILURES = ("cnnctl_request_failures", "Inference requests answered with an error, by status code")
LATENCY = ("cnnctl_request_duration_seconds", "Request latency in the server, by outcome")
QUEUE_TIME = ("cnnctl_queue_duration_seconds", "Time a request waited in the batch queue")
COMPUTE = ("cnnctl_execution_duration_seconds", "Model execution time per batch")
BATCH_SIZE = ("cnnctl_batch_size", "Images per model execution")
BATCH_EXECUTIONS = ("cnnctl_batch_executions", "Model executions by batch size")
BATCH_SECONDS = ("cnnctl_batch_execution_seconds", "Model execution time by batch size")
# Triton counts compute per request (each request is charged its batch's execution time);
# perf_analyzer insists these counts match across the compute stages.
REQUEST_COMPUTES = ("cnnctl_request_computes", "Requests computed (each charged its batch's "
                    "execution time)")
REQUEST_COMPUTE_SECONDS = ("cnnctl_request_compute_seconds", "Execution time charged to requests")
QUEUE_DEPTH = ("cnnctl_queue_depth", "Requests waiting in the batch queue")
LAST_INFERENCE = ("cnnctl_last_inference_timestamp_ms", "When the model last ran (ms since the "
                  "epoch)")


def multiprocess_dir() -> str | None:
    return os.environ.get("PROMETHEUS_MULTIPROC_DIR") or None


class ServerMetrics:
    def __init__(self, shared: bool | None = None) -> None:
        """``shared``: record through prometheus_client's metric objects (SharedModelMetrics);
        by default only in multiprocess mode (--workers)."""
        self.registry = CollectorRegistry(auto_describe=True)
        self._models: list[LocalModelMetrics] = []
        self._shared: _SharedFamilies | None = None
        if shared is None:
            shared = multiprocess_dir() is not None
        if shared:
            self._shared = _SharedFamilies(self.registry)
        else:
            self.registry.register(_LocalCollector(self._models))

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
        if self._shared is not None:
            return SharedModelMetrics(self, self._shared, name, version)
        metrics = LocalModelMetrics(self, name, version)
        self._models.append(metrics)
        return metrics


class ModelMetrics(ABC):
    """The metrics of one model version; also the batcher's observer (BatchObserver)."""

    def __init__(self, server: ServerMetrics, name: str, version: str) -> None:
        self.server = server
        self.name = name
        self.version = version

    # -- the servicer's side
    @abstractmethod
    def request(self) -> None: ...

    @abstractmethod
    def succeeded(self, seconds: float) -> None: ...

    @abstractmethod
    def failed(self, code: str, seconds: float) -> None: ...

    # -- the batcher's side
    @abstractmethod
    def queue_depth(self, depth: int) -> None: ...

    @abstractmethod
    def queued_for(self, seconds: float) -> None: ...

    @abstractmethod
    def executed(self, images: int, seconds: float, requests: int = 1) -> None: ...

    # -- ModelStatistics, from the same counters
    def statistics(self) -> pb.ModelStatistics:
        reg = self.server.read_registry()
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


class _Histogram:
    """A histogram's counts (per bucket, not cumulative; the last is +Inf) and sum."""

    __slots__ = ("bounds", "counts", "sum")

    def __init__(self, bounds: tuple[float, ...]) -> None:
        self.bounds = bounds
        self.counts = [0] * (len(bounds) + 1)
        self.sum = 0.0

    def observe(self, value: float) -> None:
        self.counts[bisect_left(self.bounds, value)] += 1  # Prometheus buckets are "<= le"
        self.sum += value

    def buckets(self) -> list[tuple[str, float]]:
        counts = list(self.counts)  # one read: the loop thread may be adding meanwhile
        out, total = [], 0
        for bound, count in zip((*self.bounds, float("inf")), counts):
            total += count
            out.append((floatToGoString(bound), total))
        return out


class LocalModelMetrics(ModelMetrics):
    """One process: plain numbers, touched only on the event loop; _LocalCollector reads them."""

    def __init__(self, server: ServerMetrics, name: str, version: str) -> None:
        super().__init__(server, name, version)
        self.requests = 0
        self.failures: dict[str, int] = {}
        self.latency = {"success": _Histogram(LATENCY_BUCKETS),
                        "failure": _Histogram(LATENCY_BUCKETS)}
        self._ok = self.latency["success"]
        self.queue = _Histogram(LATENCY_BUCKETS)
        self.compute = _Histogram(LATENCY_BUCKETS)
        self.batch = _Histogram(BATCH_BUCKETS)
        self.by_size: dict[int, list[float]] = {}  # images -> [executions, seconds]
        self.computes = 0
        self.compute_seconds = 0.0
        self.depth = 0
        self.last_ms = 0.0

    def request(self) -> None:
        self.requests += 1

    def succeeded(self, seconds: float) -> None:
        self._ok.observe(seconds)

    def failed(self, code: str, seconds: float) -> None:
        self.failures[code] = self.failures.get(code, 0) + 1
        self.latency["failure"].observe(seconds)

    def queue_depth(self, depth: int) -> None:
        self.depth = depth

    def queued_for(self, seconds: float) -> None:
        self.queue.observe(seconds)

    def executed(self, images: int, seconds: float, requests: int = 1) -> None:
        self.computes += requests
        self.compute_seconds += seconds * requests
        self.compute.observe(seconds)
        self.batch.observe(images)
        size = self.by_size.get(images)
        if size is None:
            size = self.by_size[images] = [0, 0.0]
        size[0] += 1
        size[1] += seconds
        self.last_ms = time.time() * 1000.0


class _LocalCollector:
    """The families of every LocalModelMetrics of a server (a prometheus_client custom
    collector: ``collect`` runs when the registry is read)."""

    def __init__(self, models: list[LocalModelMetrics]) -> None:
        self._models = models

    def collect(self) -> Iterator[Metric]:
        labels = list(LABELS)
        requests = CounterMetricFamily(*REQUESTS, labels=labels)
        failures = CounterMetricFamily(*FAILURES, labels=[*labels, "code"])
        latency = HistogramMetricFamily(*LATENCY, labels=[*labels, "outcome"])
        queue = HistogramMetricFamily(*QUEUE_TIME, labels=labels)
        compute = HistogramMetricFamily(*COMPUTE, labels=labels)
        batch = HistogramMetricFamily(*BATCH_SIZE, labels=labels)
        executions = CounterMetricFamily(*BATCH_EXECUTIONS, labels=[*labels, "batch_size"])
        seconds = CounterMetricFamily(*BATCH_SECONDS, labels=[*labels, "batch_size"])
        computes = CounterMetricFamily(*REQUEST_COMPUTES, labels=labels)
        compute_seconds = CounterMetricFamily(*REQUEST_COMPUTE_SECONDS, labels=labels)
        depth = GaugeMetricFamily(*QUEUE_DEPTH, labels=labels)
        last = GaugeMetricFamily(*LAST_INFERENCE, labels=labels)
        for m in self._models:
            key = [m.name, m.version]
            requests.add_metric(key, m.requests)
            for code, count in list(m.failures.items()):
                failures.add_metric([*key, code], count)
            for outcome, hist in m.latency.items():
                latency.add_metric([*key, outcome], hist.buckets(), hist.sum)
            for family, hist in ((queue, m.queue), (compute, m.compute), (batch, m.batch)):
                family.add_metric(key, hist.buckets(), hist.sum)
            for size, (count, secs) in sorted(list(m.by_size.items())):
                executions.add_metric([*key, str(size)], count)
                seconds.add_metric([*key, str(size)], secs)
            computes.add_metric(key, m.computes)
            compute_seconds.add_metric(key, m.compute_seconds)
            depth.add_metric(key, m.depth)
            last.add_metric(key, m.last_ms)
        yield from (requests, failures, latency, queue, compute, batch, executions, seconds,
                    computes, compute_seconds, depth, last)


class _SharedFamilies:
    """prometheus_client metric objects: in multiprocess mode each update goes to this worker's
    file (PROMETHEUS_MULTIPROC_DIR)."""

    def __init__(self, registry: CollectorRegistry) -> None:
        r = registry
        self.requests = Counter(*REQUESTS, LABELS, registry=r)
        self.failures = Counter(*FAILURES, (*LABELS, "code"), registry=r)
        self.latency = Histogram(*LATENCY, (*LABELS, "outcome"), buckets=LATENCY_BUCKETS,
                                 registry=r)
        self.queue_time = Histogram(*QUEUE_TIME, LABELS, buckets=LATENCY_BUCKETS, registry=r)
        self.compute = Histogram(*COMPUTE, LABELS, buckets=LATENCY_BUCKETS, registry=r)
        self.batch_size = Histogram(*BATCH_SIZE, LABELS, buckets=BATCH_BUCKETS, registry=r)
        self.batch_executions = Counter(*BATCH_EXECUTIONS, (*LABELS, "batch_size"), registry=r)
        self.batch_seconds = Counter(*BATCH_SECONDS, (*LABELS, "batch_size"), registry=r)
        self.request_computes = Counter(*REQUEST_COMPUTES, LABELS, registry=r)
        self.request_compute_seconds = Counter(*REQUEST_COMPUTE_SECONDS, LABELS, registry=r)
        self.queue_depth = Gauge(*QUEUE_DEPTH, LABELS, registry=r, multiprocess_mode="livesum")
        self.last_inference = Gauge(*LAST_INFERENCE, LABELS, registry=r,
                                    multiprocess_mode="max")


class SharedModelMetrics(ModelMetrics):
    """--workers: every update through the prometheus_client metric objects."""

    def __init__(self, server: ServerMetrics, families: _SharedFamilies, name: str,
                 version: str) -> None:
        super().__init__(server, name, version)
        self.f = families
        labels = (name, version)
        self._requests = families.requests.labels(*labels)
        self._ok = families.latency.labels(*labels, "success")
        self._fail = families.latency.labels(*labels, "failure")
        self._queue = families.queue_time.labels(*labels)
        self._compute = families.compute.labels(*labels)
        self._batch = families.batch_size.labels(*labels)
        self._depth = families.queue_depth.labels(*labels)
        self._last = families.last_inference.labels(*labels)
        self._computes = families.request_computes.labels(*labels)
        self._compute_seconds = families.request_compute_seconds.labels(*labels)
        self._failures: dict[str, Counter] = {}
        self._by_size: dict[int, tuple[Counter, Counter]] = {}  # labels() costs a lock + lookup

    def request(self) -> None:
        self._requests.inc()

    def succeeded(self, seconds: float) -> None:
        self._ok.observe(seconds)

    def failed(self, code: str, seconds: float) -> None:
        counter = self._failures.get(code)
        if counter is None:
            counter = self._failures[code] = self.f.failures.labels(self.name, self.version, code)
        counter.inc()
        self._fail.observe(seconds)

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
                self.f.batch_executions.labels(self.name, self.version, size),
                self.f.batch_seconds.labels(self.name, self.version, size))
        pair[0].inc()
        pair[1].inc(seconds)
        self._last.set(time.time() * 1000.0)
