"""folder:PATH datasets: decoded once and cached when small, streamed through workers when large."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Callable

import pytest
import torch

from cnnctl.training import data as data_mod
from cnnctl.training.config import from_flags
from cnnctl.training.data import ImageData, MemorySource, StreamedData, StreamSource, load_split
from cnnctl.training.loop import train


def test_streamed_batches_equal_in_memory_batches(image_folder: Callable[..., Path]) -> None:
    folder = f"folder:{image_folder(per_class={'train': 10, 'test': 2})}"
    memory = load_split(folder, "train", shape=(3, 32, 32), stream="memory")
    streamed = load_split(folder, "train", shape=(3, 32, 32), stream="stream")
    assert isinstance(memory, ImageData) and isinstance(streamed, StreamedData)
    cpu = torch.device("cpu")
    a = list(MemorySource(memory, cpu).batches(seed=1, epoch=2, batch_size=4, rank=0, world=1,
                                               steps=3))
    b = list(StreamSource(streamed, cpu, workers=2).batches(seed=1, epoch=2, batch_size=4, rank=0,
                                                           world=1, steps=3))
    assert len(a) == len(b) == 3
    for (xa, ya), (xb, yb) in zip(a, b):
        assert xb.dtype == torch.uint8 and torch.equal(xa, xb) and torch.equal(ya, yb)


def test_training_streams_a_folder(tmp_path: Path, image_folder: Callable[..., Path]) -> None:
    folder = image_folder(per_class={"train": 8, "test": 2})
    config = from_flags("cifar-net-v3", dataset=f"folder:{folder}", stream="stream", workers=2,
                        epochs=1, batch_size=4, max_steps_per_epoch=3, progress=False, plot=False,
                        val_fraction=0.25, out=str(tmp_path / "run"))
    result = train(config)
    assert result.history[0].train_loss > 0


def test_auto_streams_what_does_not_fit(monkeypatch: pytest.MonkeyPatch,
                                        image_folder: Callable[..., Path]) -> None:
    folder = f"folder:{image_folder()}"
    monkeypatch.setattr(data_mod, "memory_budget", lambda: 1000)  # 12 images × 3 KB do not fit
    assert isinstance(load_split(folder, "train", shape=(3, 32, 32), stream="auto"), StreamedData)
    monkeypatch.setattr(data_mod, "memory_budget", lambda: 1 << 30)
    assert isinstance(load_split(folder, "train", shape=(3, 32, 32), stream="auto"), ImageData)


def test_small_folder_is_decoded_once_and_cached(monkeypatch: pytest.MonkeyPatch,
                                                 image_folder: Callable[..., Path]) -> None:
    root = image_folder()
    first = load_split(f"folder:{root}", "test", shape=(3, 32, 32))
    assert list((Path(os.environ["XDG_CACHE_HOME"]) / "cnnctl" / "data" / "folder-cache").glob("*.pt"))

    def no_decoding(*args: object, **kwargs: object) -> None:
        raise AssertionError("decoded again")

    monkeypatch.setattr(data_mod, "decode_images", no_decoding)
    again = load_split(f"folder:{root}", "test", shape=(3, 32, 32))
    assert torch.equal(first.images, again.images) and first.class_names == again.class_names
    # A changed file is a different dataset: the cache key includes sizes and mtimes.
    changed = next((root / "test" / "ants").iterdir())
    os.utime(changed, ns=(1, 1))
    with pytest.raises(AssertionError, match="decoded again"):
        load_split(f"folder:{root}", "test", shape=(3, 32, 32))


def test_cifar_net_v3_on_a_folder_of_jpegs_cli(tmp_path: Path,
                                               image_folder: Callable[..., Path]) -> None:
    """Issue 3, Must show 3: train/ and test/ class subfolders of 32×32 RGB JPEGs."""
    root = image_folder(classes=("airplane", "cat", "ship"), per_class={"train": 8, "test": 3})
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    done = subprocess.run([sys.executable, "-m", "cnnctl", "train", "--model", "cifar-net-v3",
                           "--dataset", f"folder:{root}", "--epochs", "2", "--batch-size", "8",
                           "--no-progress", "--no-plot", "--out", str(tmp_path / "run")],
                          capture_output=True, text=True, timeout=240, env=env)
    assert done.returncode == 0, done.stderr[-2000:]
    saved = json.loads((tmp_path / "run" / "config.json").read_text())
    assert saved["augment"] == "crop-flip" and saved["crop_padding"] == [0, 2, 3, 4]
    assert saved["schedule"] == "multistep" and saved["momentum"] == 0.9
    done = subprocess.run([sys.executable, "-m", "cnnctl", "evaluate",
                           str(tmp_path / "run" / "best.pt"), "--json"],
                          capture_output=True, text=True, timeout=120, env=env)
    assert done.returncode == 0, done.stderr[-2000:]
    out = json.loads(done.stdout)
    assert out["n"] == 9 and set(out["per_class"]) == {"airplane", "cat", "ship"}
