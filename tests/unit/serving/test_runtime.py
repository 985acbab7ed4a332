"""The ORT wrapper: the all-core session for big batches, the 1-thread one for small batches."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

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
