"""The two ways of recording metrics (serving/metrics.py) expose the same families and the same
ModelStatistics: plain numbers read by a custom collector (one process) and prometheus_client's
metric objects (--workers, multiprocess files)."""

from __future__ import annotations

from prometheus_client import generate_latest

from cnnctl.serving.metrics import (LATENCY_BUCKETS, LocalModelMetrics, ServerMetrics,
                                    SharedModelMetrics)


def _record(m) -> None:  # type: ignore[no-untyped-def]
    for _ in range(3):
        m.request()
    m.queued_for(0.0)
    m.queued_for(0.001)  # exactly on a bucket bound: Prometheus buckets are "<= le"
    m.queued_for(7.5)  # beyond the last bound: +Inf only
    m.executed(1, 0.0004)
    m.executed(3, 0.002, requests=2)
    m.executed(64, 0.03)
    m.executed(1000, 9.0)  # more images than the largest batch bucket
    m.succeeded(0.0005)
    m.succeeded(0.0123)
    m.failed("INVALID_ARGUMENT", 0.0001)
    m.failed("INVALID_ARGUMENT", 0.0002)
    m.failed("DEADLINE_EXCEEDED", 0.05)
    m.queue_depth(5)
    m.queue_depth(2)


def _exposition(metrics: ServerMetrics) -> list[str]:
    lines = generate_latest(metrics.registry).decode().splitlines()
    # prometheus_client's metric objects add *_created samples, which a custom collector has no
    # use for; the last-inference timestamp is the wall clock at each execution.
    return [line for line in lines if "_created" not in line
            and not line.startswith("cnnctl_last_inference_timestamp_ms{")]


def test_local_and_shared_metrics_expose_the_same() -> None:
    local, shared = ServerMetrics(shared=False), ServerMetrics(shared=True)
    a, b = local.for_model("lenet5", "1"), shared.for_model("lenet5", "1")
    assert isinstance(a, LocalModelMetrics) and isinstance(b, SharedModelMetrics)
    for m in (a, b, local.for_model("other", "2"), shared.for_model("other", "2")):
        _record(m)
    exposed = _exposition(local)
    assert exposed == _exposition(shared)
    assert ('cnnctl_queue_duration_seconds_bucket{le="0.001",model="lenet5",version="1"} 2.0'
            in exposed)
    assert 'cnnctl_request_failures_total{code="INVALID_ARGUMENT",model="lenet5",version="1"} 2.0' \
        in exposed
    assert 'cnnctl_batch_size_bucket{le="+Inf",model="other",version="2"} 4.0' in exposed
    sa, sb = a.statistics(), b.statistics()
    assert abs(sa.last_inference - sb.last_inference) < 60_000
    sa.last_inference = sb.last_inference = 0
    assert sa == sb
    assert sa.inference_count == 1 + 3 + 64 + 1000 and sa.execution_count == 4
    assert sa.inference_stats.compute_infer.count == 5  # requests, each charged its batch
    assert sa.inference_stats.fail.count == 3
    assert [s.batch_size for s in sa.batch_stats] == [1, 3, 64, 1000]


def test_local_histogram_buckets_match_prometheus_rules() -> None:
    m = ServerMetrics(shared=False).for_model("m", "1")
    assert isinstance(m, LocalModelMetrics)
    for v in (*LATENCY_BUCKETS, 0.0, 100.0):
        m.succeeded(v)
    buckets = m.latency["success"].buckets()
    # Cumulative: each bound holds the values <= it (0.0 and the bound itself, then the rest).
    assert [count for _, count in buckets] == [2 + i for i in range(len(LATENCY_BUCKETS))] + [
        len(LATENCY_BUCKETS) + 2]
    assert buckets[-1][0] == "+Inf"
