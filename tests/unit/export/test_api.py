from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from google.protobuf import text_format

from cnnctl.errors import ArtifactError, UsageError, VerificationError
from cnnctl.export import api
from cnnctl.export import onnx as onnx_export
from cnnctl.export.manifest import load_manifest, sha256_file
# Ours, not tritonclient's: the same names and field numbers (tests/unit/serving/test_protos.py), and
# tritonclient's copy cannot share a process with ours (duplicate protobuf symbols).
from cnnctl.protos import model_config_pb2
from cnnctl.training.checkpoint import load_checkpoint

from .helpers import perturb_onnx_weight


@pytest.fixture(scope="module")
def artifact(trained_checkpoints: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> Path:
    """lenet5 exported to ONNX fp32 + int8, TorchScript and a Triton repository."""
    out = tmp_path_factory.mktemp("artifacts") / "lenet5"
    api.export_checkpoint(trained_checkpoints["lenet5"], out, "all", precision="int8", triton=True,
                          calibration_dataset="mnist-sample", verify_images=1000)
    return out


def test_manifest_describes_every_file_and_the_source(
    artifact: Path, trained_checkpoints: dict[str, Path]
) -> None:
    m = load_manifest(artifact)
    assert {(f.path, f.format, f.precision) for f in m.files} == {
        ("model.onnx", "onnx", "fp32"), ("model.int8.onnx", "onnx", "int8"),
        ("model.pt", "torchscript", "fp32")}
    for f in m.files:
        assert f.sha256 == sha256_file(artifact / f.path)
        assert f.bytes == (artifact / f.path).stat().st_size and f.exporter
    assert (m.name, m.model, m.version) == ("lenet5", "lenet5", "1")
    assert (m.input.name, m.input.datatype, m.input.shape) == ("input", "FP32", [-1, 1, 32, 32])
    assert (m.output.name, m.output.shape) == ("logits", [-1, 10])
    assert (m.image.channels, m.image.height, m.image.width) == (1, 32, 32)
    assert m.image.mean == [0.1307] and m.image.std == [0.3081] and m.image.color == "grayscale"
    assert m.class_names == [str(i) for i in range(10)]
    assert m.opset and m.opset >= 18
    ckpt = trained_checkpoints["lenet5"]
    assert m.source["sha256"] == sha256_file(ckpt) and m.source["path"] == str(ckpt.resolve())
    assert m.source["epoch"] == 1
    assert m.verification["passed"] is True
    assert m.verification["real_images"]["dataset"] == "mnist-sample/test"
    assert m.verification["int8_calibration"]["dataset"] == "mnist-sample/train"
    assert m.created and m.cnnctl_version
    assert not list(artifact.parent.glob(".lenet5.tmp-*")), "temp dir left behind"


def test_int8_accuracy_close_to_eager(artifact: Path) -> None:
    checks = {a["path"]: a for a in load_manifest(artifact).verification["artifacts"]}
    int8 = checks["model.int8.onnx"]["real"]
    assert int8["images"] == 1000
    assert abs(int8["accuracy"] - int8["eager_accuracy"]) <= 0.01
    assert int8["argmax_agreement"] >= 0.95
    assert (artifact / "model.int8.onnx").stat().st_size < 0.5 * (artifact / "model.onnx").stat().st_size


def test_triton_repository_config_parses(artifact: Path) -> None:
    m = load_manifest(artifact)
    root = artifact / "triton" / "lenet5"
    assert (root / "1" / "model.onnx").read_bytes() == (artifact / "model.onnx").read_bytes()
    config = text_format.Parse((root / "config.pbtxt").read_text(), model_config_pb2.ModelConfig())
    assert config.name == "lenet5" and config.platform == "onnxruntime_onnx"
    assert config.max_batch_size == m.triton["max_batch_size"] > 0
    assert config.input[0].name == "input" and list(config.input[0].dims) == [1, 32, 32]
    assert config.input[0].data_type == model_config_pb2.TYPE_FP32
    assert config.output[0].name == "logits" and list(config.output[0].dims) == [10]
    assert config.dynamic_batching.max_queue_delay_microseconds > 0


@pytest.mark.parametrize("victim", ["model.onnx", "model.pt", "triton/lenet5/1/model.onnx"])
def test_tampered_file_is_refused_by_load_manifest_and_verify_path(
    artifact: Path, trained_checkpoints: dict[str, Path], tmp_path: Path, victim: str
) -> None:
    import shutil

    copy = tmp_path / "lenet5"
    shutil.copytree(artifact, copy)
    with open(copy / victim, "ab") as f:
        f.write(b"\0")
    with pytest.raises(ArtifactError, match="does not match the manifest"):
        load_manifest(copy)
    with pytest.raises(ArtifactError, match="refusing to load it"):
        api.verify_artifact_dir(copy, trained_checkpoints["lenet5"], verify_images=50)


def test_verify_artifact_dir_passes_on_untouched_artifact(
    artifact: Path, trained_checkpoints: dict[str, Path]
) -> None:
    report = api.verify_artifact_dir(artifact, trained_checkpoints["lenet5"], verify_images=1000)
    assert report["passed"] and len(report["artifacts"]) == 3


def test_refuses_non_empty_out_dir_without_force(
    trained_checkpoints: dict[str, Path], tmp_path: Path
) -> None:
    (tmp_path / "keep.txt").write_text("mine")
    with pytest.raises(UsageError, match="not empty; pass --force"):
        api.export_checkpoint(trained_checkpoints["lenet5"], tmp_path, "onnx")
    assert (tmp_path / "keep.txt").read_text() == "mine"


def test_force_replaces_and_bare_state_dict_with_model_name(
    trained_checkpoints: dict[str, Path], tmp_path: Path
) -> None:
    sd_path = tmp_path / "seed_state_dict.pt"
    torch.save(load_checkpoint(trained_checkpoints["lenet5"])["state_dict"], sd_path)
    out = tmp_path / "out"
    out.mkdir()
    (out / "stale.txt").write_text("old")
    m = api.export_checkpoint(sd_path, out, "torchscript", model_name="lenet5", name="digits",
                              version="3", force=True, verify_images=200)
    assert sorted(p.name for p in out.iterdir()) == ["golden.npz", "manifest.json", "model.pt"]
    assert (m.name, m.version) == ("digits", "3")
    # the bare state_dict names no dataset: the verifier says it fell back to mnist-sample
    assert "fell back to the embedded mnist-sample" in m.verification["real_images"]["note"]


def test_failed_verification_writes_nothing(
    trained_checkpoints: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    real_export = onnx_export.export_onnx

    def broken_export(*args: object, **kwargs: object) -> onnx_export.OnnxExport:
        result = real_export(*args, **kwargs)
        perturb_onnx_weight(result.path, factor=1.02)
        return result

    monkeypatch.setattr(onnx_export, "export_onnx", broken_export)
    out = tmp_path / "lenet5"
    with pytest.raises(VerificationError, match=r"model\.onnx \(onnx fp32\)"):
        api.export_checkpoint(trained_checkpoints["lenet5"], out, "onnx", verify_images=100)
    assert list(tmp_path.iterdir()) == [], "a failed export left files behind"


@pytest.mark.parametrize("kwargs, message", [
    ({"formats": "tflite"}, "unknown export format 'tflite'; known: onnx, torchscript"),
    ({"precision": "int4"}, "unknown precision 'int4'; known: fp32, fp16, int8"),
    ({"formats": "torchscript", "precision": "fp16"}, "applies to ONNX files"),
    ({"name": "../evil"}, "invalid model name '../evil'; allowed: 1-128 letters, digits"),
    ({"name": "a..b"}, "invalid model name 'a..b'; allowed: 1-128 letters, digits"),
    ({"version": "1/2"}, "invalid model version '1/2'; allowed: 1-128 letters, digits"),
    ({"opset": 3}, "--opset 3 is out of range"),
])
def test_bad_arguments_name_value_and_allowed(
    trained_checkpoints: dict[str, Path], tmp_path: Path, kwargs: dict, message: str
) -> None:
    with pytest.raises(UsageError, match=message.replace("(", r"\(").replace(".", r"\.")):
        api.export_checkpoint(trained_checkpoints["lenet5"], tmp_path / "o", **kwargs)


def test_fp16_file_kept_beside_fp32(trained_checkpoints: dict[str, Path], tmp_path: Path) -> None:
    m = api.export_checkpoint(trained_checkpoints["lenet5"], tmp_path / "o", "onnx",
                              precision="fp16", verify_images=300)
    assert [(f.path, f.precision) for f in m.files] == [("model.onnx", "fp32"),
                                                         ("model.fp16.onnx", "fp16")]
    fp16 = m.verification["artifacts"][1]
    assert fp16["passed"] and fp16["real"]["argmax_agreement"] >= 0.99
    assert json.loads((tmp_path / "o" / "manifest.json").read_text())["files"][1]["precision"] == "fp16"


def test_golden_set_holds_real_held_out_images_and_eager_logits(
        artifact: Path, trained_checkpoints: dict[str, Path]) -> None:
    """The golden set (export/golden.py): the first held-out images verification used, at the
    model's size; the eager model's logits on them through the artifact's own image spec; a
    tolerance per precision of the artifact's files; listed (and sha256-checked) like a file."""
    import numpy as np

    from cnnctl.export import golden
    from cnnctl.export.manifest import listed_files
    from cnnctl.training.checkpoint import model_from_checkpoint

    m = load_manifest(artifact)
    g = golden.read_golden(artifact, m)
    assert (m.golden["images"], m.golden["dataset"], m.golden["labels"]) == (
        golden.GOLDEN_IMAGES, "mnist-sample/test", True)
    assert sorted(m.golden["tolerance"]) == ["fp32", "fp32-cuda", "int8"]
    assert ("golden.npz", m.golden["file"]["sha256"], m.golden["file"]["bytes"]) in \
        listed_files(m)
    assert g.pixels.shape == (golden.GOLDEN_IMAGES, 32, 32, 1) and g.pixels.dtype == np.uint8
    assert len(np.unique(g.labels)) >= 5  # real, labelled images, several classes
    model = model_from_checkpoint(load_checkpoint(trained_checkpoints["lenet5"]), "cpu",
                                  check_inputs=False).eval()
    with torch.no_grad():
        eager = model(torch.from_numpy(g.inputs(m))).numpy()
    np.testing.assert_allclose(g.logits, eager, rtol=1e-6, atol=1e-6)
    # The served files pass it with their own tolerance; the int8 file fails fp32's.
    import onnxruntime as ort

    def run(path: str) -> np.ndarray:
        s = ort.InferenceSession(str(artifact / path), providers=["CPUExecutionProvider"])
        return s.run(["logits"], {"input": g.inputs(m)})[0]

    assert golden.compare(run("model.onnx"), g, golden.tolerance_for(m, "fp32")).passed
    assert golden.compare(run("model.int8.onnx"), g, golden.tolerance_for(m, "int8")).passed
    assert not golden.compare(run("model.int8.onnx"), g, golden.tolerance_for(m, "fp32")).passed
