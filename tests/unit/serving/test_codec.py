"""serving/codec.py: one decoder for every way an input arrives (raw, typed contents, shared
memory, encoded images) behind one cache of checked layouts, and one encoder. A repeat request is
not checked again yet decodes as its first did; every fault is named with its message whether its
description was seen before or not; errors and typed contents are never remembered."""

from __future__ import annotations

import os
import struct
from pathlib import Path

import grpc
import numpy as np
import pytest

from cnnctl.errors import CnnctlError
from cnnctl.export.image import to_tensor
from cnnctl.export.manifest import ImageSpec, Manifest, TensorSpec
from cnnctl.protos import grpc_service_pb2 as pb
from cnnctl.serving import codec as codec_mod
from cnnctl.serving.codec import Codec, Images
from cnnctl.serving.errors import status_for
from cnnctl.serving.shm import Caller, SharedMemoryRegistry
from tests.support.serving import infer_request

MANIFEST = Manifest(name="lenet5", model="lenet5", version="3", files=[],
                    input=TensorSpec("input", "FP32", [-1, 1, 32, 32]),
                    output=TensorSpec("logits", "FP32", [-1, 10]),
                    image=ImageSpec(channels=1, height=32, width=32, mean=[0.1], std=[0.3]),
                    class_names=[str(i) for i in range(10)], opset=17)
BAD = grpc.StatusCode.INVALID_ARGUMENT
OFF = grpc.StatusCode.FAILED_PRECONDITION


def _x(n: int = 2) -> np.ndarray:
    return np.random.default_rng(n).standard_normal((n, 1, 32, 32), dtype=np.float32)


def _wire(req: pb.ModelInferRequest) -> pb.ModelInferRequest:
    return pb.ModelInferRequest.FromString(req.SerializeToString())  # as the server gets it


