"""Datasets, decoded once into uint8 tensors, and the sources the loop draws batches from.

Every dataset ends up as one ``ImageData``: an N×C×H×W uint8 tensor plus int64 labels. A
``MemorySource`` moves it to the device once and the loop normalises/augments whole batches there
(transforms.py), so no per-item Python transform ever runs in the hot loop (airbench's approach;
seed 002's ToTensor+Normalize per item through a DataLoader is what ``bench/train_speed.py``
compares against). Folders too large for memory stream through DataLoader workers instead
(``StreamSource``).
"""

from __future__ import annotations

import gzip
import logging
import os
from dataclasses import dataclass, replace
from importlib import resources
from pathlib import Path
from typing import Iterator

import numpy as np
import torch

from cnnctl.errors import DataError, ShapeError, UnknownNameError, UsageError, known
from cnnctl.files import write_atomic_with
from cnnctl.training.config import (DATASETS, RANGES, SPLITS, TrainConfig,
                                    check_dataset_name)
from cnnctl.training.models import format_shape

log = logging.getLogger(__name__)

MNIST_FILES = (
    "train-images-idx3-ubyte",
    "train-labels-idx1-ubyte",
    "t10k-images-idx3-ubyte",
    "t10k-labels-idx1-ubyte",
)
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff")


@dataclass(frozen=True)
class ImageData:
    """A split held in memory: uint8 images N×C×H×W, int64 labels N."""

    images: torch.Tensor
    labels: torch.Tensor
    class_names: list[str]
    mean: tuple[float, ...]  # per channel, on pixels scaled to [0, 1]
    std: tuple[float, ...]
    name: str

    def __len__(self) -> int:
        return int(self.labels.shape[0])

    @property
    def shape(self) -> tuple[int, int, int]:
        c, h, w = self.images.shape[1:]
        return (int(c), int(h), int(w))

    def subset(self, index: torch.Tensor) -> "ImageData":
        return replace(self, images=self.images[index], labels=self.labels[index])


_MNIST_NORM = ((0.1307,), (0.3081,))  # the seeds' Normalize((0.1307,), (0.3081,))
_FASHION_NORM = ((0.2860,), (0.3530,))
_CIFAR_NORM = ((0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616))


def default_data_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "cnnctl" / "data"


# --- the embedded sample ---------------------------------------------------------------------


def _load_sample(split: str) -> ImageData:
    with resources.files("cnnctl.training").joinpath("sample/mnist_sample.npz").open("rb") as f:
        arrays = np.load(f)
        images = torch.from_numpy(arrays[f"{split}_images"].copy()).unsqueeze(1)
        labels = torch.from_numpy(arrays[f"{split}_labels"].astype(np.int64))
    return ImageData(images, labels, [str(i) for i in range(10)], *_MNIST_NORM, "mnist-sample")


# --- torchvision datasets --------------------------------------------------------------------


def _read_idx(path: Path) -> np.ndarray:
    """One idx file (MNIST's format: big-endian magic, dims, then the bytes), gzipped or not."""
    raw = path.read_bytes() if path.exists() else gzip.decompress(
        path.with_suffix(path.suffix + ".gz").read_bytes())
    kind, ndim = raw[2], raw[3]
    if raw[:2] != b"\0\0" or kind != 0x08:  # 0x08: unsigned bytes, all MNIST-style files use it
        raise DataError(f"{path}: not an idx file of unsigned bytes")
    dims = np.frombuffer(raw, dtype=">u4", count=ndim, offset=4).astype(np.int64)
    data = np.frombuffer(raw, dtype=np.uint8, offset=4 + 4 * ndim)
    if data.size != int(np.prod(dims)):
        raise DataError(f"{path}: {data.size} bytes of data for dimensions {dims.tolist()}")
    return data.reshape(dims.tolist())


