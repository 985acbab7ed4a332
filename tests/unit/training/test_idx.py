"""MNIST-style datasets are read from their idx files directly (no torchvision import): the same
tensors as torchvision's, from plain or gzipped files, and a clear error for a damaged file."""

from __future__ import annotations

import gzip
import struct
from pathlib import Path

import numpy as np
import pytest
import torch

from cnnctl.errors import DataError
from cnnctl.training.data import _idx_split, _read_idx


def _write_idx(path: Path, array: np.ndarray, gz: bool = False) -> None:
    raw = bytes([0, 0, 0x08, array.ndim]) + struct.pack(f">{array.ndim}I", *array.shape) \
        + array.astype(np.uint8).tobytes()
    if gz:
        path.with_suffix(path.suffix + ".gz").write_bytes(gzip.compress(raw))
    else:
        path.write_bytes(raw)


@pytest.mark.parametrize("gz", [False, True])
def test_reads_plain_and_gzipped_files(tmp_path: Path, gz: bool) -> None:
    raw = tmp_path / "FashionMNIST" / "raw"
    raw.mkdir(parents=True)
    images = np.random.default_rng(0).integers(0, 256, (5, 28, 28), dtype=np.uint8)
    labels = np.array([0, 9, 3, 3, 1], dtype=np.uint8)
    _write_idx(raw / "t10k-images-idx3-ubyte", images, gz)
    _write_idx(raw / "t10k-labels-idx1-ubyte", labels, gz)
    data = _idx_split("fashion-mnist", "test", tmp_path)
    assert data is not None
    assert torch.equal(data.images, torch.from_numpy(images).unsqueeze(1))
    assert data.labels.tolist() == [0, 9, 3, 3, 1] and data.labels.dtype == torch.int64
    assert data.class_names[9] == "Ankle boot"
    assert _idx_split("fashion-mnist", "train", tmp_path) is None  # train files absent


def test_a_truncated_file_is_a_data_error(tmp_path: Path) -> None:
    path = tmp_path / "x-idx3-ubyte"
    _write_idx(path, np.zeros((2, 3, 3), np.uint8))
    path.write_bytes(path.read_bytes()[:-1])
    with pytest.raises(DataError, match="17 bytes of data for dimensions"):
        _read_idx(path)


def test_same_tensors_as_torchvision(shared_data_dir: Path) -> None:
    from torchvision import datasets

    for split in ("train", "test"):
        ours = _idx_split("mnist", split, shared_data_dir)
        theirs = datasets.MNIST(root=str(shared_data_dir), train=split == "train", download=False)
        assert ours is not None
        assert torch.equal(ours.images[:, 0], theirs.data)
        assert torch.equal(ours.labels, theirs.targets)
