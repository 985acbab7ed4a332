"""The base install, as a user gets it: a fresh venv with `pip install . 'tritonclient[grpc]'`
(no extras; the newest tritonclient, which caps protobuf below 7). There `import torch` fails,
`cnnctl train` says which extra it needs in one line, and `cnnctl serve`, `predict` and `bench`
work; one Python process imports both tritonclient.grpc and cnnctl.clients and gets the same
answer from the server through each."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import venv
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from tests.support.serving import CliServer, make_artifact

ROOT = Path(__file__).resolve().parents[2]

BOTH_CLIENTS = r'''
import json, sys
import numpy as np
import tritonclient.grpc as triton
from cnnctl.clients import Client

address, x_path = sys.argv[1], sys.argv[2]
x = np.load(x_path)
with Client(address) as ours:
    mine = ours.infer("lenet5", x)
theirs = triton.InferenceServerClient(address)
inp = triton.InferInput("input", list(x.shape), "FP32")
inp.set_data_from_numpy(x)
result = theirs.infer("lenet5", [inp], outputs=[triton.InferRequestedOutput("logits")])
np.testing.assert_allclose(result.as_numpy("logits"), mine, rtol=1e-6, atol=1e-6)
import google.protobuf, tritonclient
from importlib.metadata import version
print(json.dumps({"protobuf": google.protobuf.__version__, "tritonclient": version("tritonclient"),
                  "logits": mine.tolist()}))
'''


@pytest.fixture(scope="module")
def base_venv(tmp_path_factory: pytest.TempPathFactory) -> Path:
    env_dir = tmp_path_factory.mktemp("base") / "venv"
    venv.create(env_dir, with_pip=True)
    python = env_dir / "bin" / "python"
    done = subprocess.run([str(python), "-m", "pip", "install", "-q", "--disable-pip-version-check",
                           str(ROOT), "tritonclient[grpc]"], capture_output=True, text=True,
                          timeout=600)
    if done.returncode != 0:
        if os.environ.get("CI") == "true":
            pytest.fail(f"pip install . 'tritonclient[grpc]' failed:\n{done.stderr[-3000:]}")
        pytest.skip(f"cannot install from the package index here: {done.stderr[-300:]}")
    return env_dir / "bin"


def _run(exe: Path, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    done = subprocess.run([str(exe), *args], capture_output=True, text=True, timeout=300,
                          cwd=exe.parent)  # not the repo: its folders must not shadow the install
    if check:
        assert done.returncode == 0, done.stdout + done.stderr
    return done


def test_base_install_has_no_torch_and_says_which_extra(base_venv: Path) -> None:
    no_torch = _run(base_venv / "python", "-c", "import torch", check=False)
    assert no_torch.returncode != 0 and "No module named 'torch'" in no_torch.stderr
    train = _run(base_venv / "cnnctl", "train", "--model", "lenet5", check=False)
    assert train.returncode == 2
    lines = train.stderr.strip().splitlines()
    assert len(lines) == 1 and "pip install 'cnnctl[train]'" in lines[0], train.stderr


def test_base_install_serves_predicts_and_benches(base_venv: Path, tmp_path: Path) -> None:
    artifact = make_artifact(tmp_path / "lenet5")  # made here: the base install cannot export
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (28, 28), dtype=np.uint8)).save(
        tmp_path / "digit.png")
    np.save(tmp_path / "x.npy",
            np.random.default_rng(1).standard_normal((2, 1, 32, 32), dtype=np.float32))
    with CliServer(str(artifact), python=str(base_venv / "python"),
                   cwd=tmp_path) as server:
        predict = _run(base_venv / "cnnctl", "predict", "--server", server.address, "--model",
                       "lenet5", "--json", str(tmp_path / "digit.png"))
        assert json.loads(predict.stdout)["model"] == "lenet5"
        bench = _run(base_venv / "cnnctl", "bench", "--server", server.address, "--model",
                     "lenet5", "--concurrency", "2", "--duration", "1", "--warmup", "0.2",
                     "--json", "--no-progress")
        assert json.loads(bench.stdout), bench.stdout
        both = json.loads(_run(base_venv / "python", "-c", BOTH_CLIENTS, server.address,
                               str(tmp_path / "x.npy")).stdout)
    assert np.asarray(both["logits"]).shape == (2, 10)
    print(f"base install: tritonclient {both['tritonclient']}, protobuf {both['protobuf']}")
