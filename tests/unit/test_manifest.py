from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from cnnctl.errors import ArtifactError
from cnnctl.export import manifest as mf


def _artifact(tmp_path: Path) -> tuple[Path, mf.Manifest]:
    (tmp_path / "model.onnx").write_bytes(b"not really onnx, but bytes with a digest")
    entry = mf.file_entry(tmp_path, "model.onnx", "onnx", "fp32")
    m = mf.Manifest(
        name="lenet5", model="lenet5", version="1", files=[entry],
        input=mf.TensorSpec("input", "FP32", [-1, 1, 32, 32]),
        output=mf.TensorSpec("logits", "FP32", [-1, 10]),
        image=mf.ImageSpec(1, 32, 32, [0.1307], [0.3081]),
        class_names=[str(i) for i in range(10)], opset=18,
    )
    mf.save_manifest(tmp_path, m)
    return tmp_path, m


def test_round_trip(tmp_path: Path) -> None:
    d, m = _artifact(tmp_path)
    loaded = mf.load_manifest(d)
    assert loaded == m
    data = json.loads((d / "manifest.json").read_text())
    assert data["format"] == "cnnctl.artifact" and data["format_version"] == 1
    assert data["image"]["color"] == "grayscale"
    assert loaded.file("onnx").sha256 == mf.sha256_file(d / "model.onnx")
    assert loaded.file("torchscript") is None


def test_tampered_file_is_refused(tmp_path: Path) -> None:
    d, _ = _artifact(tmp_path)
    with open(d / "model.onnx", "ab") as f:
        f.write(b"!")
    with pytest.raises(ArtifactError, match="sha256 .* does not match the manifest"):
        mf.load_manifest(d)


def test_missing_file_and_bad_version(tmp_path: Path) -> None:
    d, _ = _artifact(tmp_path)
    data = json.loads((d / "manifest.json").read_text())
    data["format_version"] = 99
    (d / "manifest.json").write_text(json.dumps(data))
    with pytest.raises(ArtifactError, match="format_version 99 is not supported"):
        mf.load_manifest(d)
    (d / "manifest.json").unlink()
    with pytest.raises(ArtifactError, match="no manifest.json"):
        mf.load_manifest(d)
    with pytest.raises(ArtifactError, match="does not exist"):
        mf.load_manifest(d / "nope")


def test_manifest_module_imports_no_torch() -> None:
    code = "import sys, cnnctl.export.manifest; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"
