"""serving/metrics.py: the /metrics exposition and ModelStatistics from one sequence of updates, in
one process and in prometheus_client's multiprocess mode (--workers), where two processes' files
must add up."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families

from cnnctl.serving.metrics import ModelMetrics, ServerMetrics

# (method, args) in the order a server would call them.
STEPS: list[tuple[str, tuple[Any, ...]]] = [
    *[("request", ())] * 3,
    ("queued_for", (0.0,)),
    ("queued_for", (0.001,)),  # exactly on a bucket bound: Prometheus buckets are "<= le"
    ("queued_for", (7.5,)),  # beyond the last bound: +Inf only
    ("executed", (1, 0.0004)),
    ("executed", (3, 0.002, 2)),
    ("executed", (64, 0.03)),
    ("executed", (1000, 9.0)),  # more images than the largest batch bucket
    ("succeeded", (0.0005,)),
    ("succeeded", (0.0123,)),
    ("failed", ("INVALID_ARGUMENT", 0.0001)),
    ("failed", ("INVALID_ARGUMENT", 0.0002)),
    ("failed", ("DEADLINE_EXCEEDED", 0.05)),
    ("queue_depth", (5,)),
    ("queue_depth", (2,)),
]

FAMILIES = [  # (name, type) as /metrics declares them, in its order
    ("cnnctl_requests_total", "counter"), ("cnnctl_request_failures_total", "counter"),
    ("cnnctl_request_duration_seconds", "histogram"),
    ("cnnctl_queue_duration_seconds", "histogram"),
    ("cnnctl_execution_duration_seconds", "histogram"), ("cnnctl_batch_size", "histogram"),
    ("cnnctl_batch_executions_total", "counter"),
    ("cnnctl_batch_execution_seconds_total", "counter"),
    ("cnnctl_request_computes_total", "counter"),
    ("cnnctl_request_compute_seconds_total", "counter"),
    ("cnnctl_queue_depth", "gauge"), ("cnnctl_last_inference_timestamp_ms", "gauge"),
]


def record(m: ModelMetrics) -> None:
    for method, args in STEPS:
        getattr(m, method)(*args)


def samples(text: str) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    return {(s.name, frozenset(s.labels.items())): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def test_exposition_and_statistics() -> None:
    metrics = ServerMetrics()
    a = metrics.for_model("lenet5", "1")
    record(a)
    record(metrics.for_model("other", "2"))
    text = generate_latest(metrics.registry).decode()
    lines = text.splitlines()
    assert [tuple(line.split()[2:4]) for line in lines if line.startswith("# TYPE")] == FAMILIES
    assert not [line for line in lines if "_created" in line]  # as in multiprocess mode
    assert 'cnnctl_queue_duration_seconds_bucket{le="0.001",model="lenet5",version="1"} 2.0' \
        in lines
    assert 'cnnctl_request_failures_total{code="INVALID_ARGUMENT",model="lenet5",version="1"} 2.0' \
        in lines
    assert 'cnnctl_batch_size_bucket{le="+Inf",model="other",version="2"} 4.0' in lines
    assert 'cnnctl_request_compute_seconds_total{model="lenet5",version="1"} 9.0344' in lines
    assert 'cnnctl_batch_execution_seconds_total{batch_size="3",model="lenet5",version="1"} 0.002' \
        in lines
    assert 'cnnctl_queue_depth{model="other",version="2"} 2.0' in lines
    s = a.statistics()
    assert s.inference_count == 1 + 3 + 64 + 1000 and s.execution_count == 4
    assert s.inference_stats.compute_infer.count == 5  # requests, each charged its batch
    assert s.inference_stats.compute_infer.ns == 9_034_400_000
    assert (s.inference_stats.success.count, s.inference_stats.fail.count) == (2, 3)
    assert s.inference_stats.queue.count == 3
    assert [(b.batch_size, b.compute_infer.count) for b in s.batch_stats] == [
        (1, 1), (3, 1), (64, 1), (1000, 1)]
    assert abs(s.last_inference / 1000 - time.time()) < 60


def test_multiprocess_files_add_up(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Two worker processes record the same updates into one PROMETHEUS_MULTIPROC_DIR; reading
    the directory gives what one process recording them twice gives."""
    code = ("import json, sys\n"
            "from cnnctl.serving.metrics import ServerMetrics\n"
            "m = ServerMetrics().for_model('lenet5', '1')\n"
            "for method, args in json.loads(sys.argv[1]):\n"
            "    getattr(m, method)(*args)\n")
    env = {**os.environ, "PROMETHEUS_MULTIPROC_DIR": str(tmp_path)}
    for _ in range(2):
        subprocess.run([sys.executable, "-c", code, json.dumps(STEPS)], env=env, check=True,
                       timeout=60)
    assert len(list(tmp_path.glob("*.db"))) >= 2

    once = ServerMetrics()
    single = once.for_model("lenet5", "1")
    record(single)
    record(single)
    monkeypatch.setenv("PROMETHEUS_MULTIPROC_DIR", str(tmp_path))
    both = ServerMetrics().for_model("lenet5", "1")
    got = samples(generate_latest(both.server.read_registry()).decode())
    want = samples(generate_latest(once.registry).decode())
    gauges = ("cnnctl_queue_depth", "cnnctl_last_inference_timestamp_ms")
    assert {k: v for k, v in got.items() if k[0] not in gauges} == {
        k: v for k, v in want.items() if k[0] not in gauges}
    labels = frozenset({"model": "lenet5", "version": "1"}.items())
    assert got["cnnctl_queue_depth", labels] == 2 + 2  # livesum: each worker's queue
    ours, theirs = both.statistics(), single.statistics()
    assert abs(ours.last_inference - theirs.last_inference) < 60_000
    ours.last_inference = theirs.last_inference = 0
    assert ours == theirs and ours.execution_count == 8
