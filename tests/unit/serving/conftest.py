"""Serving fixtures: random-weight artifact directories, built once per session, and the in-process
ONNX Runtime reference. Helpers to start a server live in tests.support.serving."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from tests.support.serving import make_artifact


@pytest.fixture(scope="session")
def artifacts(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("artifacts")
    return {
        "lenet5": make_artifact(root / "lenet5", "lenet5", version="1", seed=0),
        "lenet5-v2": make_artifact(root / "lenet5-v2", "lenet5", version="2", seed=1),
    }


@pytest.fixture(scope="session")
def reference(artifacts: dict[str, Path]) -> Any:
    """In-process ONNX Runtime on the same file: what the server's answers must equal."""
    import onnxruntime as ort

    sessions = {k: ort.InferenceSession(str(p / "model.onnx"), providers=["CPUExecutionProvider"])
                for k, p in artifacts.items()}

    def run(x: np.ndarray, key: str = "lenet5") -> np.ndarray:
        return sessions[key].run(["logits"], {"input": x.astype(np.float32)})[0]

    return run


@pytest.fixture
def rng() -> Iterator[np.random.Generator]:
    yield np.random.default_rng(0)
