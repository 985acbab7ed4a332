"""The shipped Deployment's contract, run locally: its exact container command (only the model
path and the three ports replaced), its startup, readiness and liveness probes at their declared
periods, thresholds and timeouts, and a SIGTERM under closed-loop load, with a stand-in for
Kubernetes' endpoint controller: clients stop sending once readiness has failed
``failureThreshold`` times, plus a propagation delay. Readiness must drop before any request is
refused, no request may fail, liveness must hold throughout, and the process must exit 0 within
terminationGracePeriodSeconds."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from tests.support.serving import make_artifact

yaml = pytest.importorskip("yaml")

ROOT = Path(__file__).resolve().parents[2]
DEPLOYMENT = ROOT / "deploy" / "kubernetes" / "deployment.yaml"
PROPAGATION_S = 1.0  # endpoint removal reaching clients after readiness fails (kube-proxy sync)
CLIENTS = 8


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _container() -> tuple[dict[str, Any], dict[str, Any]]:
    doc = yaml.safe_load(DEPLOYMENT.read_text())
    pod = doc["spec"]["template"]["spec"]
    return pod, pod["containers"][0]


def _local_command(container: dict[str, Any], models: Path, port: int,
                   metrics_port: int) -> list[str]:
    """The container's command with /models and the ports replaced; nothing else."""
    mount = next(m["mountPath"] for m in container["volumeMounts"] if m["name"] == "models")
    replaced = {mount: str(models), "--port=8001": f"--port={port}",
                "--http-port=8000": f"--http-port={_free_port()}",
                "--metrics-port=8002": f"--metrics-port={metrics_port}"}
    args = [replaced.get(a, a) for a in container["args"]]
    assert sum(a != b for a, b in zip(args, container["args"])) == len(replaced)
    command = container["command"]
    assert command == ["cnnctl"]
    exe = Path(sys.executable).with_name("cnnctl")
    return [str(exe) if exe.exists() else "cnnctl", *args]


@dataclass
class Prober:
    """One Kubernetes probe: gRPC health Check every periodSeconds, timeoutSeconds each."""

    name: str
    spec: dict[str, Any]
    port: int
    results: list[tuple[float, bool]] = field(default_factory=list)

    def check(self) -> bool:
        from grpc_health.v1 import health_pb2, health_pb2_grpc

        import grpc

        with grpc.insecure_channel(f"127.0.0.1:{self.port}") as channel:
            try:
                reply = health_pb2_grpc.HealthStub(channel).Check(
                    health_pb2.HealthCheckRequest(service=self.spec["grpc"].get("service", "")),
                    timeout=self.spec.get("timeoutSeconds", 1))
            except grpc.RpcError:
                return False
        return reply.status == health_pb2.HealthCheckResponse.SERVING

    def run(self, stop: threading.Event) -> None:
        period = self.spec.get("periodSeconds", 10)
        while not stop.is_set():
            self.results.append((time.monotonic(), self.check()))
            stop.wait(period)

    def failed_at(self) -> float | None:
        """When the probe had failed failureThreshold times in a row (Kubernetes acts then)."""
        threshold, run = self.spec.get("failureThreshold", 3), 0
        for t, ok in self.results:
            run = 0 if ok else run + 1
            if run >= threshold:
                return t
        return None


def test_deployment_contract_sigterm_under_load(tmp_path: Path) -> None:
    from cnnctl.clients import Client
    from cnnctl.clients.errors import ClientError

    pod, container = _container()
    models = make_artifact(tmp_path / "models")
    port, metrics_port = _free_port(), _free_port()
    command = _local_command(container, models, port, metrics_port)
    proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env={**os.environ, "PYTHONUNBUFFERED": "1"})
    output: list[str] = []
    reader = threading.Thread(target=lambda: output.extend(proc.stdout), daemon=True)
    reader.start()
    stop_probes = threading.Event()
    try:
        # startupProbe first: the others start once it has succeeded, as the kubelet does.
        startup = Prober("startup", container["startupProbe"], port)
        deadline = (time.monotonic() + startup.spec["periodSeconds"]
                    * startup.spec["failureThreshold"])
        while not startup.check():
            assert time.monotonic() < deadline, "startup probe never passed:\n" + "".join(output)
            time.sleep(startup.spec["periodSeconds"])
        readiness = Prober("readiness", container["readinessProbe"], port)
        liveness = Prober("liveness", container["livenessProbe"], port)
        probes = [threading.Thread(target=p.run, args=(stop_probes,), daemon=True)
                  for p in (readiness, liveness)]
        for t in probes:
            t.start()

        # Closed-loop clients, sending while the endpoint is "in service". retries=0: a refused
        # or failed request counts as lost.
        outcomes: list[tuple[float, str]] = []
        removed = threading.Event()
        x = np.random.default_rng(0).standard_normal((1, 1, 32, 32), dtype=np.float32)

        def client_loop() -> None:
            with Client(f"127.0.0.1:{port}", retries=0, timeout=30) as client:
                while not removed.is_set():
                    sent = time.monotonic()
                    try:
                        client.infer("lenet5", x)
                        outcomes.append((sent, "OK"))
                    except ClientError as exc:
                        outcomes.append((sent, exc.code.name))

        clients = [threading.Thread(target=client_loop) for _ in range(CLIENTS)]
        for t in clients:
            t.start()
        time.sleep(2.0)
        signalled = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        # The endpoint controller: remove the pod once readiness has failed, then propagate.
        while readiness.failed_at() is None:
            assert proc.poll() is None, "exited before readiness failed:\n" + "".join(output)
            assert time.monotonic() - signalled < 30, "readiness never failed"
            time.sleep(0.05)
        time.sleep(PROPAGATION_S)
        removed.set()
        for t in clients:
            t.join(60)
        code = proc.wait(pod["terminationGracePeriodSeconds"])
        exited = time.monotonic()
    finally:
        stop_probes.set()
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)
    reader.join(5)
    log = "".join(output)
    assert code == 0, log
    assert exited - signalled < pod["terminationGracePeriodSeconds"]
    failed = [(round(t - signalled, 2), o) for t, o in outcomes if o != "OK"]
    assert failed == [], f"{len(failed)} requests lost: {failed[:5]}\n{log}"
    after = sum(1 for t, _ in outcomes if t >= signalled)
    assert sum(1 for t, _ in outcomes if t < signalled) > 50 and after > 10
    ready_failed = readiness.failed_at()
    assert ready_failed is not None and ready_failed - signalled <= (
        readiness.spec["periodSeconds"] * readiness.spec["failureThreshold"] + 1)
    assert all(ok for _, ok in liveness.results), liveness.results
    print(f"SIGTERM at 0; readiness failed at {ready_failed - signalled:.2f} s; "
          f"{after} requests after the signal, all OK; exit 0 at {exited - signalled:.2f} s "
          f"(grace {pod['terminationGracePeriodSeconds']} s)")
