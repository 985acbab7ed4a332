from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch

from cnnctl.errors import ArtifactError
from cnnctl.export import onnx as onnx_export
from cnnctl.training.models import build_model


@pytest.fixture(scope="module")
def lenet5_onnx(tmp_path_factory: pytest.TempPathFactory) -> tuple[torch.nn.Module, Path]:
    torch.manual_seed(0)
    model = build_model("lenet5", check_inputs=False).eval()
    path = tmp_path_factory.mktemp("onnx") / "model.onnx"
    result = onnx_export.export_onnx(model, (1, 32, 32), path)
    assert result.exporter == "torch.onnx(dynamo=True)"
    assert result.opset >= 18
    return model, path


def test_named_io_and_symbolic_batch(lenet5_onnx: tuple[torch.nn.Module, Path]) -> None:
    _, path = lenet5_onnx
    graph = onnx.load(str(path)).graph
    assert [i.name for i in graph.input] == ["input"]
    assert [o.name for o in graph.output] == ["logits"]
    for value in (graph.input[0], graph.output[0]):
        dim0 = value.type.tensor_type.shape.dim[0]
        assert not dim0.HasField("dim_value") and dim0.dim_param


@pytest.mark.parametrize("batch", [1, 5, 33])
def test_runs_at_batch_sizes_other_than_the_export_batch(
    lenet5_onnx: tuple[torch.nn.Module, Path], batch: int
) -> None:
    model, path = lenet5_onnx
    x = torch.randn(batch, 1, 32, 32)
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    got = session.run(["logits"], {"input": x.numpy()})[0]
    with torch.inference_mode():
        np.testing.assert_allclose(got, model(x).numpy(), atol=1e-5, rtol=1e-5)


def test_fp16_keeps_fp32_io_and_passes_checker(
    lenet5_onnx: tuple[torch.nn.Module, Path], tmp_path: Path
) -> None:
    _, path = lenet5_onnx
    dst = tmp_path / "model.fp16.onnx"
    onnx_export.convert_fp16(path, dst)
    model = onnx.load(str(dst))
    assert model.graph.input[0].type.tensor_type.elem_type == onnx.TensorProto.FLOAT
    assert model.graph.output[0].type.tensor_type.elem_type == onnx.TensorProto.FLOAT
    halves = [t for t in model.graph.initializer if t.data_type == onnx.TensorProto.FLOAT16]
    assert halves, "no fp16 weights after conversion"
    assert dst.stat().st_size < 0.6 * path.stat().st_size


def test_falls_back_to_legacy_exporter(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    def broken(*args: object, **kwargs: object) -> None:
        raise RuntimeError("dynamo cannot trace this")

    monkeypatch.setattr(onnx_export, "_export_dynamo", broken)
    model = build_model("convnet", check_inputs=False).eval()
    result = onnx_export.export_onnx(model, (1, 28, 28), tmp_path / "m.onnx")
    assert result.exporter == "torch.onnx(dynamo=False)"
    session = ort.InferenceSession(str(result.path), providers=["CPUExecutionProvider"])
    x = torch.randn(3, 1, 28, 28)
    with torch.inference_mode():
        np.testing.assert_allclose(session.run(None, {"input": x.numpy()})[0], model(x).numpy(),
                                   atol=1e-5, rtol=1e-5)


def test_checker_rejects_garbage(tmp_path: Path) -> None:
    path = tmp_path / "bad.onnx"
    model = onnx.helper.make_model(onnx.helper.make_graph(
        [onnx.helper.make_node("Relu", ["missing"], ["y"])], "g", [],
        [onnx.helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [1])]))
    onnx.save(model, str(path))
    with pytest.raises(ArtifactError, match="onnx.checker rejected"):
        onnx_export.check(path)
