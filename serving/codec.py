"""KServe v2 request → the model's input, and its output → the response: one decoder, one encoder.

Everything here runs on the event loop before a request joins a batch, so a malformed request is
refused on its own and never fails the others it would have been batched with. Messages name the
bad value and what the model allows.

The input comes in one of four ways: raw_input_contents, typed contents, a registered shared-memory
region, or a BYTES tensor of encoded PNG/JPEG images. The event loop's share of a request is bounded
whatever it holds: no request has more images than the max batch size, and a BYTES tensor is split
and its images decoded off the loop (``preprocess``), within pixel limits read from their headers. A client
sends the same input and output descriptions (name, datatype, shape, parameters) with every
request, and on the event loop every protobuf field read counts, so a description is checked field
by field once and its result (a Layout) remembered under the description's serialized bytes: a
repeat costs one dict lookup plus the checks that depend on the payload (raw length, the region
still registered and not truncated). Answers are copied from a template kept per output shape.
"""

from __future__ import annotations

import math
import struct
from collections.abc import Callable
from dataclasses import dataclass
from typing import Optional, Union

import numpy as np

from cnnctl.errors import DeadlineExceededError, NotEnabledError, ShapeError, UsageError
from cnnctl.export.image import PixelLimits, to_tensor
from cnnctl.export.manifest import Manifest
from cnnctl.protos import grpc_service_pb2 as pb
from cnnctl.serving.shm import Caller, SharedOutput

TENSOR_DTYPES = {"FP32": np.dtype("<f4"), "FP16": np.dtype("<f2")}
ALLOWED = "FP32, FP16, BYTES (encoded PNG/JPEG images)"
SHM_REGION = "shared_memory_region"
SHM_OFFSET = "shared_memory_offset"
SHM_SIZE = "shared_memory_byte_size"
RAW, CONTENTS, SHM = "raw_input_contents", "contents", "shared memory"  # where an input's data is
_F32 = TENSOR_DTYPES["FP32"]
_CACHE_MAX = 256  # layouts and answer templates per model; beyond it, checked and built each time


@dataclass(frozen=True)
class Layout:
    """A request's input and output descriptions, checked: all decode needs besides the payload."""

    shape: tuple[int, ...]  # of the input
    dtype: np.dtype | None  # of the input's data; None: BYTES, encoded images
    source: str  # RAW, CONTENTS or SHM
    nbytes: int  # that a tensor of this shape and dtype takes
    input_shm: tuple[str, int, int] | None  # (region, offset, byte size) when source is SHM
    output_shm: tuple[str, int, int] | None  # None: the output goes in the message
    output_nbytes: int  # of the output, for shape[0] images


@dataclass(frozen=True, slots=True)
class Images:
    """A request's encoded images, not yet split or decoded: for Codec.preprocess."""

    count: int  # as the input's shape says
    # KServe's raw BYTES layout, the typed contents' elements, or (shared memory) a function that
    # reads the layout: called in preprocess, off the event loop
    data: Union[bytes, list[bytes], Callable[[], bytes]]
    nbytes: int  # of the encoded images, in the message or read from shared memory (twice)


# What decode gives: (tensor, images, shared output). One of the first two is None: the tensor
# float32 (n, C, H, W), ready to batch, or the encoded images, for Codec.preprocess off the event
# loop. The third: where the output goes when it is in shared memory. A plain tuple: building a
# named one would add to every request's time on the event loop.
Decoded = tuple[Optional[np.ndarray], Optional[Images], Optional[SharedOutput]]


