"""`cnnctl serve` user errors: one line on stderr, exit code 2, before anything is served."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from tests.support.serving import make_artifact


def serve(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "cnnctl", "-q", "serve", "--port", "0", *args],
                          capture_output=True, text=True, timeout=60)


@pytest.fixture(scope="module")
def artifact(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_artifact(tmp_path_factory.mktemp("cli") / "lenet5")


def test_user_errors_are_one_line_exit_2(artifact: Path, tmp_path: Path) -> None:
    cases = [
        ((), "error: nothing to serve: give ARTIFACT_DIR arguments or --repository DIR"),
        ((str(tmp_path / "nope"),), f"error: artifact directory '{tmp_path / 'nope'}' does not exist"),
        ((str(artifact), "--tls-cert", "x.pem"),
         "error: --tls-cert and --tls-key go together; give both or neither"),
        ((str(artifact), "--max-batch-size", "0"), "error: --max-batch-size must be at least 1, got 0"),
        ((str(artifact), "--inline-full-below-us", "-1"),
         "error: --inline-full-below-us must be at least 0, got -1.0"),
        ((str(artifact), "--gather-max-ms", "-5"),
         "error: --gather-max-ms must be at least 0, got -5.0"),
        ((str(artifact), "--device", "cuda"), "error: --device cuda: no usable CUDA GPU "
         "(onnxruntime's CUDA provider did not initialise); use --device auto or cpu"),
    ]
    for args, message in cases:
        if args[-2:] == ("--device", "cuda"):
            pytest.importorskip("onnxruntime")
            import ctypes

            try:
                ctypes.CDLL("libcuda.so.1")
                continue  # a GPU machine: --device cuda is valid there
            except OSError:
                pass
        done = serve(*args)
        assert (done.returncode, done.stderr.strip()) == (2, message)


def test_tampered_artifact_is_refused(artifact: Path, tmp_path: Path) -> None:
    import shutil

    copy = Path(shutil.copytree(artifact, tmp_path / "tampered"))
    with open(copy / "model.onnx", "r+b") as f:
        f.seek(200)
        f.write(b"\x00\x01")
    done = serve(str(copy))
    assert done.returncode == 2
    assert done.stderr.strip().startswith(f"error: {copy / 'model.onnx'}: sha256 ")
    assert done.stderr.strip().endswith("(file changed after export); refusing to load it")
