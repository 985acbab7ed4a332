"""KServe v2 request → validated array (or encoded images), and array → response.

Everything here runs before a request joins a batch, so a malformed request is refused on its own
and never fails the others it would have been batched with. Messages name the bad value and what
the model allows.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from cnnctl.errors import ShapeError, UsageError
from cnnctl.export.manifest import Manifest
from cnnctl.protos import grpc_service_pb2 as pb
from cnnctl.serving.preprocess import split_bytes_tensor

TENSOR_DTYPES = {"FP32": np.dtype("<f4"), "FP16": np.dtype("<f2")}
ALLOWED = "FP32, FP16, BYTES (encoded PNG/JPEG images)"


@dataclass(frozen=True)
class DecodedInput:
    tensor: np.ndarray | None = None  # float32 (n, C, H, W), ready to batch
    images: list[bytes] | None = None  # encoded images, to preprocess off the event loop

    @property
    def batch(self) -> int:
        return len(self.images) if self.images is not None else int(self.tensor.shape[0])


def _fmt(shape: object) -> str:
    return "[" + ", ".join(str(int(s)) for s in shape) + "]"  # type: ignore[attr-defined]


def decode_request(request: pb.ModelInferRequest, manifest: Manifest) -> DecodedInput:
    spec = manifest.input
    fast = _fast_path(request, manifest)
    if fast is not None:
        return fast
    names = [t.name for t in request.inputs]
    if spec.name not in names:
        got = f"got {', '.join(repr(n) for n in names)}" if names else "got no inputs"
        raise UsageError(f"missing input '{spec.name}'; model '{manifest.name}' takes exactly one "
                         f"input, '{spec.name}' ({got})")
    extra = [n for n in names if n != spec.name] or ([spec.name] if len(names) > 1 else [])
    if extra:
        raise UsageError(f"unexpected input '{extra[0]}'; model '{manifest.name}' takes exactly "
                         f"one input, '{spec.name}'")
    for out in request.outputs:
        if out.name != manifest.output.name:
            raise UsageError(f"unknown output '{out.name}' requested; model '{manifest.name}' has "
                             f"one output, '{manifest.output.name}'")
    raw_count = len(request.raw_input_contents)
    if raw_count and raw_count != len(request.inputs):
        raise UsageError(f"raw_input_contents has {raw_count} entries for {len(request.inputs)} "
                         f"input(s); send one per input, in order")
    tensor = request.inputs[0]
    raw = request.raw_input_contents[0] if raw_count else None
    if raw is not None and tensor.HasField("contents"):
        raise UsageError(f"input '{spec.name}' has both raw_input_contents and contents; send one")
    if tensor.datatype == "BYTES":
        return DecodedInput(images=_decode_images(tensor, raw, spec.name))
    dtype = TENSOR_DTYPES.get(tensor.datatype)
    if dtype is None:
        raise UsageError(f"input '{spec.name}': datatype '{tensor.datatype}' is not supported; "
                         f"allowed: {ALLOWED}")
    shape = [int(s) for s in tensor.shape]
    expected = [int(s) for s in spec.shape]
    if (len(shape) != len(expected) or shape[0] < 1
            or any(e != -1 and s != e for s, e in zip(shape, expected))):
        raise ShapeError(f"input '{spec.name}': shape {_fmt(shape)} does not match the model's "
                         f"{_fmt(expected)} (-1: any batch size from 1)")
    count = math.prod(shape)
    if raw is not None:
        need = count * dtype.itemsize
        if len(raw) != need:
            raise UsageError(f"input '{spec.name}': raw contents have {len(raw)} bytes; shape "
                             f"{_fmt(shape)} of {tensor.datatype} needs {need}")
        array = np.frombuffer(raw, dtype=dtype).reshape(shape)
    elif tensor.HasField("contents"):
        if tensor.datatype != "FP32":
            raise UsageError(f"input '{spec.name}': {tensor.datatype} has no typed contents field; "
                             f"send it as raw_input_contents")
        values = tensor.contents.fp32_contents
        if len(values) != count:
            raise UsageError(f"input '{spec.name}': contents hold {len(values)} fp32 values; shape "
                             f"{_fmt(shape)} needs {count}")
        array = np.asarray(values, dtype=np.float32).reshape(shape)
    else:
        raise UsageError(f"input '{spec.name}' has no data: send raw_input_contents or contents")
    return DecodedInput(tensor=array.astype(np.float32, copy=False))


def _fast_path(request: pb.ModelInferRequest, manifest: Manifest) -> DecodedInput | None:
    """The common case, checked cheaply (it runs on the event loop for every request): one FP32
    input named right, in raw contents of the right length, no outputs requested by another name.
    Anything else goes through the full checks, which name what is wrong."""
    inputs = request.inputs
    if len(inputs) != 1 or len(request.raw_input_contents) != 1:
        return None
    tensor = inputs[0]
    spec = manifest.input
    if tensor.name != spec.name or tensor.datatype != "FP32" or tensor.HasField("contents"):
        return None
    shape = list(tensor.shape)
    expected = spec.shape
    if len(shape) != len(expected) or shape[0] < 1 or shape[1:] != expected[1:]:
        return None
    for out in request.outputs:
        if out.name != manifest.output.name:
            return None
    raw = request.raw_input_contents[0]
    if len(raw) != 4 * math.prod(shape):
        return None
    return DecodedInput(tensor=np.frombuffer(raw, dtype="<f4").reshape(shape))


def _decode_images(tensor: pb.ModelInferRequest.InferInputTensor, raw: bytes | None,
                   name: str) -> list[bytes]:
    shape = [int(s) for s in tensor.shape]
    if not (len(shape) == 1 or (len(shape) == 2 and shape[1] == 1)) or shape[0] < 1:
        raise ShapeError(f"input '{name}': a BYTES input of encoded images must have shape [n] or "
                         f"[n, 1] with n from 1, got {_fmt(shape)}")
    if raw is not None:
        images = split_bytes_tensor(raw, name)
    elif tensor.HasField("contents"):
        images = list(tensor.contents.bytes_contents)
    else:
        raise UsageError(f"input '{name}' has no data: send raw_input_contents or contents")
    if len(images) != shape[0]:
        raise UsageError(f"input '{name}': shape {_fmt(shape)} says {shape[0]} images but the "
                         f"contents hold {len(images)}")
    return images


def encode_response(request: pb.ModelInferRequest, manifest: Manifest,
                    output: np.ndarray) -> pb.ModelInferResponse:
    output = np.ascontiguousarray(output, dtype="<f4")
    response = pb.ModelInferResponse(model_name=manifest.name, model_version=manifest.version,
                                     id=request.id)
    response.outputs.add(name=manifest.output.name, datatype="FP32", shape=output.shape)
    response.raw_output_contents.append(output.tobytes())
    return response
