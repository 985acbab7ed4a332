"""The I/O-free halves: image inputs, chunk planning, model info, predictions, the error table."""

from __future__ import annotations

import io
import json

import grpc
import numpy as np
import pytest
from PIL import Image

from cnnctl.clients import errors, protocol
from cnnctl.clients.images import encode_png, expand, pack_bytes, preprocess
from cnnctl.errors import NotFoundError, ShapeError, UsageError
from cnnctl.export.manifest import ImageSpec
from cnnctl.protos import grpc_service_pb2 as pb
from cnnctl.protos import model_config_pb2 as mc
from cnnctl.serving.preprocess import decode_images, split_bytes_tensor

SPEC = ImageSpec(channels=1, height=32, width=32, mean=[0.1307], std=[0.3081])


def test_expand_every_layout_gives_hwc(digits: np.ndarray) -> None:
    d = digits[0]
    layouts = [d, d[:, :, None], d[None], digits[:3][:, None], digits[:3][:, :, :, None]]
    counts = [len(expand(x)) for x in layouts]
    assert counts == [1, 1, 1, 3, 3]
    for x in layouts:
        for item in expand(x):
            assert item.shape == (28, 28, 1)
    assert np.array_equal(expand(digits[:3][:, None])[2][:, :, 0], digits[2])
    rgb = np.zeros((3, 20, 24), np.uint8)
    assert expand(rgb)[0].shape == (20, 24, 3)
    assert len(expand([d, d, d])) == 3


def test_expand_refuses_with_the_value_and_what_is_allowed(tmp_path) -> None:
    with pytest.raises(UsageError, match=r"^image 0: array dtype int64 is not supported; allowed: "
                                         r"uint8 \(0-255\) or float \(0-1\) pixels$"):
        expand(np.zeros((28, 28), np.int64))
    with pytest.raises(UsageError, match=r"float pixels must lie in \[0, 1\], got \[-1, 2\]"):
        expand(np.array([[-1.0, 2.0]], np.float32))
    with pytest.raises(ShapeError, match=r"^image 0: array of shape \[5, 6, 7\] is not an image"):
        expand(np.zeros((5, 6, 7), np.uint8))
    missing = tmp_path / "nope.png"
    with pytest.raises(UsageError, match=f"^image 0: file '{missing}' does not exist$"):
        expand(str(missing))
    with pytest.raises(UsageError, match=r"^image 1: int is not an image; allowed: a file path"):
        expand([b"x", 3])
    with pytest.raises(UsageError, match="^no images given"):
        expand([])


def test_png_is_lossless_and_bytes_layout_matches_the_server(digits: np.ndarray) -> None:
    png = encode_png(expand(digits[0])[0])
    assert np.array_equal(np.asarray(Image.open(io.BytesIO(png))), digits[0])
    assert split_bytes_tensor(pack_bytes([b"ab", b"", png]), "input") == [b"ab", b"", png]


@pytest.mark.parametrize("kind", ["uint8", "float", "png", "resize-rgb"])
def test_client_preprocess_equals_the_servers(digits: np.ndarray, kind: str) -> None:
    img = digits[1]
    if kind == "uint8":
        item = expand(img)[0]
    elif kind == "float":
        item = expand(img.astype(np.float32) / 255)[0]
    elif kind == "png":
        item = encode_png(expand(img)[0])
    else:
        item = np.repeat(expand(img)[0], 3, axis=2)  # RGB at 28×28: convert + resize on both sides
    ours = preprocess(item, SPEC)
    theirs = decode_images([item if isinstance(item, bytes) else encode_png(item)], SPEC, "input")
    np.testing.assert_allclose(ours, theirs[0], atol=1e-5)


