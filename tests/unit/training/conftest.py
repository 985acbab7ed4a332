"""Small image folders for the training tests (real files, decoded by the real loader)."""

from __future__ import annotations

from pathlib import Path
from typing import Callable

import numpy as np
import pytest


def write_folder(root: Path, size: int = 32, classes: tuple[str, ...] = ("ants", "bees"),
                 per_class: dict[str, int] | None = None, suffix: str = ".jpg",
                 seed: int = 0) -> Path:
    """``root/train/CLASS/*.jpg`` and ``root/test/CLASS/*.jpg``: each class a different colour plus
    noise, so a few steps of training can tell them apart."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    per_class = per_class or {"train": 6, "test": 3}
    for split, n in per_class.items():
        for c, name in enumerate(classes):
            folder = root / split / name
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(n):
                base = np.zeros((size, size, 3), dtype=np.float32)
                base[..., c % 3] = 200.0
                img = np.clip(base + rng.normal(0, 25, base.shape), 0, 255).astype(np.uint8)
                Image.fromarray(img).save(folder / f"{i:03d}{suffix}")
    return root


@pytest.fixture
def image_folder(tmp_path: Path) -> Callable[..., Path]:
    def make(**kwargs: object) -> Path:
        return write_folder(tmp_path / "images", **kwargs)  # type: ignore[arg-type]

    return make


@pytest.fixture(autouse=True)
def _private_cache(tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch) -> None:
    """Decoded-folder caches go to a temp dir, not the user's ~/.cache."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path_factory.mktemp("cache")))
