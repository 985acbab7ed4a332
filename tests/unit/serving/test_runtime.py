"""The ORT wrapper: the all-core session for big batches, the 1-thread one for small batches."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest

from cnnctl.export.manifest import load_manifest
from cnnctl.serving import runtime
from cnnctl.serving.runtime import OrtModel


def test_small_model_gets_a_one_thread_inline_session_with_equal_answers(
        artifacts: dict[str, Path], reference: Any) -> None:
    d = artifacts["lenet5"]
    model = OrtModel(d, load_manifest(d), device="cpu", intra_op_threads=2)
    try:
        assert model.info.intra_op_threads == 2 and model.info.single_thread_session
        assert model.info.parallel_from > 1  # lenet5 computes a small batch well under 500 µs
        rng = np.random.default_rng(0)
        for n in (3, model.info.parallel_from):  # the 1-thread session, then the 2-thread one
            x = rng.standard_normal((n, 1, 32, 32), dtype=np.float32)
            np.testing.assert_allclose(model.run(x), reference(x), rtol=1e-4, atol=1e-5)
    finally:
        model.close()


def test_no_inline_session_for_one_thread_or_a_big_file(artifacts: dict[str, Path],
                                                        monkeypatch: Any, reference: Any) -> None:
    d = artifacts["lenet5"]
    one = OrtModel(d, load_manifest(d), device="cpu", intra_op_threads=1)
    assert not one.info.single_thread_session  # the pool's session is already single-threaded
    monkeypatch.setattr(runtime, "INLINE_SESSION_MAX_BYTES", 1000)
    big = OrtModel(d, load_manifest(d), device="cpu", intra_op_threads=2)
    assert not big.info.single_thread_session  # memory: a big model gets one session
    x = np.zeros((1, 1, 32, 32), dtype=np.float32)
    np.testing.assert_allclose(big.run(x), reference(x), rtol=1e-4, atol=1e-5)
    one.close()
    big.close()


def test_all_core_session_spins_only_during_a_run(artifacts: dict[str, Path]) -> None:
    d = artifacts["lenet5"]
    model = OrtModel(d, load_manifest(d), device="cpu", intra_op_threads=2)
    try:
        def entry(session: Any, key: str) -> str:
            return session.get_session_options().get_session_config_entry(key)

        # the 2-thread session's workers spin between the operators of a run, stop when it ends
        assert entry(model.session, "session.intra_op.allow_spinning") == "1"
        assert entry(model.session, "session.force_spinning_stop") == "1"
        # the 1-thread session has no workers: nothing spins
        assert entry(model._single, "session.intra_op.allow_spinning") == "0"
    finally:
        model.close()


def test_every_session_is_built_from_the_bytes_checked_and_keeps_none(
        artifacts: dict[str, Path], monkeypatch: Any) -> None:
    """The CUDA probe and both CPU sessions get the serialized model whose sha256 the manifest
    lists, never a path to open again; once built, nothing holds those bytes."""
    import gc
    import hashlib

    import onnxruntime as ort

    d = artifacts["lenet5"]
    manifest = load_manifest(d, verify_files=False)
    real_session, real_read = ort.InferenceSession, runtime.read_file
    models: list[Any] = []
    read: list[bytes] = []

    def session(model: Any, *args: Any, providers: list[str], **kwargs: Any) -> Any:
        models.append(model)
        if runtime.CUDA in providers:
            raise RuntimeError("no GPU here")  # the probe: as on a machine whose GPU fails
        return real_session(model, *args, providers=providers, **kwargs)

    def read_file(*args: Any, **kwargs: Any) -> bytes:
        read.append(real_read(*args, **kwargs))
        return read[-1]

    monkeypatch.setattr(ort, "InferenceSession", session)
    monkeypatch.setattr(runtime, "read_file", read_file)
    monkeypatch.setattr(runtime, "_cuda_driver_present", lambda: True)
    monkeypatch.setattr(runtime, "_cuda_usable", None)  # probe again; restored afterwards
    model = OrtModel(d, manifest, device="auto", intra_op_threads=2)
    try:
        assert model.info.provider == runtime.CPU and model.info.single_thread_session
        assert len(models) == 3  # the probe, the all-core session, the 1-thread session
        assert all(type(m) is bytes and hashlib.sha256(m).hexdigest() == manifest.files[0].sha256
                   for m in models)
        models.clear()
        assert len(read) == 1  # one read of the file
        assert [r for r in gc.get_referrers(read[0]) if r is not read] == []
    finally:
        model.close()


def test_a_model_with_external_data_is_refused(tmp_path: Path) -> None:
    """External data files are outside any manifest hash: a model that needs one is not served."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    from cnnctl.errors import ArtifactError
    from cnnctl.export import manifest as mf

    weights = numpy_helper.from_array(np.eye(2, dtype=np.float32), "w")
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["input", "w"], ["logits"])], "g",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["batch", 2])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", 2])], [weights])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
    onnx.save_model(model, str(tmp_path / "model.onnx"), save_as_external_data=True,
                    location="weights.bin", size_threshold=0)
    assert (tmp_path / "weights.bin").is_file()
    manifest = mf.Manifest(
        name="ext", model="ext", version="1",
        files=[mf.file_entry(tmp_path, "model.onnx", "onnx", "fp32")],
        input=mf.TensorSpec("input", "FP32", [-1, 2]),
        output=mf.TensorSpec("logits", "FP32", [-1, 2]),
        image=mf.ImageSpec(1, 1, 2, [0.0], [1.0]), class_names=["a", "b"])
    with pytest.raises(ArtifactError, match=r"model.onnx: onnxruntime cannot load it \(.*\); "
                       r"cnnctl serves single-file ONNX models as `cnnctl export` writes them"):
        OrtModel(tmp_path, manifest, device="cpu", intra_op_threads=1)