class Codec:
    """One model's requests decoded and answered; see the module's docstring."""

    def __init__(self, manifest: Manifest, max_batch_size: int = 64,
                 pixel_limits: PixelLimits | None = None) -> None:
        """``max_batch_size``: the most images one request may hold (INVALID_ARGUMENT beyond,
        as Triton). ``pixel_limits``: for encoded images (None: the defaults)."""
        self.manifest = manifest
        self.max_batch_size = max_batch_size
        self.pixel_limits = pixel_limits or PixelLimits()
        # What one image of a request holds us to, besides the message: its float32 input and
        # output (the request's share of the server's --max-pending-mb).
        self.bytes_per_image = 4 * (math.prod(manifest.input.shape[1:])
                                    + math.prod(manifest.output.shape[1:]))
        # (raw entries, shared memory off, input and output descriptions serialized) -> Layout
        self._layouts: dict[tuple[object, ...], Layout] = {}
        # output shape (and the requested outputs, serialized, for shared memory) -> template
        self._answers: dict[tuple[object, ...], pb.ModelInferResponse] = {}
        self._input = f"input '{manifest.input.name}'"  # as messages name them
        self._output = f"output '{manifest.output.name}'"

    def decode(self, request: pb.ModelInferRequest,
               shm: Caller | None = None) -> Decoded:
        """(tensor, images, shared output), see Decoded. ``shm``: the shared-memory regions
        as this request's client may use them (None: the extension is off)."""
        raws = request.raw_input_contents
        inputs = request.inputs
        outputs = request.outputs
        n_outputs = len(outputs)
        if len(inputs) == 1 and n_outputs <= 1:  # the usual request, without a loop
            key: tuple[object, ...] = (len(raws), shm is None, inputs[0].SerializeToString(),
                                       outputs[0].SerializeToString() if n_outputs else None)
        else:  # the count, lest an input and an output that serialize alike swap places
            key = (len(raws), shm is None, len(inputs), *[t.SerializeToString() for t in inputs],
                   *[o.SerializeToString() for o in outputs])
        layout = self._layouts.get(key)
        if layout is None:
            layout = self._check(request, shm)
            # typed contents are part of the description's bytes: remembering them would only
            # fill the cache
            if layout.source is not CONTENTS and len(self._layouts) < _CACHE_MAX:
                self._layouts[key] = layout
        dtype = layout.dtype
        if dtype is None:
            images = self._images(layout, request, shm)
            return None, images, self._output_view(layout, shm)
        if layout.source is RAW:
            data = raws[0]
            if len(data) != layout.nbytes:  # shared memory's byte size is part of its layout
                raise UsageError(f"{self._input}: raw contents have {len(data)} bytes; shape "
                                 f"{_fmt(layout.shape)} of {request.inputs[0].datatype} needs "
                                 f"{layout.nbytes}")
            tensor = np.ndarray(layout.shape, dtype, data)
        elif layout.source is SHM:
            # Read, not mapped: a client truncating its object must not crash us (shm.py).
            tensor = np.empty(layout.shape, dtype)
            name, offset, _ = layout.input_shm  # type: ignore[misc]
            shm.read_into(name, offset, tensor, self._input)  # type: ignore[union-attr]
        else:
            tensor = self._contents(layout, request)
        if dtype is not _F32:
            tensor = tensor.astype(np.float32)
        if layout.output_shm is None:
            return tensor, None, None
        return tensor, None, self._output_view(layout, shm)

    def _output_view(self, layout: Layout, shm: Caller | None) -> SharedOutput | None:
        if layout.output_shm is None:
            return None
        size, need = layout.output_shm[2], layout.output_nbytes
        if size < need:
            out = self.manifest.output
            raise UsageError(f"{self._output}: shared_memory_byte_size {size} is too small; "
                             f"{layout.shape[0]} x {_fmt(out.shape[1:])} FP32 needs {need}")
        return shm.output(*layout.output_shm, self._output)  # type: ignore[union-attr, misc]

    def _contents(self, layout: Layout, request: pb.ModelInferRequest) -> np.ndarray:
        values = request.inputs[0].contents.fp32_contents
        count = math.prod(layout.shape)
        if len(values) != count:
            raise UsageError(f"{self._input}: contents hold {len(values)} fp32 values; shape "
                             f"{_fmt(layout.shape)} needs {count}")
        return np.asarray(values, dtype=np.float32).reshape(layout.shape)

    def _images(self, layout: Layout, request: pb.ModelInferRequest,
                shm: Caller | None) -> Images:
        """The encoded images, to be split (raw layouts) and decoded off the event loop."""
        count = layout.shape[0]
        if layout.source is RAW:
            raw = request.raw_input_contents[0]
            return Images(count, raw, len(raw))
        if layout.source is SHM:
            name, offset, size = layout.input_shm  # type: ignore[misc]

            def read() -> bytes:
                data = bytearray(size)
                shm.read_into(name, offset, data, self._input)  # type: ignore[union-attr]
                return bytes(data)

            return Images(count, read, 2 * size)
        contents = request.inputs[0].contents.bytes_contents
        if len(contents) != count:  # before listing them: a request may hold millions
            raise UsageError(f"{self._input}: shape {_fmt(layout.shape)} says {count} images but "
                             f"the contents hold {len(contents)}")
        items = list(contents)
        return Images(count, items, sum(map(len, items)))

    def _check(self, request: pb.ModelInferRequest,
               shm: Caller | None) -> Layout:
        """A description not seen before, checked field by field. The order decides which of
        several faults a request is told of: keep it (a named region is looked up before the
        datatype and shape are checked)."""
        man = self.manifest
        shm_enabled = shm is not None
        spec = man.input
        names = [t.name for t in request.inputs]
        if spec.name not in names:
            got = f"got {', '.join(repr(n) for n in names)}" if names else "got no inputs"
            raise UsageError(f"missing input '{spec.name}'; model '{man.name}' takes exactly one "
                             f"input, '{spec.name}' ({got})")
        extra = [n for n in names if n != spec.name] or ([spec.name] if len(names) > 1 else [])
        if extra:
            raise UsageError(f"unexpected input '{extra[0]}'; model '{man.name}' takes exactly "
                             f"one input, '{spec.name}'")
        output_shm = None
        for out in request.outputs:
            if out.name != man.output.name:
                raise UsageError(f"unknown output '{out.name}' requested; model '{man.name}' has "
                                 f"one output, '{man.output.name}'")
            output_shm = _shm_params(out.parameters, self._output, shm_enabled)
        raw_count = len(request.raw_input_contents)
        if raw_count and raw_count != len(request.inputs):
            raise UsageError(f"raw_input_contents has {raw_count} entries for "
                             f"{len(request.inputs)} input(s); send one per input, in order")
        tensor = request.inputs[0]
        has_contents = tensor.HasField("contents")
        if raw_count and has_contents:
            raise UsageError(f"{self._input} has both raw_input_contents and contents; send one")
        input_shm = _shm_params(tensor.parameters, self._input, shm_enabled)
        if input_shm is not None and (raw_count or has_contents):
            raise UsageError(f"{self._input} has both a shared-memory region and contents in "
                             f"the message; send one")
        if input_shm is not None:  # the region named before the fields that follow
            shm.check(*input_shm, self._input)  # type: ignore[union-attr]
        source = SHM if input_shm else RAW if raw_count else CONTENTS if has_contents else None
        shape = tuple(int(s) for s in tensor.shape)
        dtype = None
        nbytes = 0
        if tensor.datatype == "BYTES":
            if not (len(shape) == 1 or (len(shape) == 2 and shape[1] == 1)) or shape[0] < 1:
                raise ShapeError(f"{self._input}: a BYTES input of encoded images must have shape "
                                 f"[n] or [n, 1] with n from 1, got {_fmt(shape)}")
        else:
            dtype = TENSOR_DTYPES.get(tensor.datatype)
            if dtype is None:
                raise UsageError(f"{self._input}: datatype '{tensor.datatype}' is not supported; "
                                 f"allowed: {ALLOWED}")
            expected = spec.shape
            if (len(shape) != len(expected) or shape[0] < 1
                    or any(e != -1 and s != e for s, e in zip(shape, expected))):
                raise ShapeError(f"{self._input}: shape {_fmt(shape)} does not match the model's "
                                 f"{_fmt(expected)} (-1: any batch size from 1)")
            nbytes = math.prod(shape) * dtype.itemsize
            if input_shm is not None and input_shm[2] != nbytes:
                raise UsageError(f"{self._input}: shared_memory_byte_size is {input_shm[2]} bytes; "
                                 f"shape {_fmt(shape)} of {tensor.datatype} needs {nbytes}")
            if source is CONTENTS and tensor.datatype != "FP32":
                raise UsageError(f"{self._input}: {tensor.datatype} has no typed contents field; "
                                 f"send it as raw_input_contents")
        if shape[0] > self.max_batch_size:  # as Triton: a request is one batch at most
            raise ShapeError(f"{self._input}: batch size {shape[0]} is over the max batch size "
                             f"{self.max_batch_size}; send at most {self.max_batch_size} images "
                             f"per request")
        if source is None:
            raise UsageError(f"{self._input} has no data: send raw_input_contents or contents")
        output_nbytes = shape[0] * math.prod(man.output.shape[1:]) * 4
        return Layout(shape, dtype, source, nbytes, input_shm, output_shm, output_nbytes)

    def preprocess(self, images: Images,
                   expired: Callable[[], bool] | None = None) -> np.ndarray:
        """Blocking: a request's encoded images → its input tensor (the manifest's ImageSpec).
        ``expired``: asked before each image is decoded; once True, the rest are not
        (DEADLINE_EXCEEDED)."""
        if expired is not None and expired():
            raise DeadlineExceededError(f"deadline passed before {self._input}'s images were "
                                        f"decoded; not computed")
        items = images.data
        if callable(items):
            items = items()
        if not isinstance(items, list):
            items = split_bytes_tensor(items, self.manifest.input.name, images.count)
        if len(items) != images.count:
            raise UsageError(f"{self._input}: shape [{images.count}] says {images.count} images "
                             f"but the contents hold {len(items)}")
        return to_tensor(items, self.manifest.image, f"{self._input}: element",
                         self.pixel_limits, expired)

    def encode(self, request: pb.ModelInferRequest, output: np.ndarray,
               output_view: SharedOutput | None = None) -> pb.ModelInferResponse:
        """The answer; with ``output_view`` the output goes into that shared memory instead (the
        answer then describes it and carries an empty entry for its data, as Triton's does)."""
        if output.dtype is not _F32:
            output = output.astype(_F32)  # tobytes() and reshape() lay out any strides in C order
        if output_view is None:
            key: tuple[object, ...] = output.shape
        else:
            output_view.write(np.ascontiguousarray(output))
            key = (output.shape, *(o.SerializeToString() for o in request.outputs))
        template = self._answers.get(key)
        if template is None:
            template = self._template(request, output.shape, output_view is not None)
            if len(self._answers) < _CACHE_MAX:
                self._answers[key] = template
        response = pb.ModelInferResponse()
        response.CopyFrom(template)
        rid = request.id
        if rid:
            response.id = rid
        if output_view is None:
            response.raw_output_contents[0] = output.tobytes()
        return response

    def _template(self, request: pb.ModelInferRequest, shape: tuple[int, ...],
                  in_shm: bool) -> pb.ModelInferResponse:
        """An answer without its id and data."""
        man = self.manifest
        response = pb.ModelInferResponse(model_name=man.name, model_version=man.version)
        tensor = response.outputs.add(name=man.output.name, datatype="FP32", shape=shape)
        # One raw_output_contents entry per output, empty when the data is in shared memory, as
        # Triton sends: clients (perf_analyzer's C++ one crashes without it) expect it.
        response.raw_output_contents.append(b"")
        if in_shm:
            for out in request.outputs:  # echo where it went
                for key in (SHM_REGION, SHM_OFFSET, SHM_SIZE):
                    if key in out.parameters:
                        tensor.parameters[key].CopyFrom(out.parameters[key])
        return response


def split_bytes_tensor(raw: bytes, input_name: str, count: int) -> list[memoryview]:
    """Decode KServe's raw BYTES layout: each element is a 4-byte little-endian length + bytes.
    ``count``: the elements the input's shape says; a layout holding more is refused as soon as
    one more is seen (a few MiB can hold millions of empty elements)."""
    items: list[memoryview] = []
    data = memoryview(raw)
    offset = 0
    while offset < len(raw):
        if len(items) == count:
            raise UsageError(f"input '{input_name}': shape [{count}] says {count} images but the "
                             f"contents hold more")
        if offset + 4 > len(raw):
            raise UsageError(f"input '{input_name}': BYTES raw contents end inside an element's "
                             f"4-byte length prefix (offset {offset} of {len(raw)} bytes)")
        (size,) = struct.unpack_from("<I", raw, offset)
        offset += 4
        if offset + size > len(raw):
            raise UsageError(f"input '{input_name}': BYTES element {len(items)} claims {size} "
                             f"bytes but only {len(raw) - offset} remain")
        items.append(data[offset:offset + size])
        offset += size
    return items


def _fmt(shape: object) -> str:
    return "[" + ", ".join(str(int(s)) for s in shape) + "]"  # type: ignore[attr-defined]


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
