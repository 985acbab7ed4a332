"""serving/codec.py: the per-model fast path (FastCodec) gives exactly what the full checks give
for the common request, and declines everything else, so that decode_request names the error."""

from __future__ import annotations

import numpy as np
import pytest

from cnnctl.errors import CnnctlError
from cnnctl.export.manifest import ImageSpec, Manifest, TensorSpec
from cnnctl.protos import grpc_service_pb2 as pb
from cnnctl.serving.codec import FastCodec, decode_request, encode_response, fast_tensor
from cnnctl.serving.testing import infer_request

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