def test_plan_chunks_respects_batch_and_bytes() -> None:
    assert protocol.plan_chunks([1] * 20, 8, 1 << 30) == [slice(0, 8), slice(8, 16), slice(16, 20)]
    budget = (1 << 20) - protocol.MESSAGE_OVERHEAD_BYTES
    sizes = [budget // 3] * 7
    assert protocol.plan_chunks(sizes, 0, 1 << 20) == [slice(0, 3), slice(3, 6), slice(6, 7)]
    # An item over the limit goes alone; the server decides.
    assert protocol.plan_chunks([10, 5 << 20, 10], 0, 1 << 20) == [
        slice(0, 1), slice(1, 2), slice(2, 3)]


def _metadata() -> pb.ModelMetadataResponse:
    meta = pb.ModelMetadataResponse(name="m", versions=["1"], platform="onnxruntime_onnx")
    meta.inputs.add(name="input", datatype="FP32", shape=[-1, 1, 32, 32])
    meta.outputs.add(name="logits", datatype="FP32", shape=[-1, 3])
    return meta


def test_model_info_reads_class_names_and_image_parameters() -> None:
    config = mc.ModelConfig(name="m", max_batch_size=16)
    info = protocol.model_info("", _metadata(), config)
    assert info.class_names == ("0", "1", "2") and info.image is None
    assert info.max_batch_size == 16
    config.parameters["class_names"].string_value = json.dumps(["cat", "dog", "eel"])
    config.parameters["image"].string_value = json.dumps(
        {"channels": 1, "height": 32, "width": 32, "mean": [0.5], "std": [0.25]})
    info = protocol.model_info("1", _metadata(), config)
    assert info.class_names == ("cat", "dog", "eel")
    assert info.image == ImageSpec(1, 32, 32, [0.5], [0.25])
    config.parameters["class_names"].string_value = json.dumps(["too", "few"])
    assert protocol.model_info("", _metadata(), config).class_names == ("0", "1", "2")


def test_predictions_are_softmax_top_k() -> None:
    config = mc.ModelConfig(name="m")
    config.parameters["class_names"].string_value = json.dumps(["cat", "dog", "eel"])
    info = protocol.model_info("", _metadata(), config)
    logits = np.array([[0.0, 2.0, 1.0], [3.0, 0.0, 0.0]], np.float32)
    p = protocol.predictions(logits, info, 2, return_logits=True)
    e = np.exp([0.0, 2.0, 1.0])
    assert p[0].labels == ("dog", "eel") and p[0].class_ids == (1, 2)
    assert p[0].probabilities == pytest.approx([e[1] / e.sum(), e[2] / e.sum()])
    assert p[1].label == "cat" and p[1].logits is not None
    assert np.array_equal(p[1].logits, logits[1])
    assert protocol.check_top_k(99, info) == 3
    with pytest.raises(UsageError, match="^top_k must be at least 1, got 0$"):
        protocol.check_top_k(0, info)


def test_error_table_maps_every_code_once() -> None:
    cases = {
        grpc.StatusCode.INVALID_ARGUMENT: errors.InvalidArgument,
        grpc.StatusCode.NOT_FOUND: errors.NotFound,
        grpc.StatusCode.RESOURCE_EXHAUSTED: errors.ResourceExhausted,
        grpc.StatusCode.DEADLINE_EXCEEDED: errors.DeadlineExceeded,
        grpc.StatusCode.UNAVAILABLE: errors.Unavailable,
        grpc.StatusCode.FAILED_PRECONDITION: errors.FailedPrecondition,
        grpc.StatusCode.UNAUTHENTICATED: errors.Unauthenticated,
        grpc.StatusCode.CANCELLED: errors.Cancelled,
        grpc.StatusCode.INTERNAL: errors.ServerError,
        grpc.StatusCode.UNKNOWN: errors.ServerError,
    }
    for code, cls in cases.items():
        exc = errors.error_for(code, "the server's words")
        assert type(exc) is cls and exc.code is code and str(exc) == "the server's words"
    assert isinstance(errors.error_for(grpc.StatusCode.NOT_FOUND, "x"), NotFoundError)
    assert isinstance(errors.error_for(grpc.StatusCode.INVALID_ARGUMENT, "x"), UsageError)
