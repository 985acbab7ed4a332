"""Two local servers behind one client address list: calls spread over both, and restarting one
(SIGTERM, drain, a new process on the same port) under load loses no request."""

from __future__ import annotations

import signal
import socket
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from tests.support.serving import CliServer, make_artifact, stub

CLIENT_THREADS = 4


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _count(address: str) -> int:
    """Requests the server at ``address`` has answered (ModelStatistics)."""
    import grpc

    from cnnctl.protos import grpc_service_pb2 as pb

    with grpc.insecure_channel(address) as channel:
        reply = stub(channel).ModelStatistics(pb.ModelStatisticsRequest(name="lenet5"), timeout=10)
    return reply.model_stats[0].inference_stats.success.count


def _serve(artifact: Path, port: int) -> CliServer:
    return CliServer(str(artifact), "--port", str(port), "--drain-delay-s", "1", "--grace-s", "10")


@pytest.fixture(scope="module")
def artifact(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_artifact(tmp_path_factory.mktemp("balance") / "lenet5")


def test_calls_spread_and_a_restart_loses_nothing(artifact: Path) -> None:
    from cnnctl.clients import Client
    from cnnctl.clients.errors import ClientError

    ports = [_free_port(), _free_port()]
    servers = [_serve(artifact, p) for p in ports]
    try:
        addresses = ",".join(f"127.0.0.1:{p}" for p in ports)
        x = np.random.default_rng(1).standard_normal((1, 1, 32, 32), dtype=np.float32)
        errors: list[str] = []
        done = threading.Event()
        answered = [0]

        with Client(addresses, timeout=30, retries=0) as client:
            expected = client.infer("lenet5", x)

            def loop() -> None:
                while not done.is_set():
                    try:
                        got = client.infer("lenet5", x)
                        np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-5)
                        answered[0] += 1
                    except (ClientError, AssertionError) as exc:
                        errors.append(repr(exc))

            threads = [threading.Thread(target=loop) for _ in range(CLIENT_THREADS)]
            for t in threads:
                t.start()
            try:
                first = _restart_under_load(artifact, servers, ports)
            finally:
                done.set()
                for t in threads:
                    t.join(30)
    finally:
        for s in servers:
            s.kill()
    print(f"before the restart: {first} calls per server; {answered[0]} answered in all, "
          f"{len(errors)} errors")
    assert errors == []
    total = sum(first)
    assert min(first) > 0.25 * total, first


def _restart_under_load(artifact: Path, servers: list[CliServer], ports: list[int]) -> list[int]:
    """Calls per server after 2 s of load; then server 0 restarts on its port and must get
    calls again."""
    time.sleep(2.0)
    first = [_count(f"127.0.0.1:{p}") for p in ports]
    servers[0].proc.send_signal(signal.SIGTERM)
    assert servers[0].proc.wait(30) == 0, servers[0].output()
    servers[0] = _serve(artifact, ports[0])
    restarted = time.monotonic()
    while _count(f"127.0.0.1:{ports[0]}") < 50:  # the new process gets calls again
        assert time.monotonic() - restarted < 20, "the restarted server got no calls"
        time.sleep(0.2)
    return first


def test_max_connection_age_closes_connections(artifact: Path) -> None:
    """--max-connection-age-s: the server closes a client's connection after that long (the
    channel goes IDLE), so its next call reconnects, possibly to a replica added since."""
    import grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    with CliServer(str(artifact), "--max-connection-age-s", "1", "--grace-s", "5") as server:
        states: list[str] = []
        with grpc.insecure_channel(server.address) as channel:
            channel.subscribe(lambda state: states.append(state.name), try_to_connect=True)
            check = health_pb2_grpc.HealthStub(channel).Check
            assert check(health_pb2.HealthCheckRequest(), timeout=10).status == 1
            time.sleep(2.5)
            assert check(health_pb2.HealthCheckRequest(), timeout=10).status == 1
    # Connected, closed by the server at its age, connected again for the second call.
    assert states.count("READY") >= 2 and "IDLE" in states[states.index("READY"):], states
