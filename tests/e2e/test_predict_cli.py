"""``cnnctl predict`` as users run it: a subprocess against ``cnnctl serve`` on a free port."""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from cnnctl.clients.client import Client
from tests.support.serving import CliServer, make_artifact


def cnnctl(*args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "cnnctl", *args], capture_output=True, text=True,
                          timeout=timeout)


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[CliServer, Path]]:
    root = tmp_path_factory.mktemp("predict-e2e")
    artifact = make_artifact(root / "lenet5", "lenet5")
    images = root / "images"
    images.mkdir()
    from importlib import resources

    with resources.files("cnnctl.training").joinpath("sample/mnist_sample.npz").open("rb") as f:
        digits = np.load(f)["test_images"][:3]
    for i, d in enumerate(digits):
        Image.fromarray(d).save(images / f"digit{i}.png")
    with CliServer(str(artifact), "--intra-op-threads", "1") as server:
        yield server, images


def test_predict_table_and_json_agree_with_the_client(served: tuple[CliServer, Path]) -> None:
    server, images = served
    files = sorted(images.glob("*.png"))
    with Client(server.address) as c:
        want = c.predict("lenet5", files, top_k=3)
    table = cnnctl("predict", "--server", server.address, "--model", "lenet5", "--top-k", "3",
                   str(images))
    assert table.returncode == 0, table.stderr
    lines = table.stdout.splitlines()
    assert lines[0].split()[:3] == ["IMAGE", "LABEL", "PROB"] and len(lines) == 1 + len(files)
    for line, f, w in zip(lines[1:], files, want):
        assert line.split()[:3] == [str(f), w.label, f"{w.probability:.3f}"]
    doc = json.loads(cnnctl("predict", "--server", server.address, "--model", "lenet5", "--json",
                            "--top-k", "2", "--logits", *map(str, files)).stdout)
    assert [p["image"] for p in doc["predictions"]] == [str(f) for f in files]
    for p, w in zip(doc["predictions"], want):
        assert [t["label"] for t in p["top"]] == list(w.labels[:2])
        assert len(p["logits"]) == 10


def test_predict_errors_exit_2(served: tuple[CliServer, Path]) -> None:
    server, images = served
    one = str(next(images.glob("*.png")))
    r = cnnctl("predict", "--server", server.address, "--model", "lenet6", one)
    assert (r.returncode, r.stderr) == (2, "error: unknown model 'lenet6'; served models: lenet5\n")
    r = cnnctl("predict", "--server", server.address, "--model", "lenet5", "/no/such.png")
    assert r.returncode == 2
    assert r.stderr == ("error: Invalid value for 'IMAGES...': Path '/no/such.png' does not "
                        "exist. (see 'cnnctl predict -h')\n")


def test_predict_never_imports_torch(served: tuple[CliServer, Path]) -> None:
    server, images = served
    code = (
        "import sys\n"
        "from cnnctl.cli import cli\n"
        f"cli.main(['-q', 'predict', '--server', {server.address!r}, '--model', 'lenet5', "
        f"{str(images)!r}], standalone_mode=False)\n"
        "heavy = sorted(m for m in ('torch', 'torchvision', 'onnxruntime', 'onnx') "
        "if m in sys.modules)\n"
        "print('HEAVY', heavy)\n"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    assert "HEAVY []" in r.stdout.splitlines()
    assert len([ln for ln in r.stdout.splitlines() if ln.endswith(".png") or ".png " in ln]) == 3
