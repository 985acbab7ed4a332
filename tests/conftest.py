"""Shared fixtures.

``shared_data_dir`` is the real MNIST beside the repository (``../shared/data``). Tests that need it
skip with a reason when it is absent, except under ``CI=true``, where its absence is a failure: CI
always has it, so a skip there would hide a broken path.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "data"


def _has_mnist(root: Path) -> bool:
    raw = root / "MNIST" / "raw"
    return all((raw / f).exists() for f in ("train-images-idx3-ubyte", "t10k-images-idx3-ubyte"))


@pytest.fixture(scope="session")
def shared_data_dir() -> Path:
    if _has_mnist(SHARED_DATA):
        return SHARED_DATA
    if os.environ.get("CI") == "true":
        pytest.fail(f"CI=true but the real MNIST is missing from {SHARED_DATA}")
    pytest.skip(f"real MNIST not found at {SHARED_DATA} (tests that need ../shared/data skip)")


@pytest.fixture(scope="session")
def repo_root() -> Path:
    return REPO
