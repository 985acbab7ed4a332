"""Client fixtures: a random-weight artifact (built once), and real servers on 127.0.0.1:0 running
in a background event loop (ServerThread), so the blocking Client can call them from the test
thread."""

from __future__ import annotations

import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from cnnctl.serving.server import ServerThread
from tests.support.serving import config_for, make_artifact


@pytest.fixture(scope="session")
def artifact(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_artifact(tmp_path_factory.mktemp("client-artifacts") / "lenet5", "lenet5")


@pytest.fixture(scope="module")
def server(artifact: Path) -> Iterator[ServerThread]:
    # max_batch_size 8: a 20-image call must arrive as three requests.
    with ServerThread(config_for(artifact, max_batch_size=8)) as s:
        yield s


@pytest.fixture(scope="session")
def reference(artifact: Path) -> Any:
    """In-process ONNX Runtime on the served file: what the logits over the wire must equal."""
    import onnxruntime as ort

    session = ort.InferenceSession(str(artifact / "model.onnx"),
                                   providers=["CPUExecutionProvider"])
    return lambda x: session.run(["logits"], {"input": np.asarray(x, dtype=np.float32)})[0]


@pytest.fixture(scope="session")
def digits() -> np.ndarray:
    """Eight real MNIST test digits (uint8, 8×28×28) from the embedded sample."""
    from importlib import resources

    with resources.files("cnnctl.training").joinpath("sample/mnist_sample.npz").open("rb") as f:
        return np.load(f)["test_images"][:8].copy()


@pytest.fixture(scope="session")
def tls_files(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """A self-signed certificate for 127.0.0.1 (openssl CLI); (cert, key)."""
    d = tmp_path_factory.mktemp("tls")
    cert, key = d / "cert.pem", d / "key.pem"
    try:
        subprocess.run(
            ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1",
             "-keyout", str(key), "-out", str(cert), "-subj", "/CN=localhost",
             "-addext", "subjectAltName=IP:127.0.0.1,DNS:localhost"],
            check=True, capture_output=True, timeout=60)
    except (FileNotFoundError, subprocess.CalledProcessError) as exc:
        pytest.skip(f"openssl cannot make a test certificate: {exc}")
    return cert, key
