"""examples/classify_folder.py against ``cnnctl serve`` on a free port."""

from __future__ import annotations

import subprocess
import sys
from importlib import resources
from pathlib import Path

import numpy as np
from PIL import Image

from tests.support.serving import CliServer, make_artifact

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "classify_folder.py"


def test_classify_folder_prints_a_table_and_accuracy(tmp_path: Path) -> None:
    with resources.files("cnnctl.training").joinpath("sample/mnist_sample.npz").open("rb") as f:
        data = np.load(f)
        images, labels = data["test_images"][:12], data["test_labels"][:12]
    folder = tmp_path / "digits"
    folder.mkdir()
    for i, (img, y) in enumerate(zip(images, labels)):
        Image.fromarray(img).save(folder / f"digit{i:02d}_{y}.png")
    artifact = make_artifact(tmp_path / "lenet5", "lenet5")
    with CliServer(str(artifact), "--intra-op-threads", "1", "--max-batch-size", "5") as server:
        r = subprocess.run([sys.executable, str(EXAMPLE), str(folder), "--server", server.address,
                            "--model", "lenet5", "--labels"], capture_output=True, text=True,
                           timeout=60)
        assert r.returncode == 0, r.stderr
        lines = r.stdout.splitlines()
        assert lines[0].split()[:3] == ["FILE", "LABEL", "PROB"]
        assert [ln.split()[0] for ln in lines[1:13]] == sorted(p.name for p in folder.iterdir())
        assert lines[13].startswith("12 images in ")
        assert lines[14].startswith("accuracy: ") and lines[14].split()[1].endswith("/12")
        r = subprocess.run([sys.executable, str(EXAMPLE), str(folder), "--server", server.address,
                            "--model", "lenet9"], capture_output=True, text=True, timeout=60)
        assert (r.returncode, r.stderr) == (2, "error: unknown model 'lenet9'; served models: "
                                               "lenet5\n")
