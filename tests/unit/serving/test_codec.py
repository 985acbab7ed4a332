"""serving/codec.py: the per-model fast path (FastCodec) gives exactly what the full checks give
for the common request, and declines everything else, so that decode_request names the error."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest

from cnnctl.errors import CnnctlError
from cnnctl.export.manifest import ImageSpec, Manifest, TensorSpec
from cnnctl.protos import grpc_service_pb2 as pb
from cnnctl.serving.codec import FastCodec, decode_request, encode_response, fast_tensor
from cnnctl.serving.shm import SharedMemoryRegistry
from tests.support.serving import infer_request

MANIFEST = Manifest(name="lenet5", model="lenet5", version="3", files=[],
                    input=TensorSpec("input", "FP32", [-1, 1, 32, 32]),
                    output=TensorSpec("logits", "FP32", [-1, 10]),
                    image=ImageSpec(channels=1, height=32, width=32, mean=[0.1], std=[0.3]),
                    class_names=[str(i) for i in range(10)], opset=17)


def _x(n: int = 2) -> np.ndarray:
    return np.random.default_rng(n).standard_normal((n, 1, 32, 32), dtype=np.float32)


def _wire(req: pb.ModelInferRequest) -> pb.ModelInferRequest:
    return pb.ModelInferRequest.FromString(req.SerializeToString())  # as the server gets it


def _error(req: pb.ModelInferRequest) -> str:
    with pytest.raises(CnnctlError) as info:
        decode_request(req, MANIFEST)
    return str(info.value)


def test_common_requests_decode_alike_twice() -> None:
    codec = FastCodec(MANIFEST)
    for n in (1, 3, 1):  # the second 1 comes from the cache of checked descriptions
        x = _x(n)
        req = infer_request(x)
        req.outputs.add(name="logits")
        got = codec.tensor(_wire(req))
        assert got is not None and got.dtype == np.float32 and got.shape == x.shape
        np.testing.assert_array_equal(got, x)
        np.testing.assert_array_equal(fast_tensor(_wire(req), MANIFEST), x)
        np.testing.assert_array_equal(decode_request(_wire(req), MANIFEST).tensor, x)


@pytest.mark.parametrize("case", ["short raw", "long raw", "fp16", "name", "shape", "output",
                                  "output shm", "input shm", "contents too", "two inputs"])
def test_anything_else_is_declined_even_after_a_good_one(case: str) -> None:
    codec = FastCodec(MANIFEST)
    good = infer_request(_x(1))
    assert codec.tensor(_wire(good)) is not None  # its description is now cached
    req = infer_request(_x(1))
    if case == "short raw":  # same description as the cached one, wrong byte length
        req.raw_input_contents[0] = req.raw_input_contents[0][:-4]
    elif case == "long raw":
        req.raw_input_contents[0] += b"\0\0\0\0"
    elif case == "fp16":
        req.inputs[0].datatype = "FP16"
    elif case == "name":
        req.inputs[0].name = "image"
    elif case == "shape":
        req.inputs[0].shape[1] = 2
    elif case == "output":
        req.outputs.add(name="probs")
    elif case == "output shm":
        out = req.outputs.add(name="logits")
        out.parameters["shared_memory_region"].string_param = "r"
    elif case == "input shm":
        req.inputs[0].parameters["shared_memory_region"].string_param = "r"
    elif case == "contents too":
        req.inputs[0].contents.fp32_contents.extend([0.0] * 1024)
    elif case == "two inputs":
        req.inputs.add(name="extra", datatype="FP32", shape=[1])
    assert codec.tensor(_wire(req)) is None
    assert fast_tensor(_wire(req), MANIFEST) is None
    if case not in ("output shm", "input shm"):  # those need the shared-memory registry
        assert _error(_wire(req))  # the full checks name the problem


def test_answers_equal_the_full_encoder() -> None:
    codec = FastCodec(MANIFEST)
    for rid, n in (("", 1), ("req-7", 1), ("", 4), ("x", 4)):
        y = np.random.default_rng(n).standard_normal((n, 10), dtype=np.float32)
        req = infer_request(_x(n), rid=rid)
        assert codec.response(req, y) == encode_response(req, MANIFEST, y)
    # a non-contiguous or float64 output goes through the full encoder, same bytes
    y64 = np.arange(20, dtype=np.float64).reshape(2, 10)
    assert codec.response(infer_request(_x(2)), y64) == encode_response(
        infer_request(_x(2)), MANIFEST, y64.astype(np.float32))
    assert codec.response(infer_request(_x(2)), y64.T.T[:, ::1]).raw_output_contents[0] == (
        y64.astype("<f4").tobytes())


# ---------------------------------------------------------------- shared memory (FastCodec.shm_tensor)
IN_BYTES, OUT_BYTES = 4 * 4096, 40 * 4


@pytest.fixture
def registry(tmp_path: Path) -> SharedMemoryRegistry:
    """Regions 'in' (16 KiB, 4 lenet5 images) and 'out' (4 x 10 logits), each in its own object;
    a file under tmp_path stands in for /dev/shm."""
    (tmp_path / "obj_in").write_bytes(bytes(IN_BYTES))
    (tmp_path / "obj_out").write_bytes(bytes(OUT_BYTES))
    reg = SharedMemoryRegistry(root=tmp_path)
    reg.register("in", "/obj_in", 0, IN_BYTES)
    reg.register("out", "/obj_out", 0, OUT_BYTES)
    return reg


def _shm_req(n: int, out: bool = True, in_offset: int = 0, out_offset: int = 0,
             rid: str = "") -> pb.ModelInferRequest:
    req = pb.ModelInferRequest(model_name="lenet5", id=rid)
    t = req.inputs.add(name="input", datatype="FP32", shape=[n, 1, 32, 32])
    t.parameters["shared_memory_region"].string_param = "in"
    t.parameters["shared_memory_byte_size"].int64_param = 4096 * n
    if in_offset:
        t.parameters["shared_memory_offset"].int64_param = in_offset
    if out:
        o = req.outputs.add(name="logits")
        o.parameters["shared_memory_region"].string_param = "out"
        o.parameters["shared_memory_byte_size"].uint64_param = OUT_BYTES - out_offset
        o.parameters["shared_memory_offset"].int64_param = out_offset
    return _wire(req)


def test_shared_memory_requests_decode_as_the_full_checks(registry: SharedMemoryRegistry) -> None:
    codec = FastCodec(MANIFEST)
    # the repeats come from the caches of checked descriptions and of answers, with and without id
    for n, out, in_offset, out_offset, rid in (
            (2, True, 0, 0, "a"), (1, True, 4096, 40, ""), (2, True, 0, 0, ""),
            (2, True, 0, 0, "b"), (2, True, 0, 0, ""), (3, False, 4096, 0, ""),
            (3, False, 4096, 0, "c")):
        x = _x(n)
        registry.view("in", in_offset, x.nbytes, "test")[:] = x.tobytes()
        req = _shm_req(n, out, in_offset, out_offset, rid)
        fast, full = codec.shm_tensor(req, registry), decode_request(req, MANIFEST, registry)
        assert fast is not None and full.tensor is not None
        np.testing.assert_array_equal(fast.tensor, x)
        assert fast.tensor.shape == full.tensor.shape and fast.tensor.dtype == np.float32
        if not out:
            assert fast.output_view is None and full.output_view is None
            continue
        assert fast.output_view is not None and full.output_view is not None
        assert len(fast.output_view) == len(full.output_view) == 40 * n
        y = np.random.default_rng(len(rid) + n).standard_normal((n, 10), dtype=np.float32)
        answer = codec.response(req, y, fast.output_view)  # written where full's view points
        np.testing.assert_array_equal(np.frombuffer(full.output_view, "<f4").reshape(n, 10), y)
        assert answer == encode_response(req, MANIFEST, y, full.output_view)
        assert answer.id == rid and list(answer.raw_output_contents) == [b""]


@pytest.mark.parametrize("case", ["off", "raw too", "contents too", "fp16", "name", "shape",
                                  "byte size", "other parameter", "no size", "string size",
                                  "output name", "output too small", "two outputs", "no shm"])
def test_other_shared_memory_requests_are_declined(case: str,
                                                   registry: SharedMemoryRegistry) -> None:
    codec = FastCodec(MANIFEST)
    assert codec.shm_tensor(_shm_req(1), registry) is not None  # this description is cached now
    req = pb.ModelInferRequest()
    req.CopyFrom(_shm_req(1))
    params, out = req.inputs[0].parameters, req.outputs[0]
    if case == "raw too":
        req.raw_input_contents.append(bytes(4096))
    elif case == "contents too":
        req.inputs[0].contents.fp32_contents.extend([0.0] * 1024)
    elif case == "fp16":
        req.inputs[0].datatype = "FP16"
    elif case == "name":
        req.inputs[0].name = "image"
    elif case == "shape":
        req.inputs[0].shape[2] = 28
    elif case == "byte size":
        params["shared_memory_byte_size"].int64_param = 4092
    elif case == "other parameter":
        params["binary_data"].bool_param = True
    elif case == "no size":
        del params["shared_memory_byte_size"]
    elif case == "string size":
        params["shared_memory_byte_size"].string_param = "4096"
    elif case == "output name":
        out.name = "probs"
    elif case == "output too small":
        out.parameters["shared_memory_byte_size"].uint64_param = 36
    elif case == "two outputs":
        req.outputs.add(name="logits")
    elif case == "no shm":
        for key in list(params):
            del params[key]
    assert codec.shm_tensor(_wire(req), None if case == "off" else registry) is None
    if case not in ("other parameter", "two outputs"):  # decode_request takes those two
        with pytest.raises(CnnctlError):
            decode_request(_wire(req), MANIFEST, None if case == "off" else registry)


def test_a_cached_description_still_finds_the_region_gone_or_truncated(
        registry: SharedMemoryRegistry, tmp_path: Path) -> None:
    codec = FastCodec(MANIFEST)
    req = _shm_req(2)
    assert codec.shm_tensor(req, registry) is not None  # checked and remembered

    def same_error() -> str:
        with pytest.raises(CnnctlError) as fast:
            codec.shm_tensor(req, registry)
        with pytest.raises(CnnctlError) as full:
            decode_request(req, MANIFEST, registry)
        assert type(fast.value) is type(full.value) and str(fast.value) == str(full.value)
        return str(fast.value)

    os.truncate(tmp_path / "obj_in", 4096)  # a view past the end now would be SIGBUS
    assert "holds 4096 bytes now" in same_error()
    registry.unregister("in")
    assert "region 'in' is not registered" in same_error()
    (tmp_path / "obj_small").write_bytes(bytes(4096))
    registry.register("in", "/obj_small", 0, 4096)  # the same name, too small for 2 images now
    assert "is beyond shared-memory region 'in' (4096 bytes)" in same_error()
    registry.unregister("in")
    (tmp_path / "obj_in").write_bytes(bytes(IN_BYTES))
    registry.register("in", "/obj_in", 0, IN_BYTES)
    assert codec.shm_tensor(req, registry) is not None
    registry.unregister("out")
    assert "region 'out' is not registered" in same_error()
