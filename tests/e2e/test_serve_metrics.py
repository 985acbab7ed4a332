"""Prometheus metrics on --metrics-port, and --workers N sharing one port with metrics and
ModelStatistics that add up across the workers."""

from __future__ import annotations

import re
import signal
import socket
import urllib.request
from pathlib import Path

import grpc
import numpy as np
import pytest

from cnnctl.protos import grpc_service_pb2 as pb
from tests.support.serving import CliServer, infer_request, stub, make_artifact


@pytest.fixture(scope="module")
def artifact(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_artifact(tmp_path_factory.mktemp("metrics") / "lenet5")


def scrape(server: CliServer) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    from prometheus_client.parser import text_string_to_metric_families

    port = next(int(m.group(1)) for line in server.lines
                if (m := re.search(r"metrics on http://[^:]+:(\d+)/metrics", line)))
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode()
    return {(s.name, frozenset(s.labels.items())): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def key(name: str, **extra: str) -> tuple[str, frozenset[tuple[str, str]]]:
    return name, frozenset({"model": "lenet5", "version": "1", **extra}.items())


def send(address: str, count: int, images: int) -> pb.ModelStatistics:
    x = np.zeros((images, 1, 32, 32), dtype=np.float32)
    for _ in range(count):
        # a connection of its own each time, so the kernel can pick another worker
        with grpc.insecure_channel(address, options=[("grpc.use_local_subchannel_pool", 1)]) as ch:
            stub(ch).ModelInfer(infer_request(x), timeout=30)
    with grpc.insecure_channel(address) as ch:
        return stub(ch).ModelStatistics(pb.ModelStatisticsRequest(name="lenet5"),
                                        timeout=30).model_stats[0]


@pytest.mark.parametrize("workers", [1, 2])
def test_metrics_and_statistics_add_up(artifact: Path, workers: int) -> None:
    with CliServer(str(artifact), "--metrics-port", "0", "--workers", str(workers)) as server:
        stats = send(server.address, count=8, images=3)
        samples = scrape(server)
        server.proc.send_signal(signal.SIGTERM)
        assert server.proc.wait(timeout=60) == 0, server.output()
    assert (stats.inference_count, stats.inference_stats.success.count) == (24, 8)
    assert samples[key("cnnctl_requests_total")] == 8
    assert samples[key("cnnctl_batch_size_sum")] == 24
    assert samples[key("cnnctl_request_duration_seconds_count", outcome="success")] == 8
    assert samples[key("cnnctl_queue_duration_seconds_count")] == 8
    assert samples[key("cnnctl_batch_executions_total", batch_size="3")] == 8
    assert key("cnnctl_queue_depth") in samples
    if workers > 1:
        assert any("(2 workers" in line for line in server.lines)


@pytest.mark.parametrize(("workers", "metrics_host"), [(1, None), (2, "127.0.0.2")])
def test_metrics_listen_on_their_own_host(artifact: Path, workers: int,
                                          metrics_host: str | None) -> None:
    """--host 0.0.0.0 serves gRPC to every machine, but /metrics listens only on --metrics-host
    (127.0.0.1 unless told): before, it listened on --host too."""
    args = ["--host", "0.0.0.0", "--metrics-port", "0", "--workers", str(workers)]
    if metrics_host:
        args += ["--metrics-host", metrics_host]
    expected = metrics_host or "127.0.0.1"
    other = "127.0.0.2" if metrics_host is None else "127.0.0.1"
    with CliServer(str(artifact), *args) as server:
        found = [m.groups() for line in server.lines
                 if (m := re.search(r"metrics on http://([^:/]+):(\d+)/metrics", line))]
        assert [host for host, _ in found] == [expected]
        port = int(found[0][1])
        with urllib.request.urlopen(f"http://{expected}:{port}/metrics", timeout=10) as page:
            assert b"cnnctl_requests" in page.read()
        with pytest.raises(ConnectionRefusedError):
            socket.create_connection((other, port), timeout=10).close()
        with grpc.insecure_channel(f"{other}:{server.port}") as ch:  # gRPC: every address
            assert stub(ch).ServerLive(pb.ServerLiveRequest(), timeout=30).live
        server.proc.send_signal(signal.SIGTERM)
        assert server.proc.wait(timeout=60) == 0, server.output()


def test_workers_share_shared_memory_registrations(artifact: Path) -> None:
    """A region registered through one connection is usable, and its unregistering seen, on every
    connection, whichever worker the kernel gave it."""
    from multiprocessing import shared_memory

    seg = shared_memory.SharedMemory(create=True, size=8192)
    try:
        with CliServer(str(artifact), "--workers", "2", "--allow-shared-memory") as server:
            channels = [grpc.insecure_channel(server.address) for _ in range(8)]
            stubs = [stub(ch) for ch in channels]
            stubs[0].SystemSharedMemoryRegister(pb.SystemSharedMemoryRegisterRequest(
                name="shared", key="/" + seg.name, byte_size=8192))
            req = pb.ModelInferRequest(model_name="lenet5")
            t = req.inputs.add(name="input", datatype="FP32", shape=[1, 1, 32, 32])
            t.parameters["shared_memory_region"].string_param = "shared"
            t.parameters["shared_memory_byte_size"].int64_param = 4096
            answers = [s.ModelInfer(req) for s in stubs]
            assert all(list(a.outputs[0].shape) == [1, 10] for a in answers)
            stubs[-1].SystemSharedMemoryUnregister(pb.SystemSharedMemoryUnregisterRequest())
            for s in stubs:
                with pytest.raises(grpc.RpcError) as info:
                    s.ModelInfer(req)
                assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
                assert "region 'shared' is not registered" in info.value.details()
            for ch in channels:
                ch.close()
            server.proc.send_signal(signal.SIGTERM)
            assert server.proc.wait(timeout=60) == 0, server.output()
    finally:
        seg.close()
        seg.unlink()


def children(pid: int) -> list[int]:
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            if int(stat.read_text().rsplit(")", 1)[1].split()[1]) == pid:
                found.append(int(stat.parent.name))
        except (OSError, ValueError, IndexError):
            pass
    return found


@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="needs Linux /proc")
def test_workers_exit_when_the_parent_is_killed(artifact: Path) -> None:
    """SIGKILL leaves the parent no chance to pass the signal on; the workers must not be left
    serving the port as orphans."""
    import time

    with CliServer(str(artifact), "--workers", "2") as server:
        workers = [p for p in children(server.proc.pid)
                   if "spawn_main" in Path(f"/proc/{p}/cmdline").read_text()]
        assert len(workers) == 2
        server.proc.kill()
        server.proc.wait(10)
        end = time.monotonic() + 30
        while time.monotonic() < end and any(Path(f"/proc/{p}").exists() for p in workers):
            time.sleep(0.1)
        alive = [p for p in workers if Path(f"/proc/{p}").exists()
                 and Path(f"/proc/{p}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"]
        assert alive == [], f"workers {alive} outlived their killed parent"
