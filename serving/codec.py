"""KServe v2 request → validated array (or encoded images), and array → response.

Everything here runs before a request joins a batch, so a malformed request is refused on its own
and never fails the others it would have been batched with. Messages name the bad value and what
the model allows.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from cnnctl.errors import CnnctlError, NotEnabledError, ShapeError, UsageError
from cnnctl.export.manifest import Manifest
from cnnctl.protos import grpc_service_pb2 as pb
from cnnctl.serving.preprocess import split_bytes_tensor
from cnnctl.serving.shm import SharedMemoryRegistry

TENSOR_DTYPES = {"FP32": np.dtype("<f4"), "FP16": np.dtype("<f2")}
ALLOWED = "FP32, FP16, BYTES (encoded PNG/JPEG images)"


@dataclass(frozen=True)
class DecodedInput:
    tensor: np.ndarray | None = None  # float32 (n, C, H, W), ready to batch
    images: list[bytes] | None = None  # encoded images, to preprocess off the event loop
    output_view: memoryview | None = None  # where the output goes when it is in shared memory

    @property
    def batch(self) -> int:
        return len(self.images) if self.images is not None else int(self.tensor.shape[0])


def _fmt(shape: object) -> str:
    return "[" + ", ".join(str(int(s)) for s in shape) + "]"  # type: ignore[attr-defined]


SHM_REGION = "shared_memory_region"
SHM_OFFSET = "shared_memory_offset"
SHM_SIZE = "shared_memory_byte_size"


def decode_request(request: pb.ModelInferRequest, manifest: Manifest,
                   shm: SharedMemoryRegistry | None = None) -> DecodedInput:
    """``shm``: the server's shared-memory regions (None: the extension is off)."""
    spec = manifest.input
    fast = fast_tensor(request, manifest)
    if fast is not None:
        return DecodedInput(tensor=fast)
    names = [t.name for t in request.inputs]
    if spec.name not in names:
        got = f"got {', '.join(repr(n) for n in names)}" if names else "got no inputs"
        raise UsageError(f"missing input '{spec.name}'; model '{manifest.name}' takes exactly one "
                         f"input, '{spec.name}' ({got})")
    extra = [n for n in names if n != spec.name] or ([spec.name] if len(names) > 1 else [])
    if extra:
        raise UsageError(f"unexpected input '{extra[0]}'; model '{manifest.name}' takes exactly "
                         f"one input, '{spec.name}'")
    output_shm = None
    for out in request.outputs:
        if out.name != manifest.output.name:
            raise UsageError(f"unknown output '{out.name}' requested; model '{manifest.name}' has "
                             f"one output, '{manifest.output.name}'")
        output_shm = _shm_params(out.parameters, f"output '{out.name}'", shm is not None)
    raw_count = len(request.raw_input_contents)
    if raw_count and raw_count != len(request.inputs):
        raise UsageError(f"raw_input_contents has {raw_count} entries for {len(request.inputs)} "
                         f"input(s); send one per input, in order")
    tensor = request.inputs[0]
    raw: bytes | memoryview | None = request.raw_input_contents[0] if raw_count else None
    if raw is not None and tensor.HasField("contents"):
        raise UsageError(f"input '{spec.name}' has both raw_input_contents and contents; send one")
    input_shm = _shm_params(tensor.parameters, f"input '{spec.name}'", shm is not None)
    if input_shm is not None:
        if raw is not None or tensor.HasField("contents"):
            raise UsageError(f"input '{spec.name}' has both a shared-memory region and contents "
                             f"in the message; send one")
        raw = shm.view(*input_shm, tensor=f"input '{spec.name}'")  # type: ignore[union-attr]
    if tensor.datatype == "BYTES":
        images = _decode_images(tensor, None if raw is None else bytes(raw), spec.name)
        return DecodedInput(images=images,
                            output_view=_output_view(output_shm, len(images), manifest, shm))
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
            what = "shared_memory_byte_size is" if input_shm else "raw contents have"
            raise UsageError(f"input '{spec.name}': {what} {len(raw)} bytes; shape "
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
    return DecodedInput(tensor=array.astype(np.float32, copy=False),
                        output_view=_output_view(output_shm, shape[0], manifest, shm))


def _output_view(output_shm: tuple[str, int, int] | None, n: int, manifest: Manifest,
                 shm: SharedMemoryRegistry | None) -> memoryview | None:
    """Where the output of ``n`` images goes when the request put it in shared memory."""
    if output_shm is None:
        return None
    name = f"output '{manifest.output.name}'"
    region, offset, size = output_shm
    need = n * math.prod(manifest.output.shape[1:]) * 4
    if size < need:
        raise UsageError(f"{name}: shared_memory_byte_size {size} is too small; "
                         f"{n} x {_fmt(manifest.output.shape[1:])} FP32 needs {need}")
    return shm.view(region, offset, size, tensor=name)[:need]  # type: ignore[union-attr]


def _shm_params(params: object, tensor: str, enabled: bool) -> tuple[str, int, int] | None:
    """(region, offset, byte_size) when a tensor's parameters put it in shared memory;
    ``enabled``: the server has the extension on."""
    if SHM_REGION not in params and SHM_SIZE not in params:  # type: ignore[operator]
        return None
    if not enabled:
        raise NotEnabledError(f"{tensor} names a shared-memory region, but shared memory is off; "
                              f"start cnnctl serve with --allow-shared-memory")
    if SHM_REGION not in params or SHM_SIZE not in params:  # type: ignore[operator]
        raise UsageError(f"{tensor}: {SHM_REGION} and {SHM_SIZE} go together; give both")
    region = params[SHM_REGION]  # type: ignore[index]
    if region.WhichOneof("parameter_choice") != "string_param":
        raise UsageError(f"{tensor}: {SHM_REGION} must be a string parameter")
    values = []
    for key in (SHM_OFFSET, SHM_SIZE):
        p = params[key] if key in params else None  # type: ignore[index, operator]
        kind = p.WhichOneof("parameter_choice") if p is not None else None
        if p is not None and kind not in ("int64_param", "uint64_param"):
            raise UsageError(f"{tensor}: {key} must be an integer parameter, got {kind}")
        value = 0 if p is None else getattr(p, kind)
        if value < 0:
            raise UsageError(f"{tensor}: {key} must be at least 0, got {value}")
        values.append(int(value))
    return region.string_param, values[0], values[1]


_F32 = np.dtype("<f4")
_CACHE_MAX = 256  # entries per FastCodec cache; beyond it requests are checked field by field
_SHM_KEYS = frozenset((SHM_REGION, SHM_OFFSET, SHM_SIZE))


@dataclass(frozen=True)
class _ShmRequest:
    """A checked shared-memory request description (FastCodec.shm_tensor)."""
    shape: tuple[int, ...]
    input: tuple[str, int, int]  # region, offset, byte size
    output: tuple[str, int, int] | None  # None: the output goes in the message
    output_bytes: int  # of the output, for shape[0] images


def fast_tensor(request: pb.ModelInferRequest, manifest: Manifest) -> np.ndarray | None:
    """The common request's input, or None for anything else, which decode_request then checks
    in full and names what is wrong. Common: one FP32 input named right, in raw contents of the
    right length, no shared memory, no outputs requested by another name."""
    raws = request.raw_input_contents
    inputs = request.inputs
    if len(raws) != 1 or len(inputs) != 1:
        return None
    shape = _common_shape(inputs[0], request.outputs, manifest)
    if shape is None or len(raws[0]) != 4 * math.prod(shape):
        return None
    return np.ndarray(shape, _F32, raws[0])


def _common_shape(tensor: pb.ModelInferRequest.InferInputTensor, outputs: object,
                  manifest: Manifest,
                  params: frozenset[str] = frozenset()) -> tuple[int, ...] | None:
    """The input's shape when its description and the requested outputs are the common case;
    ``params``: the parameter keys they may carry (none: the tensors travel in the message)."""
    spec = manifest.input
    if (tensor.datatype != "FP32" or tensor.name != spec.name or tensor.HasField("contents")
            or not set(tensor.parameters) <= params):
        return None
    shape = tuple(tensor.shape)
    expected = spec.shape
    if len(shape) != len(expected) or shape[0] < 1 or list(shape[1:]) != expected[1:]:
        return None
    for out in outputs:  # type: ignore[attr-defined]
        if out.name != manifest.output.name or not set(out.parameters) <= params:
            return None
    return shape


class FastCodec:
    """One model's common requests decoded and answered with as little work as possible: this
    runs on the event loop for every request, where each protobuf field read (a wrapper object)
    and each numpy call costs microseconds. A client sends the same input description (name,
    datatype, shape, parameters; and the outputs it asks for) with every request, so their
    serialized bytes are looked up among those already checked - one call instead of reading
    each field; equal bytes mean an equal description, and a new one is checked field by field
    (fast_tensor's rules) before it is remembered. Answers are copied from a per-shape
    template."""

    def __init__(self, manifest: Manifest) -> None:
        self.manifest = manifest
        # (input description, requested outputs), serialized -> (shape, raw byte length)
        self._checked: dict[tuple[bytes, ...], tuple[tuple[int, ...], int]] = {}
        self._answers: dict[tuple[int, ...], pb.ModelInferResponse] = {}
        # the same for descriptions that put the tensors in shared memory -> _ShmRequest
        self._checked_shm: dict[tuple[bytes, ...], _ShmRequest] = {}
        self._shm_answers: dict[tuple[tuple[int, ...], bytes], pb.ModelInferResponse] = {}
        self._input = f"input '{manifest.input.name}'"  # names in messages, as decode_request's
        self._output = f"output '{manifest.output.name}'"

    def tensor(self, request: pb.ModelInferRequest) -> np.ndarray | None:
        """As fast_tensor."""
        raws = request.raw_input_contents
        inputs = request.inputs
        if len(raws) != 1 or len(inputs) != 1:
            return None
        outputs = request.outputs
        key: tuple[bytes, ...] = (inputs[0].SerializeToString(),)
        if outputs:
            key = (*key, *(o.SerializeToString() for o in outputs))
        known = self._checked.get(key)
        if known is None:
            shape = _common_shape(inputs[0], outputs, self.manifest)
            if shape is None:
                return None
            known = (shape, 4 * math.prod(shape))
            if len(self._checked) < _CACHE_MAX:
                self._checked[key] = known
        raw = raws[0]
        if len(raw) != known[1]:
            return None
        return np.ndarray(known[0], _F32, raw)

    def shm_tensor(self, request: pb.ModelInferRequest,
                   shm: SharedMemoryRegistry | None) -> DecodedInput | None:
        """The common shared-memory request: one FP32 input read from a registered region and at
        most one output, in the message or written to a region; None for anything else, which
        decode_request then checks in full. Like tensor(), the description is checked once and
        remembered by its bytes; the regions are looked up on every request (SharedMemoryRegistry
        .view: registered still, and the object not truncated since), as decode_request does."""
        if shm is None or request.raw_input_contents:
            return None
        inputs = request.inputs
        outputs = request.outputs
        # no parameters, no shared memory: decline before serializing (typed contents can be big)
        if len(inputs) != 1 or len(outputs) > 1 or not inputs[0].parameters:
            return None
        key = (inputs[0].SerializeToString(), *(o.SerializeToString() for o in outputs))
        known = self._checked_shm.get(key)
        if known is None:
            known = self._check_shm(inputs[0], outputs)
            if known is None:
                return None
            if len(self._checked_shm) < _CACHE_MAX:
                self._checked_shm[key] = known
        region, offset, size = known.input
        tensor = np.ndarray(known.shape, _F32, shm.view(region, offset, size, self._input))
        if known.output is None:
            return DecodedInput(tensor=tensor)
        region, offset, size = known.output
        view = shm.view(region, offset, size, self._output)[:known.output_bytes]
        return DecodedInput(tensor=tensor, output_view=view)

    def _check_shm(self, tensor: pb.ModelInferRequest.InferInputTensor,
                   outputs: object) -> _ShmRequest | None:
        shape = _common_shape(tensor, outputs, self.manifest, _SHM_KEYS)
        if shape is None:
            return None
        out_bytes = shape[0] * math.prod(self.manifest.output.shape[1:]) * 4
        try:  # a malformed description: decode_request says what is wrong
            where = _shm_params(tensor.parameters, self._input, True)
            out_where = None
            for out in outputs:  # type: ignore[attr-defined]  (one at most: shm_tensor)
                out_where = _shm_params(out.parameters, self._output, True)
        except CnnctlError:
            return None
        if (where is None or where[2] != 4 * math.prod(shape)
                or (out_where is not None and out_where[2] < out_bytes)):
            return None
        return _ShmRequest(shape, where, out_where, out_bytes)

    def response(self, request: pb.ModelInferRequest, output: np.ndarray,
                 output_view: memoryview | None = None) -> pb.ModelInferResponse:
        """As encode_response."""
        if output.dtype != _F32 or not output.flags.c_contiguous:
            return encode_response(request, self.manifest, output, output_view)
        if output_view is not None:
            return self._shm_response(request, output, output_view)
        template = self._answers.get(output.shape)
        if template is None:
            man = self.manifest
            template = pb.ModelInferResponse(model_name=man.name, model_version=man.version)
            template.outputs.add(name=man.output.name, datatype="FP32", shape=output.shape)
            template.raw_output_contents.append(b"")
            if len(self._answers) < _CACHE_MAX:
                self._answers[output.shape] = template
        response = pb.ModelInferResponse()
        response.CopyFrom(template)
        rid = request.id
        if rid:
            response.id = rid
        response.raw_output_contents[0] = output.tobytes()
        return response

    def _shm_response(self, request: pb.ModelInferRequest, output: np.ndarray,
                      output_view: memoryview) -> pb.ModelInferResponse:
        """The answer for an output written to shared memory: copied from a template kept per
        output shape and requested-output description (the parameters it echoes)."""
        outputs = request.outputs
        key = (output.shape, outputs[0].SerializeToString()) if len(outputs) == 1 else None
        template = self._shm_answers.get(key) if key is not None else None
        if template is None:
            response = encode_response(request, self.manifest, output, output_view)
            if key is not None and len(self._shm_answers) < _CACHE_MAX:
                template = pb.ModelInferResponse()
                template.CopyFrom(response)
                template.ClearField("id")
                self._shm_answers[key] = template
            return response
        output_view[:output.nbytes] = output.reshape(-1).view(np.uint8)
        response = pb.ModelInferResponse()
        response.CopyFrom(template)
        rid = request.id
        if rid:
            response.id = rid
        return response


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


def encode_response(request: pb.ModelInferRequest, manifest: Manifest, output: np.ndarray,
                    output_view: memoryview | None = None) -> pb.ModelInferResponse:
    """The answer; with ``output_view`` the output goes into that shared memory instead (the
    answer then describes it and carries an empty entry for its data, as Triton's does)."""
    output = np.ascontiguousarray(output, dtype=_F32)
    response = pb.ModelInferResponse(model_name=manifest.name, model_version=manifest.version,
                                     id=request.id)
    tensor = response.outputs.add(name=manifest.output.name, datatype="FP32", shape=output.shape)
    if output_view is None:
        response.raw_output_contents.append(output.tobytes())
        return response
    output_view[:output.nbytes] = output.reshape(-1).view(np.uint8)
    # An empty entry, as Triton sends: clients (perf_analyzer's C++ one crashes without it) expect
    # one raw_output_contents entry per output.
    response.raw_output_contents.append(b"")
    for out in request.outputs:  # echo where it went
        for key in (SHM_REGION, SHM_OFFSET, SHM_SIZE):
            if key in out.parameters:
                tensor.parameters[key].CopyFrom(out.parameters[key])
    return response