def _counting(codec: Codec, monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """How many times the codec checks a description field by field."""
    checks = [0]
    check = codec._check

    def counted(*args: object) -> codec_mod.Layout:
        checks[0] += 1
        return check(*args)  # type: ignore[arg-type]

    monkeypatch.setattr(codec, "_check", counted)
    return checks


def _png(value: int) -> bytes:
    import io

    from PIL import Image

    buf = io.BytesIO()
    Image.new("L", (28, 28), value).save(buf, format="PNG")
    return buf.getvalue()


def _packed(items: list[bytes]) -> bytes:
    return b"".join(struct.pack("<I", len(b)) + b for b in items)


# ---------------------------------------------------------------- tensors in the message
def test_raw_fp16_and_contents_decode_to_float32(monkeypatch: pytest.MonkeyPatch) -> None:
    codec = Codec(MANIFEST)
    checks = _counting(codec, monkeypatch)
    for n in (1, 3, 1):  # the second 1 comes from the cache of checked layouts
        x = _x(n)
        req = infer_request(x, rid=f"r{n}")
        req.outputs.add(name="logits")
        tensor, images, view = codec.decode(_wire(req))
        assert images is None and view is None
        assert tensor.dtype == np.float32 and tensor.shape == x.shape  # type: ignore[union-attr]
        np.testing.assert_array_equal(tensor, x)
    assert checks == [2]
    half = _x(2).astype(np.float16)
    for _ in range(2):
        tensor, _, _ = codec.decode(_wire(infer_request(half, datatype="FP16")))
        assert tensor.dtype == np.float32  # type: ignore[union-attr]
        np.testing.assert_array_equal(tensor, half.astype(np.float32))
    assert checks == [3]
    typed = pb.ModelInferRequest(model_name="lenet5")
    tensor = typed.inputs.add(name="input", datatype="FP32", shape=[2, 1, 32, 32])
    tensor.contents.fp32_contents.extend(_x(2).ravel().tolist())
    for _ in range(2):  # typed contents are part of the description's bytes: never remembered
        tensor, _, _ = codec.decode(_wire(typed))
        np.testing.assert_array_equal(tensor, _x(2))
    assert checks == [5]


# Each fault once with its exact message; "good first": after a good description was cached.
FAULTS = {
    "short raw": "input 'input': raw contents have 4092 bytes; shape [1, 1, 32, 32] of FP32 "
                 "needs 4096",
    "long raw": "input 'input': raw contents have 4100 bytes; shape [1, 1, 32, 32] of FP32 "
                "needs 4096",
    "int64": "input 'input': datatype 'INT64' is not supported; allowed: FP32, FP16, BYTES "
             "(encoded PNG/JPEG images)",
    "fp16 length": "input 'input': raw contents have 4096 bytes; shape [1, 1, 32, 32] of FP16 "
                   "needs 2048",
    "name": "missing input 'input'; model 'lenet5' takes exactly one input, 'input' (got 'image')",
    "shape": "input 'input': shape [1, 2, 32, 32] does not match the model's [-1, 1, 32, 32] "
             "(-1: any batch size from 1)",
    "output": "unknown output 'probs' requested; model 'lenet5' has one output, 'logits'",
    "output shm": "output 'logits' names a shared-memory region, but shared memory is off; start "
                  "cnnctl serve with --allow-shared-memory",
    "input shm": "input 'input' names a shared-memory region, but shared memory is off; start "
                 "cnnctl serve with --allow-shared-memory",
    "contents too": "input 'input' has both raw_input_contents and contents; send one",
    "two inputs": "unexpected input 'extra'; model 'lenet5' takes exactly one input, 'input'",
    "two raws": "raw_input_contents has 2 entries for 1 input(s); send one per input, in order",
    "no data": "input 'input' has no data: send raw_input_contents or contents",
    "fp16 contents": "input 'input': FP16 has no typed contents field; send it as "
                     "raw_input_contents",
    "few contents": "input 'input': contents hold 1023 fp32 values; shape [1, 1, 32, 32] needs "
                    "1024",
}


@pytest.mark.parametrize("good_first", [False, True])
@pytest.mark.parametrize("case", list(FAULTS))
def test_every_fault_is_named_and_never_remembered(case: str, good_first: bool,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    codec = Codec(MANIFEST)
    if good_first:
        assert codec.decode(_wire(infer_request(_x(1))))[0] is not None
    checks = _counting(codec, monkeypatch)
    req = infer_request(_x(1))
    if case == "short raw":  # the same description as the cached one: only the payload is wrong
        req.raw_input_contents[0] = req.raw_input_contents[0][:-4]
    elif case == "long raw":
        req.raw_input_contents[0] += b"\0\0\0\0"
    elif case == "int64":
        req.inputs[0].datatype = "INT64"
    elif case == "fp16 length":
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
    elif case == "two raws":
        req.raw_input_contents.append(b"")
    elif case == "no data":
        req.ClearField("raw_input_contents")
    elif case in ("fp16 contents", "few contents"):
        req.ClearField("raw_input_contents")
        fp16 = case == "fp16 contents"
        req.inputs[0].contents.fp32_contents.extend([0.0] * (1024 if fp16 else 1023))
        if fp16:
            req.inputs[0].datatype = "FP16"
    for _ in range(2):
        with pytest.raises(CnnctlError) as info:
            codec.decode(_wire(req))
        code = OFF if "shm" in case else BAD
        assert status_for(info.value) == (code, FAULTS[case])
    # a fault in the payload, not the description: its layout is checked once and remembered
    # (short and long raw: the good request's layout, cached already); any other fault is checked
    # every time
    checked = {"short raw": (1, 0), "long raw": (1, 0), "fp16 length": (1, 1)}
    assert checks == [checked.get(case, (2, 2))[good_first]]


def test_the_cache_is_bounded(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(codec_mod, "_CACHE_MAX", 2)
    codec = Codec(MANIFEST)
    checks = _counting(codec, monkeypatch)
    for n in (1, 2, 3, 4, 1, 2, 3, 4):  # beyond two layouts, checked (and right) every time
        np.testing.assert_array_equal(codec.decode(_wire(infer_request(_x(n))))[0], _x(n))
    assert checks == [6]


# ---------------------------------------------------------------- the encoder
def _expected(n: int, y: np.ndarray, rid: str = "") -> pb.ModelInferResponse:
    expected = pb.ModelInferResponse(model_name="lenet5", model_version="3", id=rid)
    expected.outputs.add(name="logits", datatype="FP32", shape=[n, 10])
    expected.raw_output_contents.append(y.astype("<f4").tobytes())
    return expected


def test_answers_carry_the_output_and_only_their_own_id() -> None:
    codec = Codec(MANIFEST)
    for rid, n in (("", 1), ("req-7", 1), ("", 1), ("", 4), ("x", 4)):  # repeats: from templates
        y = np.random.default_rng(n).standard_normal((n, 10), dtype=np.float32)
        assert codec.encode(infer_request(_x(n), rid=rid), y) == _expected(n, y, rid)
    # a float64 or non-contiguous output: the same bytes as its float32, C-order copy
    y64 = np.arange(20, dtype=np.float64).reshape(2, 10)
    assert codec.encode(infer_request(_x(2)), y64) == _expected(2, y64)
    strided = np.arange(40, dtype=np.float32).reshape(2, 20)[:, ::2]
    assert codec.encode(infer_request(_x(2)), strided) == _expected(2, strided)


# ---------------------------------------------------------------- shared memory
IN_BYTES, OUT_BYTES = 4 * 4096, 40 * 4


@pytest.fixture
def registry(tmp_path: Path) -> Caller:
    """Regions 'in' (16 KiB, 4 lenet5 images) and 'out' (4 x 10 logits), each in its own object,
    as this process's user sees them; a file under tmp_path stands in for /dev/shm."""
    (tmp_path / "obj_in").write_bytes(bytes(IN_BYTES))
    (tmp_path / "obj_out").write_bytes(bytes(OUT_BYTES))
    reg = SharedMemoryRegistry(root=tmp_path).as_user(os.getuid())
    reg.register("in", "/obj_in", 0, IN_BYTES)
    reg.register("out", "/obj_out", 0, OUT_BYTES)
    return reg


def _poke(path: Path, offset: int, data: bytes) -> None:
    with open(path, "r+b") as f:
        f.seek(offset)
        f.write(data)


def _peek(path: Path, offset: int, size: int) -> bytes:
    with open(path, "rb") as f:
        f.seek(offset)
        return f.read(size)


def _shm_req(n: int, out: bool = True, in_offset: int = 0, out_offset: int = 0,
             rid: str = "", datatype: str = "FP32", in_bytes: int = 0) -> pb.ModelInferRequest:
    req = pb.ModelInferRequest(model_name="lenet5", id=rid)
    t = req.inputs.add(name="input", datatype=datatype,
                       shape=[n] if datatype == "BYTES" else [n, 1, 32, 32])
    t.parameters["shared_memory_region"].string_param = "in"
    t.parameters["shared_memory_byte_size"].int64_param = in_bytes or 4096 * n
    if in_offset:
        t.parameters["shared_memory_offset"].int64_param = in_offset
    if out:
        o = req.outputs.add(name="logits")
        o.parameters["shared_memory_region"].string_param = "out"
        o.parameters["shared_memory_byte_size"].uint64_param = OUT_BYTES - out_offset
        o.parameters["shared_memory_offset"].int64_param = out_offset
    return _wire(req)


def test_shared_memory_in_and_out(registry: Caller, tmp_path: Path,
                                  monkeypatch: pytest.MonkeyPatch) -> None:
    codec = Codec(MANIFEST)
    checks = _counting(codec, monkeypatch)
    # the repeats come from the caches of checked layouts and of answers, with and without id
    for n, out, in_offset, out_offset, rid in (
            (2, True, 0, 0, "a"), (1, True, 4096, 40, ""), (2, True, 0, 0, ""),
            (2, True, 0, 0, "b"), (2, True, 0, 0, ""), (3, False, 4096, 0, ""),
            (3, False, 4096, 0, "c")):
        x = _x(n)
        _poke(tmp_path / "obj_in", in_offset, x.tobytes())
        req = _shm_req(n, out, in_offset, out_offset, rid)
        tensor, _, view = codec.decode(req, registry)
        assert tensor.dtype == np.float32  # type: ignore[union-attr]
        np.testing.assert_array_equal(tensor, x)
        y = np.random.default_rng(len(rid) + n).standard_normal((n, 10), dtype=np.float32)
        answer = codec.encode(req, y, view)
        if not out:
            assert view is None and answer == _expected(n, y, rid)
            continue
        assert view is not None
        in_region = _peek(tmp_path / "obj_out", out_offset, 40 * n)
        np.testing.assert_array_equal(np.frombuffer(in_region, "<f4").reshape(n, 10), y)
        expected = _expected(n, y, rid)
        expected.raw_output_contents[0] = b""  # one empty entry per output, as Triton sends
        for key, value in req.outputs[0].parameters.items():  # where it went, echoed
            expected.outputs[0].parameters[key].CopyFrom(value)
        assert answer == expected
    assert checks == [3]


@pytest.mark.parametrize("case", ["raw too", "contents too", "shape", "byte size", "no size",
                                  "string size", "negative offset", "output too small", "off"])
def test_bad_shared_memory_descriptions_are_named(case: str,
                                                  registry: Caller) -> None:
    codec = Codec(MANIFEST)
    assert codec.decode(_shm_req(1), registry)[0] is not None  # this layout is cached now
    req = pb.ModelInferRequest()
    req.CopyFrom(_shm_req(1))
    params, out = req.inputs[0].parameters, req.outputs[0]
    message = {
        "raw too": "input 'input' has both a shared-memory region and contents in the message; "
                   "send one",
        "contents too": "input 'input' has both a shared-memory region and contents in the "
                        "message; send one",
        "shape": "input 'input': shape [1, 1, 28, 32] does not match the model's [-1, 1, 32, 32] "
                 "(-1: any batch size from 1)",
        "byte size": "input 'input': shared_memory_byte_size is 4092 bytes; shape [1, 1, 32, 32] "
                     "of FP32 needs 4096",
        "no size": "input 'input': shared_memory_region and shared_memory_byte_size go together; "
                   "give both",
        "string size": "input 'input': shared_memory_byte_size must be an integer parameter, got "
                       "string_param",
        "negative offset": "input 'input': shared_memory_offset must be at least 0, got -4",
        "output too small": "output 'logits': shared_memory_byte_size 36 is too small; 1 x [10] "
                            "FP32 needs 40",
        "off": "output 'logits' names a shared-memory region, but shared memory is off; start "
               "cnnctl serve with --allow-shared-memory",
    }[case]
    if case == "raw too":
        req.raw_input_contents.append(bytes(4096))
    elif case == "contents too":
        req.inputs[0].contents.fp32_contents.extend([0.0] * 1024)
    elif case == "shape":
        req.inputs[0].shape[2] = 28
    elif case == "byte size":
        params["shared_memory_byte_size"].int64_param = 4092
    elif case == "no size":
        del params["shared_memory_byte_size"]
    elif case == "string size":
        params["shared_memory_byte_size"].string_param = "4096"
    elif case == "negative offset":
        params["shared_memory_offset"].int64_param = -4
    elif case == "output too small":
        out.parameters["shared_memory_byte_size"].uint64_param = 36
    with pytest.raises(CnnctlError) as info:
        codec.decode(_wire(req), None if case == "off" else registry)
    assert status_for(info.value) == (OFF if case == "off" else BAD, message)


def test_a_cached_layout_still_finds_the_region_gone_or_truncated(
        registry: Caller, tmp_path: Path) -> None:
    codec = Codec(MANIFEST)
    req = _shm_req(2)
    assert codec.decode(req, registry)[0] is not None  # checked and remembered

    def same_error() -> str:
        with pytest.raises(CnnctlError) as cached:
            codec.decode(req, registry)
        with pytest.raises(CnnctlError) as fresh:
            Codec(MANIFEST).decode(req, registry)
        assert type(cached.value) is type(fresh.value) and str(cached.value) == str(fresh.value)
        return str(cached.value)

    os.truncate(tmp_path / "obj_in", 4096)  # a mapping read past the end would be SIGBUS
    assert same_error() == ("input 'input': shared-memory region 'in' gave 4096 of 8192 bytes "
                            "at offset 0; its key '/obj_in' was truncated after registering")
    registry.unregister("in")
    assert "region 'in' is not registered" in same_error()
    (tmp_path / "obj_small").write_bytes(bytes(4096))
    registry.register("in", "/obj_small", 0, 4096)  # the same name, too small for 2 images now
    assert "is beyond shared-memory region 'in' (4096 bytes)" in same_error()
    registry.unregister("in")
    (tmp_path / "obj_in").write_bytes(bytes(IN_BYTES))
    registry.register("in", "/obj_in", 0, IN_BYTES)
    assert codec.decode(req, registry)[0] is not None
    registry.unregister("out")
    assert "region 'out' is not registered" in same_error()


# ---------------------------------------------------------------- encoded images
def test_encoded_images_from_raw_contents_and_shared_memory(registry: Caller, tmp_path: Path,
                                                            monkeypatch: pytest.MonkeyPatch
                                                            ) -> None:
    codec = Codec(MANIFEST)
    checks = _counting(codec, monkeypatch)
    pngs = [_png(0), _png(255)]
    raw = pb.ModelInferRequest(model_name="lenet5")
    raw.inputs.add(name="input", datatype="BYTES", shape=[2])
    raw.raw_input_contents.append(_packed(pngs))
    typed = pb.ModelInferRequest(model_name="lenet5")
    typed.inputs.add(name="input", datatype="BYTES", shape=[2, 1]).contents.bytes_contents.extend(
        pngs)
    _poke(tmp_path / "obj_in", 0, _packed(pngs))
    in_shm = _shm_req(2, datatype="BYTES", in_bytes=len(_packed(pngs)))
    for req in (raw, raw, typed, in_shm, in_shm):
        tensor, images, view = codec.decode(_wire(req), registry)
        assert tensor is None and images.count == 2  # split off the event loop, in preprocess
        np.testing.assert_array_equal(codec.preprocess(images), to_tensor(pngs, MANIFEST.image))
        assert (view is None) == (req is not in_shm)
    assert checks == [3]  # raw and shared memory once each; typed contents each time
    x = codec.preprocess(Images(2, pngs, sum(map(len, pngs))))
    assert x.dtype == np.float32 and x.shape == (2, 1, 32, 32)
    np.testing.assert_allclose(x[0], (0.0 - 0.1) / 0.3, rtol=1e-6)  # black, then white
    np.testing.assert_allclose(x[1], (1.0 - 0.1) / 0.3, rtol=1e-6)
    np.testing.assert_array_equal(x, to_tensor(pngs, MANIFEST.image))
    with pytest.raises(CnnctlError) as info:
        codec.preprocess(Images(2, [pngs[0], b"not a png"], 0))
    assert status_for(info.value) == (BAD, "input 'input': element 1 (9 bytes) is not a "
                                           "PNG or JPEG image; allowed: PNG, JPEG")
    short = pb.ModelInferRequest()
    short.CopyFrom(raw)
    short.raw_input_contents[0] = _packed(pngs[:1])  # cached layout, one image fewer
    _, images, _ = codec.decode(_wire(short), registry)
    with pytest.raises(CnnctlError, match=r"^input 'input': shape \[2\] says 2 images but the "
                                          r"contents hold 1$"):
        codec.preprocess(images)
