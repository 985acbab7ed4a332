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
        ((str(artifact), "--tls-client-ca", "ca.pem"),
         "error: --tls-client-ca needs --tls-cert and --tls-key: client certificates are "
         "checked only over TLS"),
        ((str(artifact), "--allow-shared-memory", "--host", "0.0.0.0"),
         "error: --allow-shared-memory with --host 0.0.0.0, which other machines may reach: "
         "shared memory is for clients on this host; use a loopback --host, or add "
         "--allow-shared-memory-non-loopback-host (remote peers are still refused)"),
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


def test_out_of_range_options_exit_2_naming_value_and_range(artifact: Path) -> None:
    cases = [
        (("--max-batch-size", "0"), "'--max-batch-size': 0 is not in the range x>=1."),
        (("--inline-full-below-us", "-1"), "'--inline-full-below-us': -1.0 is not in the range "
         "x>=0."),
        (("--gather-max-ms", "-5"), "'--gather-max-ms': -5.0 is not in the range x>=0."),
        (("--port", "70000"), "'--port': 70000 is not in the range 0<=x<=65535."),
        (("--device", "tpu"), "'--device': 'tpu' is not one of 'auto', 'cpu', 'cuda'."),
        (("--allow-shared-memory", "--max-shared-memory-regions", "0"),
         "'--max-shared-memory-regions': 0 is not in the range x>=1."),
    ]
    for args, message in cases:
        done = serve(str(artifact), *args)
        assert done.returncode == 2
        assert done.stderr == f"error: Invalid value for {message} (see 'cnnctl serve -h')\n"


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
