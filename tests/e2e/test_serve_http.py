"""`cnnctl serve`'s REST endpoint from the command line: perf_analyzer -i http runs against it,
`--no-http` and a busy `--http-port` behave, and SIGTERM turns HTTP readiness false while the
requests still arriving are answered, then the process exits 0."""

from __future__ import annotations

import http.client
import importlib.util
import json
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from tests.support.serving import CliServer, make_artifact

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def artifact(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_artifact(tmp_path_factory.mktemp("http") / "lenet5", "lenet5")


def get(port: int, path: str, method: str = "GET", body: str | None = None
        ) -> tuple[int, bytes]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    try:
        conn.request(method, path, body=body)
        answer = conn.getresponse()
        return answer.status, answer.read()
    finally:
        conn.close()


INFER = json.dumps({"inputs": [{"name": "input", "shape": [1, 1, 32, 32], "datatype": "FP32",
                                "data": np.zeros(1024).tolist()}]})


def _perf_analyzer() -> tuple[str, dict[str, str]]:
    spec = importlib.util.spec_from_file_location("perf_analyzer_finder",
                                                  ROOT / "bench" / "perf_analyzer.py")
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    try:
        return module.find(fetch_if_missing=False), module.env()
    except module.PerfAnalyzerMissing as exc:
        pytest.skip(str(exc))


def test_perf_analyzer_http_runs_against_it(artifact: Path) -> None:
    exe, env = _perf_analyzer()
    with CliServer(str(artifact), "--device", "cpu") as server:
        done = subprocess.run(
            [exe, "-m", "lenet5", "-u", f"127.0.0.1:{server.http_port}", "-i", "http",
             "--concurrency-range", "4", "--measurement-mode", "count_windows",
             "--measurement-request-count", "300", "--stability-percentage", "100",
             "--max-trials", "3"], capture_output=True, text=True, timeout=120, env=env)
        assert done.returncode == 0, done.stdout + done.stderr
        assert "Throughput:" in done.stdout and "Successful request count" in done.stdout
        status, body = get(server.http_port, "/v2/models/lenet5/stats")
        stats = json.loads(body)["model_stats"][0]["inference_stats"]
        assert status == 200 and stats["success"]["count"] >= 300
        assert stats["fail"]["count"] == 0


def test_no_http(artifact: Path) -> None:
    with CliServer(str(artifact), "--device", "cpu", "--no-http") as server:
        assert server.http_port is None
        assert "http://" not in server.output()


def test_a_busy_http_port_is_one_line_and_exit_2(artifact: Path) -> None:
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        done = subprocess.run([sys.executable, "-m", "cnnctl", "-q", "serve", str(artifact),
                               "--port", "0", "--http-port", str(port), "--device", "cpu"],
                              capture_output=True, text=True, timeout=120)
    assert done.returncode == 2
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and f"cannot listen on 127.0.0.1:{port} (HTTP)" in lines[0], lines


def test_sigterm_turns_http_ready_false_and_answers_what_arrives(artifact: Path) -> None:
    with CliServer(str(artifact), "--device", "cpu", "--drain-delay-s", "2") as server:
        port = server.http_port
        assert get(port, "/v2/health/ready")[0] == 200
        server.proc.send_signal(signal.SIGTERM)
        end = time.monotonic() + 1.5
        while get(port, "/v2/health/ready")[0] == 200:  # false at once, not after a while
            assert time.monotonic() < end, "ready still true 1.5 s after SIGTERM"
            time.sleep(0.05)
        assert get(port, "/v2/health/live")[0] == 200
        status, body = get(port, "/v2/models/lenet5/infer", "POST", INFER)
        assert status == 200, body  # within --drain-delay-s: still answered
        assert server.proc.wait(30) == 0
