"""PyTorch → ONNX: the current (dynamo) exporter, a dynamic batch dimension, a full checker pass.

The model is traced with a batch of 2: a batch of 1 lets the exporter specialise the batch
dimension to a constant (the classic "works for one image, fails for eight" pitfall), so the
exported graph carries a symbolic ``batch`` dimension on ``input`` and ``logits``. If the dynamo
exporter cannot handle a model, the legacy TorchScript-based exporter is tried, and which one wrote
the file is recorded (it ends up in the manifest).
"""

from __future__ import annotations

import logging
import os
import warnings
from dataclasses import dataclass
from pathlib import Path

import onnx
import torch
from torch import nn

from cnnctl.errors import ArtifactError

log = logging.getLogger(__name__)

INPUT_NAME = "input"
OUTPUT_NAME = "logits"
EXPORT_BATCH = 2  # >= 2 so the batch dimension stays symbolic
LEGACY_DEFAULT_OPSET = 18


@dataclass(frozen=True)
class OnnxExport:
    path: Path
    exporter: str  # "torch.onnx(dynamo=True)" or "torch.onnx(dynamo=False)"
    opset: int


def opset_of(model: onnx.ModelProto) -> int:
    return next(int(o.version) for o in model.opset_import if o.domain in ("", "ai.onnx"))


def _export_dynamo(model: nn.Module, example: torch.Tensor, path: Path, opset: int | None) -> None:
    batch = torch.export.Dim("batch", min=1, max=1 << 20)
    program = torch.onnx.export(
        model, (example,), input_names=[INPUT_NAME], output_names=[OUTPUT_NAME],
        dynamic_shapes=({0: batch},), opset_version=opset, dynamo=True, verbose=False,
    )
    if program is None:  # pragma: no cover - dynamo=True always returns a program
        raise RuntimeError("torch.onnx.export returned no program")
    program.save(str(path), external_data=False)


def _export_legacy(model: nn.Module, example: torch.Tensor, path: Path, opset: int | None) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", category=DeprecationWarning)
        warnings.simplefilter("ignore", category=FutureWarning)
        torch.onnx.export(
            model, (example,), str(path), input_names=[INPUT_NAME], output_names=[OUTPUT_NAME],
            dynamic_axes={INPUT_NAME: {0: "batch"}, OUTPUT_NAME: {0: "batch"}},
            opset_version=opset or LEGACY_DEFAULT_OPSET, dynamo=False,
        )


def export_onnx(
    model: nn.Module, input_shape: tuple[int, int, int], path: str | os.PathLike[str],
    opset: int | None = None,
) -> OnnxExport:
    """Export an eval-mode model to ``path`` and run ``onnx.checker`` (full check) on the result."""
    path = Path(path)
    model = model.eval()
    example = torch.randn(EXPORT_BATCH, *input_shape)
    exporter = "torch.onnx(dynamo=True)"
    try:
        _export_dynamo(model, example, path, opset)
    except Exception as exc:  # the dynamo exporter raises many types; any failure → legacy
        log.warning("dynamo ONNX exporter failed (%s: %s); falling back to dynamo=False",
                    type(exc).__name__, str(exc).splitlines()[0] if str(exc) else "")
        path.unlink(missing_ok=True)
        exporter = "torch.onnx(dynamo=False)"
        _export_legacy(model, example, path, opset)
    check(path)
    proto = onnx.load(str(path), load_external_data=False)
    _check_io(proto, path)
    return OnnxExport(path, exporter, opset_of(proto))


def check(path: str | os.PathLike[str]) -> None:
    """``onnx.checker`` with shape inference (full_check); an invalid graph is an ArtifactError."""
    try:
        onnx.checker.check_model(str(path), full_check=True)
    except (onnx.checker.ValidationError, onnx.shape_inference.InferenceError) as exc:
        raise ArtifactError(f"{path}: onnx.checker rejected the model: {exc}") from None


def _check_io(proto: onnx.ModelProto, path: Path) -> None:
    """The contract serving relies on: one input ``input`` and one output ``logits``, both with a
    symbolic (not fixed) batch dimension."""
    for kind, values, name in (("input", proto.graph.input, INPUT_NAME),
                               ("output", proto.graph.output, OUTPUT_NAME)):
        names = [v.name for v in values]
        if names != [name]:
            raise ArtifactError(f"{path}: graph {kind}s are {names}, expected [{name!r}]")
        dim0 = values[0].type.tensor_type.shape.dim[0]
        if dim0.HasField("dim_value"):
            raise ArtifactError(
                f"{path}: {kind} {name!r} has a fixed batch dimension {dim0.dim_value}; "
                f"expected a symbolic one"
            )


def convert_fp16(src: str | os.PathLike[str], dst: str | os.PathLike[str]) -> None:
    """fp16 weights and compute for GPU serving; ``input``/``logits`` stay fp32 (keep_io_types), so
    clients and the manifest's FP32 input spec do not change."""
    from onnxruntime.transformers.float16 import convert_float_to_float16

    model = onnx.load(str(src))
    with warnings.catch_warnings():
        # It warns for every fp32 constant it clamps into the fp16 range; the verifier measures
        # what that costs instead.
        warnings.simplefilter("ignore", category=UserWarning)
        half = convert_float_to_float16(model, keep_io_types=True)
    _topological_sort(half.graph)
    onnx.save(half, str(dst))
    check(dst)


def _topological_sort(graph: onnx.GraphProto) -> None:
    """Reorder nodes so each comes after its inputs' producers. convert_float_to_float16 appends
    the input Casts it adds (keep_io_types) after their consumers, which onnx.checker rejects."""
    available = {i.name for i in graph.input} | {t.name for t in graph.initializer} | {""}
    pending = list(graph.node)
    ordered: list[onnx.NodeProto] = []
    while pending:
        ready = [n for n in pending if all(i in available for i in n.input)]
        if not ready:
            raise ArtifactError("ONNX graph has a cycle or a dangling input; cannot sort it")
        for n in ready:
            ordered.append(n)
            available.update(n.output)
        pending = [n for n in pending if all(n is not r for r in ready)]
    del graph.node[:]
    graph.node.extend(ordered)
