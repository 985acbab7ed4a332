"""serving/repository.py: artifact directories → loaded models, and what it refuses to load."""

from __future__ import annotations

import asyncio
import dataclasses
import hashlib
import os
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from cnnctl.errors import ArtifactError
from cnnctl.export import manifest as mf
from cnnctl.serving.metrics import ServerMetrics
from cnnctl.serving.repository import ModelRepository, find_artifact_dirs
from tests.support.serving import config_for


def test_a_file_swapped_after_its_check_is_not_served(
        artifacts: dict[str, Path], reference: Any, tmp_path: Path,
        monkeypatch: pytest.MonkeyPatch) -> None:
    """Whatever the loader reads after it has hashed the model file is not what gets served."""
    d = Path(shutil.copytree(artifacts["lenet5"], tmp_path / "lenet5"))
    other = tmp_path / "other.onnx"
    shutil.copyfile(artifacts["lenet5-v2"] / "model.onnx", other)  # valid, other weights
    served = mf.sha256_file(d / "model.onnx")
    swapped = []

    class SwapAfterHashing:
        """hashlib.sha256 that replaces the model file on disk as soon as its digest is taken."""

        def __init__(self, data: bytes = b"") -> None:
            self._h = hashlib.sha256(data)

        def update(self, data: bytes) -> None:
            self._h.update(data)

        def hexdigest(self) -> str:
            digest = self._h.hexdigest()
            if not swapped and digest == served:
                os.replace(other, d / "model.onnx")
                swapped.append(True)
            return digest

    monkeypatch.setattr(mf, "hashlib", type("hashlib", (), {"sha256": SwapAfterHashing}))

    async def load_and_run(x: np.ndarray) -> np.ndarray:
        config = dataclasses.replace(config_for(d), intra_op_threads=2)  # both CPU sessions
        repo = ModelRepository.load(config, ServerMetrics())
        try:
            return repo.get("lenet5").runtime.run(x)
        finally:
            await repo.drain()

    x = np.random.default_rng(0).standard_normal((3, 1, 32, 32), dtype=np.float32)
    out = asyncio.run(load_and_run(x))
    assert swapped  # the file on disk is now the other model's
    np.testing.assert_allclose(out, reference(x, "lenet5"), rtol=1e-4, atol=1e-5)
    assert not np.allclose(out, reference(x, "lenet5-v2"), rtol=1e-2, atol=1e-2)


def test_repository_discovery_skips_hidden_and_refuses_unsafe_directories(
        tmp_path: Path) -> None:
    def artifact(*parts: str) -> None:
        (tmp_path.joinpath(*parts)).mkdir(parents=True)
        (tmp_path.joinpath(*parts, mf.MANIFEST_NAME)).write_text("{}")

    artifact("lenet5")
    artifact("resnet", "2")
    artifact(".lenet5.tmp-x1y2")  # `cnnctl export` at work: manifest written, not yet renamed
    artifact("resnet", ".3.old-123")  # what an export is replacing
    assert find_artifact_dirs(tmp_path) == [tmp_path / "lenet5", tmp_path / "resnet" / "2"]
    artifact("bad\nname")
    with pytest.raises(ArtifactError) as exc:
        find_artifact_dirs(tmp_path)
    assert str(exc.value) == (
        f"--repository {str(tmp_path)!r}: directory 'bad\\nname' is not allowed; allowed: 1-128 "
        f"letters, digits, '_', '.', '-', starting with a letter or digit, without '..'")
