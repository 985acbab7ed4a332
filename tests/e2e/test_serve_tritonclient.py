"""Must show 1: train a tiny model, export it, `cnnctl serve` it on 127.0.0.1:0, and predict through
tritonclient.grpc (readiness, metadata, config, infer, statistics) and through our own client;
answers equal in-process ONNX Runtime. tritonclient runs in its own process (tests/e2e/triton_probe.py): its protobuf names are
ours and cannot share this process with cnnctl.protos."""

from __future__ import annotations

import base64
import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from tests.support.serving import CliServer

PROBE = Path(__file__).with_name("triton_probe.py")


def cnnctl(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    done = subprocess.run([sys.executable, "-m", "cnnctl", "-q", *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    return done


@pytest.fixture(scope="module")
def trained_artifact(tmp_path_factory: pytest.TempPathFactory) -> Path:
    work = tmp_path_factory.mktemp("e2e")
    cnnctl("train", "--model", "lenet5", "--epochs", "1", "--max-steps", "20", "--no-progress",
           "--no-plot", "--out", "run", cwd=work)
    cnnctl("export", "run/best.pt", "--format", "onnx", "--verify-images", "64", "--out", "art",
           cwd=work)
    return work / "art"


def probe_input(artifact: Path, tmp_path: Path, n: int, seed: int) -> tuple[Any, np.ndarray,
                                                                           np.ndarray]:
    """(manifest, n random images saved as tmp_path/x.npy for the probe, in-process ORT's
    logits for them: what the answers must equal)."""
    import onnxruntime as ort

    from cnnctl.export.manifest import load_manifest

    manifest = load_manifest(artifact)
    x = np.random.default_rng(seed).standard_normal((n, 1, 32, 32), dtype=np.float32)
    np.save(tmp_path / "x.npy", x)
    session = ort.InferenceSession(str(artifact / manifest.file("onnx").path),
                                   providers=["CPUExecutionProvider"])
    return manifest, x, session.run(["logits"], {"input": x})[0]


@pytest.mark.skipif(importlib.util.find_spec("tritonclient") is None,
                    reason="tritonclient is not installed")
def test_tritonclient_against_cnnctl_serve(trained_artifact: Path, tmp_path: Path) -> None:
    manifest, x, expected = probe_input(trained_artifact, tmp_path, 3, seed=0)

    with CliServer(str(trained_artifact)) as server:
        assert any("on CPUExecutionProvider" in line for line in server.lines)
        done = subprocess.run([sys.executable, str(PROBE), server.address, manifest.name,
                               str(tmp_path / "x.npy")], capture_output=True, text=True, timeout=120)
        assert done.returncode == 0, done.stderr
        # and through our own client library (clients/, issue 6), in this process
        from cnnctl.clients.client import Client

        with Client(server.address) as client:
            assert client.server_ready() and client.model_ready(manifest.name)
            ours = client.infer(manifest.name, x)
            assert len(client.predict(manifest.name, [np.zeros((28, 28), np.uint8)] * 2)) == 2
        np.testing.assert_allclose(ours, expected, rtol=1e-5, atol=1e-5)
    got = json.loads(done.stdout)
    assert (got["live"], got["ready"], got["model_ready"]) == (True, True, True)
    assert got["server"]["name"] == "cnnctl"
    assert got["metadata"]["inputs"] == [{"name": "input", "datatype": "FP32",
                                          "shape": ["-1", "1", "32", "32"]}]
    assert got["config"]["max_batch_size"] == 64
    assert got["config"]["parameters"]["execution_provider"]["string_value"] == \
        "CPUExecutionProvider"
    assert got["id"] == "probe-1"
    logits = np.frombuffer(base64.b64decode(got["logits"]), dtype="<f4").reshape(got["logits_shape"])
    np.testing.assert_allclose(logits, expected, rtol=1e-5, atol=1e-5)
    stats = got["stats"]["model_stats"][0]
    assert stats["inference_count"] == "3"  # the probe's request, before our client's
    assert stats["inference_stats"]["success"]["count"] == "1"
    assert got["errors"]["unknown_model"] == [
        "StatusCode.NOT_FOUND", f"unknown model 'no-such-model'; served models: {manifest.name}"]


@pytest.mark.skipif(importlib.util.find_spec("tritonclient") is None,
                    reason="tritonclient is not installed")
def test_tritonclient_system_shared_memory(trained_artifact: Path, tmp_path: Path) -> None:
    """tritonclient's shared-memory calls against `cnnctl serve --allow-shared-memory`: the input
    read from and the output written to POSIX shared memory equal in-process ONNX Runtime."""
    manifest, x, expected = probe_input(trained_artifact, tmp_path, 4, seed=1)
    with CliServer(str(trained_artifact), "--allow-shared-memory") as server:
        done = subprocess.run([sys.executable, str(PROBE), server.address, manifest.name,
                               str(tmp_path / "x.npy"), "shm"], capture_output=True, text=True,
                              timeout=120)
        assert done.returncode == 0, done.stderr
    got = json.loads(done.stdout)
    assert "system_shared_memory" in got["extensions"]
    assert sorted(got["status"]["regions"]) == ["probe_in", "probe_out"]
    assert got["after"] == {} or got["after"].get("regions", {}) == {}
    out = got["response"]["outputs"][0]
    assert (out["name"], out["shape"]) == ("logits", ["4", "10"])
    assert out["parameters"]["shared_memory_region"]["string_param"] == "probe_out"
    assert got["response"]["raw_output_contents"] == [""]  # one empty entry, as Triton sends
    logits = np.frombuffer(base64.b64decode(got["logits"]), dtype="<f4").reshape(got["logits_shape"])
    np.testing.assert_allclose(logits, expected, rtol=1e-5, atol=1e-5)
    assert got["errors"]["output_too_small"] == [
        "StatusCode.INVALID_ARGUMENT",
        "output 'logits': shared_memory_byte_size 8 is too small; 4 x [10] FP32 needs 160"]


@pytest.mark.skipif(importlib.util.find_spec("tritonclient") is None,
                    reason="tritonclient is not installed")
def test_tritonclient_stream(trained_artifact: Path, tmp_path: Path) -> None:
    """tritonclient's start_stream / async_stream_infer: every request of the stream answered
    with its id and in-process ONNX Runtime's logits; a bad one answered with its error while
    the stream goes on."""
    manifest, x, expected = probe_input(trained_artifact, tmp_path, 3, seed=2)
    with CliServer(str(trained_artifact)) as server:
        done = subprocess.run([sys.executable, str(PROBE), server.address, manifest.name,
                               str(tmp_path / "x.npy"), "stream"], capture_output=True, text=True,
                              timeout=120)
        assert done.returncode == 0, done.stderr
    got = json.loads(done.stdout)
    assert sorted(got["logits"]) == ["row-0", "row-1", "row-2"]
    for i in range(3):
        logits = np.frombuffer(base64.b64decode(got["logits"][f"row-{i}"]), dtype="<f4")
        np.testing.assert_allclose(logits.reshape(1, 10), expected[i:i + 1], rtol=1e-5, atol=1e-5)
    assert got["errors"] == ["input 'input': shape [1, 1, 28, 28] does not match the model's "
                             "[-1, 1, 32, 32] (-1: any batch size from 1)"]