def _idx_split(name: str, split: str, root: Path) -> ImageData | None:
    """MNIST and Fashion-MNIST straight from their idx files in torchvision's layout, without
    importing torchvision (which costs more than reading the 55 MB); None if a file is missing."""
    folder = root / ("MNIST" if name == "mnist" else "FashionMNIST") / "raw"
    prefix = "train" if split == "train" else "t10k"
    paths = [folder / f"{prefix}-{kind}-idx{n}-ubyte" for kind, n in (("images", 3), ("labels", 1))]
    if not all(p.exists() or p.with_suffix(p.suffix + ".gz").exists() for p in paths):
        return None
    images = torch.from_numpy(_read_idx(paths[0]).copy()).unsqueeze(1)
    labels = torch.from_numpy(_read_idx(paths[1]).astype(np.int64))
    if name == "mnist":
        return ImageData(images, labels, [str(i) for i in range(10)], *_MNIST_NORM, name)
    return ImageData(images, labels, list(_FASHION_CLASSES), *_FASHION_NORM, name)


_FASHION_CLASSES = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt",
                    "Sneaker", "Bag", "Ankle boot")  # torchvision's FashionMNIST.classes


def _torchvision(name: str, split: str, data_dir: Path, download: bool) -> ImageData:
    if name in ("mnist", "fashion-mnist"):
        found = _idx_split(name, split, data_dir)
        if found is not None:
            return found
    from torchvision import datasets

    cls, folder, files, norm = {
        "mnist": (datasets.MNIST, "MNIST/raw", MNIST_FILES, _MNIST_NORM),
        "fashion-mnist": (datasets.FashionMNIST, "FashionMNIST/raw", MNIST_FILES, _FASHION_NORM),
        "cifar10": (datasets.CIFAR10, "cifar-10-batches-py",
                    tuple(f"data_batch_{i}" for i in range(1, 6)) + ("test_batch",), _CIFAR_NORM),
    }[name]
    expected = [data_dir / folder / f for f in files]
    present = all(p.exists() or p.with_suffix(p.suffix + ".gz").exists() for p in expected)
    try:
        ds = cls(root=str(data_dir), train=(split == "train"), download=download and not present)
    except Exception as exc:  # torchvision raises RuntimeError offline, URLError on a failed fetch
        looked = ", ".join(str(p) for p in expected)
        how = "download failed" if download and not present else "not found"
        raise DataError(
            f"dataset {name} {how} in {data_dir} (looked for {looked}); "
            f"pass --data-dir DIR with the files in torchvision's layout, or go online to download "
            f"({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''})"
        ) from None
    data = torch.as_tensor(np.asarray(ds.data))
    images = data.unsqueeze(1) if data.dim() == 3 else data.permute(0, 3, 1, 2)
    labels = torch.as_tensor(np.asarray(ds.targets), dtype=torch.int64)
    # torchvision names MNIST's classes "0 - zero"...; the digit alone is what a user expects back.
    classes = [str(i) for i in range(10)] if name == "mnist" else list(ds.classes)
    return ImageData(images.contiguous(), labels, classes, *norm, name)


# --- folder datasets -------------------------------------------------------------------------


def _list_images(root: Path) -> tuple[list[tuple[Path, int]], list[str]]:
    classes = sorted(d.name for d in root.iterdir() if d.is_dir() and not d.name.startswith("."))
    if not classes:
        raise DataError(f"{root}: no class subfolders (expected {root}/CLASS/image.jpg)")
    items = [
        (p, i)
        for i, c in enumerate(classes)
        for p in sorted((root / c).rglob("*"))
        if p.suffix.lower() in IMAGE_SUFFIXES
    ]
    if not items:
        raise DataError(f"{root}: no images with suffix {', '.join(IMAGE_SUFFIXES)}")
    return items, classes


