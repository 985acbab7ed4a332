"""The I/O-free halves: image inputs, chunk planning, model info, predictions, the error table."""

from __future__ import annotations

import dataclasses
import io
import json

import grpc
import numpy as np
import pytest
from PIL import Image

from cnnctl.clients import errors, protocol
from cnnctl.clients.client import _ClientBase
from cnnctl.clients.images import encode_png, expand, pack_bytes
from cnnctl.errors import NotFoundError, ShapeError, UsageError
from cnnctl.export.manifest import ImageSpec, Manifest, TensorSpec
from cnnctl.protos import grpc_service_pb2 as pb
from cnnctl.protos import model_config_pb2 as mc
from cnnctl.serving.codec import Codec, split_bytes_tensor

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
    assert split_bytes_tensor(pack_bytes([b"ab", b"", png]), "input", 3) == [b"ab", b"", png]


def _jpeg(rgb: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(rgb, "RGB").save(buf, format="JPEG")
    return buf.getvalue()


@pytest.mark.parametrize("kind", ["uint8", "float", "uint8 32", "float 32", "png", "jpeg rgb",
                                  "rgb array", "pil rgba"])
def test_client_and_server_preprocessing_give_identical_tensors(digits: np.ndarray,
                                                                kind: str) -> None:
    """The same images preprocessed by the client (preprocess="client", sent as a tensor) or sent
    as they are and preprocessed by the server: the model gets the same tensor, bit for bit."""
    img = digits[1]
    padded = np.pad(img, 2)  # 32×32: the model's size, no resize on either side
    images = {
        "uint8": img, "float": img.astype(np.float32) / 255, "uint8 32": padded,
        "float 32": padded.astype(np.float32) / 255, "png": encode_png(expand(img)[0]),
        "jpeg rgb": _jpeg(np.stack([img, img // 2, 255 - img], axis=2)),
        "rgb array": np.stack([img, 255 - img, img], axis=2),  # converted and resized
        "pil rgba": Image.fromarray(np.stack([img] * 4, axis=2), "RGBA"),
    }[kind]
    config = mc.ModelConfig(name="m")
    config.parameters["image"].string_value = json.dumps(dataclasses.asdict(SPEC))
    info = protocol.model_info("", _metadata(), config)
    codec = Codec(Manifest(name="m", model="lenet5", version="1", files=[],
                           input=TensorSpec("input", "FP32", [-1, 1, 32, 32]),
                           output=TensorSpec("logits", "FP32", [-1, 3]), image=SPEC,
                           class_names=["a", "b", "c"]))
    [tensor_request] = _ClientBase("127.0.0.1:1", preprocess="client")._predict_requests(
        info, [images, images])
    [bytes_request] = _ClientBase("127.0.0.1:1")._predict_requests(info, [images, images])
    on_client, no_images, _ = codec.decode(_wire(tensor_request))
    no_tensor, encoded, _ = codec.decode(_wire(bytes_request))
    assert no_images is None and no_tensor is None and encoded is not None
    on_server = codec.preprocess(encoded)
    assert on_client.shape == on_server.shape == (2, 1, 32, 32)  # type: ignore[union-attr]
    np.testing.assert_array_equal(on_client, on_server)
    assert float(np.abs(on_server).max()) > 1.0  # really normalised pixels, not zeros


def _wire(req: pb.ModelInferRequest) -> pb.ModelInferRequest:
    return pb.ModelInferRequest.FromString(req.SerializeToString())


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
