"""`cnnctl health`, the containers' health check: exit 0 and SERVING for a ready server (and for
`live` and a model's name), 1 with one line for an unknown service or an unreachable server."""

from __future__ import annotations

import socket
import subprocess
import sys
from pathlib import Path

import pytest

from tests.support.serving import CliServer, make_artifact


def health(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "cnnctl", "health", *args], capture_output=True,
                          text=True, timeout=60)


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> CliServer:
    with CliServer(str(make_artifact(tmp_path_factory.mktemp("health") / "lenet5"))) as s:
        yield s


@pytest.mark.parametrize("service", ["", "live", "lenet5"])
def test_serving(server: CliServer, service: str) -> None:
    done = health("--server", server.address, "--service", service)
    assert (done.returncode, done.stdout.strip()) == (0, "SERVING"), done.stderr


def test_unknown_service(server: CliServer) -> None:
    done = health("--server", server.address, "--service", "nope")
    assert done.returncode == 1
    assert done.stderr.strip().splitlines() == [
        f"{server.address}: NOT_FOUND: no health service 'nope' (cnnctl serve answers '', 'live' "
        f"and each model's name)"]


def test_unreachable() -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    done = health("--server", f"127.0.0.1:{port}", "--timeout", "2")
    assert done.returncode == 1 and len(done.stderr.strip().splitlines()) == 1, done.stderr
    assert "UNAVAILABLE" in done.stderr or "DEADLINE_EXCEEDED" in done.stderr