def decode_image(path: Path, channels: int, size: tuple[int, int]) -> torch.Tensor:
    """One file → uint8 C×H×W, converted to L or RGB and resized bilinearly to ``size`` (H, W)."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as img:
            img = img.convert("L" if channels == 1 else "RGB")
            if img.size != (size[1], size[0]):
                img = img.resize((size[1], size[0]), Image.BILINEAR)
            arr = np.array(img, dtype=np.uint8)  # a writable copy for torch
    except (UnidentifiedImageError, OSError) as exc:
        raise DataError(f"cannot decode image {path}: {exc}") from None
    return torch.from_numpy(arr.reshape(size[0], size[1], channels)).permute(2, 0, 1)


def decode_images(
    paths: list[Path], channels: int, size: tuple[int, int], progress: bool = True
) -> torch.Tensor:
    """Decode, convert (L or RGB) and resize each file once into one uint8 N×C×H×W tensor."""
    from tqdm import tqdm

    out = torch.empty((len(paths), channels, *size), dtype=torch.uint8)
    for i, path in enumerate(tqdm(paths, desc="decoding", unit="img", disable=not progress,
                                  leave=False)):
        out[i] = decode_image(path, channels, size)
    return out


def folder_items(path: str, split: str, val_fraction: float, seed: int
                 ) -> tuple[list[tuple[Path, int]], list[str]]:
    """The files and labels of a split of ``folder:PATH``: ``PATH/train`` + ``PATH/val|test``
    (seed 004's ants/bees layout), or one folder of class subfolders split reproducibly by
    ``val_fraction`` (its held-out part serves val and test). Without ``val/``, the val split is
    carved out of ``train/``."""
    root = Path(path).expanduser()
    if not root.is_dir():
        raise DataError(f"dataset folder {str(root)!r} does not exist")

    def first(*names: str) -> Path | None:
        return next((root / n for n in names if (root / n).is_dir()), None)

    val_dir = first("val", "valid", "validation")
    if (root / "train").is_dir():
        source = {"train": root / "train", "val": val_dir, "test": first("test") or val_dir}[split]
        carve = source is None or (split == "train" and val_dir is None)
        if source is None and split == "test":
            raise DataError(f"{root}: no test/ or val/ subfolder for the test split")
        source = source or root / "train"
    else:
        source, carve = root, True
    items, classes = _list_images(source)
    if carve:
        order = torch.randperm(len(items), generator=torch.Generator().manual_seed(seed)).tolist()
        n_val = max(1, int(round(len(items) * val_fraction)))
        keep = order[n_val:] if split == "train" else order[:n_val]
        items = [items[i] for i in keep]
    return items, classes


class FolderStream(torch.utils.data.Dataset):
    """Decodes and resizes one image per ``__getitem__``: runs in DataLoader worker processes when a
    folder is too large to hold decoded in memory (the loop normalises whole batches afterwards)."""

    def __init__(self, items: list[tuple[Path, int]], shape: tuple[int, int, int]) -> None:
        self.items = items
        self.shape = shape

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        path, label = self.items[index]
        return decode_image(path, self.shape[0], (self.shape[1], self.shape[2])), label


@dataclass(frozen=True)
class StreamedData:
    """A split read from disk batch by batch: same fields as ImageData but no ``images``."""

    dataset: FolderStream
    labels: torch.Tensor
    class_names: list[str]
    mean: tuple[float, ...]
    std: tuple[float, ...]
    name: str

    def __len__(self) -> int:
        return int(self.labels.shape[0])

    @property
    def shape(self) -> tuple[int, int, int]:
        return self.dataset.shape


def _stats(images: torch.Tensor) -> tuple[tuple[float, ...], tuple[float, ...]]:
    floats = images.float().div_(255)
    mean = tuple(floats.mean(dim=(0, 2, 3)).tolist())
    std = tuple(floats.std(dim=(0, 2, 3)).clamp_min(1e-3).tolist()) if len(images) > 1 \
        else tuple(1.0 for _ in mean)
    return mean, std


def memory_budget() -> int:
    """Bytes of decoded images a folder may take in memory: a quarter of what is available."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024 // 4
    except OSError:
        pass
    return 2 << 30


def _cache_path(items: list[tuple[Path, int]], classes: list[str], shape: tuple[int, int, int]
                ) -> Path:
    import hashlib

    h = hashlib.sha256(repr((classes, shape)).encode())
    for p, label in items:
        st = p.stat()
        h.update(f"{p.resolve()}\0{label}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
    return default_data_dir() / "folder-cache" / f"{h.hexdigest()[:24]}.pt"


def _folder(path: str, split: str, shape: tuple[int, int, int], val_fraction: float,
            seed: int, stream: str = "auto") -> ImageData | StreamedData:
    """Small folders are decoded once (progress bar) and cached under the data cache dir, keyed by
    the files' paths, sizes and mtimes; larger-than-memory ones (or ``stream="stream"``) stream."""
    items, classes = folder_items(path, split, val_fraction, seed)
    labels = torch.tensor([label for _, label in items], dtype=torch.int64)
    c, h, w = shape
    decoded_bytes = len(items) * c * h * w
    if stream == "stream" or (stream == "auto" and decoded_bytes > memory_budget()):
        # Normalisation from a fixed random sample: decoding everything just for statistics
        # would cost a whole extra pass over a dataset too large to hold.
        pick = torch.randperm(len(items), generator=torch.Generator().manual_seed(0))[:512]
        sample = decode_images([items[i][0] for i in pick.tolist()], c, (h, w), progress=False)
        log.info("streaming %s %s: %d images (%.1f GB decoded)", path, split, len(items),
                 decoded_bytes / 1e9)
        return StreamedData(FolderStream(items, shape), labels, classes, *_stats(sample),
                            f"folder:{path}")
    cache = _cache_path(items, classes, shape)
    if cache.is_file():
        try:
            cached = torch.load(cache, weights_only=True)
            return ImageData(cached["images"], cached["labels"], classes,
                             tuple(cached["mean"]), tuple(cached["std"]), f"folder:{path}")
        except Exception as exc:  # a damaged cache is rebuilt, never trusted
            log.warning("ignoring folder cache %s (%s)", cache, exc)
    images = decode_images([p for p, _ in items], c, (h, w), progress=len(items) > 200)
    mean, std = _stats(images)
    try:
        cache.parent.mkdir(parents=True, exist_ok=True)
        write_atomic_with(cache, lambda f: torch.save(
            {"images": images, "labels": labels, "mean": list(mean), "std": list(std)}, f))
    except OSError as exc:
        log.warning("could not cache decoded folder in %s (%s)", cache.parent, exc)
    return ImageData(images, labels, classes, mean, std, f"folder:{path}")


# --- the entry points ------------------------------------------------------------------------


def load_split(
    name: str,
    split: str,
    data_dir: str | os.PathLike[str] | None = None,
    download: bool = True,
    shape: tuple[int, int, int] | None = None,
    val_fraction: float = 0.1,
    seed: int = 0,
    stream: str = "memory",
) -> ImageData | StreamedData:
    """Load ``split`` ("train", "val" or "test") of a dataset as uint8 tensors.

    For built-in datasets "val" is a reproducible slice of the training set (``val_fraction``), so
    model selection never looks at the test split. ``shape`` (C, H, W) is what folder images are
    converted and resized to; built-in datasets keep their native shape. ``stream`` (folder
    datasets): "memory" decodes everything, "stream" returns a StreamedData read batch by batch,
    "auto" streams only what would not fit in a quarter of the available memory."""
    _check_request(name, val_fraction)
    if split not in SPLITS:
        raise UnknownNameError(f"unknown split {split!r}; known: {known(SPLITS)}")
    if name.startswith("folder:"):
        return _folder_split(name, split, shape, val_fraction, seed, stream)
    if split == "test":
        return _builtin(name, "test", data_dir, download)
    train, val = _hold_out(_builtin(name, "train", data_dir, download), val_fraction, seed)
    return train if split == "train" else val


def load_train_val(
    name: str,
    data_dir: str | os.PathLike[str] | None = None,
    download: bool = True,
    shape: tuple[int, int, int] | None = None,
    val_fraction: float = 0.1,
    seed: int = 0,
    stream: str = "memory",
) -> tuple[ImageData | StreamedData, ImageData | StreamedData]:
    """``load_split(..., "train")`` and ``load_split(..., "val")`` with the training split read
    once (MNIST's 47 MB of idx files take about a second to parse)."""
    _check_request(name, val_fraction)
    if name.startswith("folder:"):
        return (_folder_split(name, "train", shape, val_fraction, seed, stream),
                _folder_split(name, "val", shape, val_fraction, seed, stream))
    return _hold_out(_builtin(name, "train", data_dir, download), val_fraction, seed)


def _check_request(name: str, val_fraction: float) -> None:
    check_dataset_name(name)
    RANGES["val_fraction"].check("val_fraction", val_fraction)


def _builtin(name: str, split: str, data_dir: str | os.PathLike[str] | None,
             download: bool) -> ImageData:
    if name == "mnist-sample":
        return _load_sample(split)
    root = Path(data_dir).expanduser() if data_dir else default_data_dir()
    return _torchvision(name, split, root, download)


def _folder_split(name: str, split: str, shape: tuple[int, int, int] | None, val_fraction: float,
                  seed: int, stream: str) -> ImageData | StreamedData:
    if shape is None:
        raise ShapeError("a folder dataset needs the model's input shape to decode into")
    return _folder(name[len("folder:"):], split, shape, val_fraction, seed, stream)


def _hold_out(full: ImageData, val_fraction: float, seed: int) -> tuple[ImageData, ImageData]:
    """(train, val): a reproducible ``val_fraction`` of the training split held out."""
    order = torch.randperm(len(full), generator=torch.Generator().manual_seed(seed))
    n_val = int(round(len(full) * val_fraction))
    return full.subset(order[n_val:]), full.subset(order[:n_val])


def load_for_training(config: TrainConfig, input_shape: tuple[int, int, int]
                      ) -> tuple[ImageData | StreamedData, ImageData | StreamedData]:
    """The training and validation splits ``config`` asks for, checked against the model's input."""
    info = DATASETS.get(config.dataset)
    if info is not None and info.shape is not None and info.shape[0] != input_shape[0]:
        # Before reading anything: a channel mismatch is known from the dataset's description.
        raise UsageError(
            f"model {config.model} expects {format_shape(input_shape)} input; dataset "
            f"{config.dataset} gives {format_shape(info.shape)}"
        )
    # The validation slice is fixed (seed 0), not tied to --seed: runs with different seeds are
    # selected on the same held-out images.
    train_data, val_data = load_train_val(
        config.dataset, data_dir=config.data_dir, shape=input_shape,
        val_fraction=config.val_fraction, seed=0, stream=config.stream)
    check_compatible(config.model, input_shape, train_data)
    if len(val_data.class_names) != len(train_data.class_names):
        raise UsageError(f"dataset {config.dataset}: the validation split has classes "
                         f"{val_data.class_names}, the training split {train_data.class_names}")
    return train_data, val_data


def check_compatible(model_name: str, model_shape: tuple[int, int, int],
                     data: ImageData | StreamedData) -> None:
    """A dataset whose channel count differs from the model's is an error before training starts;
    a different image size is resized per batch (seed 003: resize MNIST to 32×32 for LeNet-5)."""
    if data.shape[0] != model_shape[0]:
        raise ShapeError(
            f"model {model_name} expects {format_shape(model_shape)} input; dataset {data.name} "
            f"gives {format_shape(data.shape)}"
        )


# --- batch sources: what the loop and evaluate draw batches from -------------------------------


class _Source:
    """Shared batching logic: a per-epoch permutation from the seed, sharded across ranks."""

    labels: torch.Tensor

    def __len__(self) -> int:
        return int(self.labels.shape[0])

    def steps(self, batch_size: int, world: int) -> int:
        """Full batches per rank (the remainder is dropped; it differs each epoch)."""
        per_rank = len(self) // world
        return max(1, per_rank // batch_size)

    def epoch_order(self, seed: int, epoch: int) -> torch.Tensor:
        # A permutation drawn from (seed, epoch) alone: every rank draws the same one, and a resumed
        # run draws the same one as the uninterrupted run, without saving any data-loader state.
        g = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
        return torch.randperm(len(self), generator=g)

    def shard(self, seed: int, epoch: int, rank: int, world: int) -> torch.Tensor:
        order = self.epoch_order(seed, epoch)
        per_rank = len(self) // world
        return order[: per_rank * world][rank::world]

    @staticmethod
    def eval_range(n: int, rank: int, world: int) -> range:
        return range(n * rank // world, n * (rank + 1) // world)


class MemorySource(_Source):
    """A split held as one uint8 tensor on the device; batches are index slices."""

    def __init__(self, data: ImageData, device: torch.device) -> None:
        self.images = data.images.to(device, non_blocking=True)
        self.labels = data.labels.to(device, non_blocking=True)
        self.device = device

    def batches(self, seed: int, epoch: int, batch_size: int, rank: int, world: int,
                steps: int, start: int = 0) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """Batches ``start`` to ``steps - 1`` of the epoch (a mid-epoch resume starts later)."""
        mine = self.shard(seed, epoch, rank, world).to(self.device)
        for i in range(start, steps):
            index = mine[i * batch_size:(i + 1) * batch_size]
            yield self.images[index], self.labels[index]

    def eval_batches(self, batch_size: int, rank: int, world: int
                     ) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        span = self.eval_range(len(self), rank, world)
        for i in range(span.start, span.stop, batch_size):
            j = min(i + batch_size, span.stop)
            yield self.images[i:j], self.labels[i:j]

    def sample(self, k: int) -> torch.Tensor:
        return self.images[:k]


class StreamSource(_Source):
    """A folder too large for memory: DataLoader workers decode and resize, batches arrive as uint8
    in pinned memory and are copied without blocking; the device does the rest as for MemorySource."""

    def __init__(self, data: StreamedData, device: torch.device, workers: int) -> None:
        self.dataset = data.dataset
        self.labels = data.labels
        self.device = device
        self.workers = workers

    def _load(self, batches: list[list[int]]) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        loader = torch.utils.data.DataLoader(
            self.dataset, batch_sampler=batches, num_workers=self.workers,
            pin_memory=self.device.type == "cuda", prefetch_factor=4 if self.workers else None)
        for images, labels in loader:
            yield (images.to(self.device, non_blocking=True),
                   labels.to(self.device, non_blocking=True))

    def batches(self, seed: int, epoch: int, batch_size: int, rank: int, world: int,
                steps: int, start: int = 0) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        mine = self.shard(seed, epoch, rank, world).tolist()
        return self._load([mine[i * batch_size:(i + 1) * batch_size]
                           for i in range(start, steps)])

    def eval_batches(self, batch_size: int, rank: int, world: int
                     ) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        span = self.eval_range(len(self), rank, world)
        return self._load([list(range(i, min(i + batch_size, span.stop)))
                           for i in range(span.start, span.stop, batch_size)])

    def sample(self, k: int) -> torch.Tensor:
        return torch.stack([self.dataset[i][0] for i in range(min(k, len(self)))]).to(self.device)


Source = MemorySource | StreamSource


def make_source(data: ImageData | StreamedData, device: torch.device, workers: int = 2) -> Source:
    if isinstance(data, StreamedData):
        return StreamSource(data, device, workers)
    return MemorySource(data, device)
