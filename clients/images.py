"""What ``predict`` accepts as images, turned into what goes on the wire.

An image is pixels, never a model-input tensor: a file path, encoded PNG/JPEG bytes, a PIL image,
or a numpy array of uint8 (0-255) or float (0-1) pixels laid out H×W, H×W×C, C×H×W, or a batch
N×C×H×W / N×H×W×C. (A tensor that is already normalised goes through ``Client.infer`` instead.)

Two ways to send them (``Client(preprocess=...)``):

- ``"server"`` (default): encoded images in a BYTES input; the server decodes, resizes and
  normalises them with the manifest's ImageSpec. Files and bytes travel as they are (no decode on
  the client at all); arrays and PIL images are PNG-encoded (lossless).
- ``"client"``: decoded, resized and normalised here into float32 N×C×H×W by the server's own
  code (cnnctl.export.image.to_tensor), using the ImageSpec the server publishes in ModelConfig.

Imports numpy and PIL only (PIL lazily): ``cnnctl predict`` must start without torch.
"""

from __future__ import annotations

import io
import os
import struct
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, Union

import numpy as np

from cnnctl.errors import ShapeError, UsageError
from cnnctl.export.image import as_uint8

if TYPE_CHECKING:
    from PIL import Image as PILImage

ImageLike = Union[str, os.PathLike, bytes, bytearray, memoryview, np.ndarray, "PILImage.Image"]
# One image after expansion: encoded bytes (as read or sent) or an H×W×C pixel array.
Item = Union[bytes, np.ndarray]

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")
_KINDS = "a file path, PNG/JPEG bytes, a PIL image, or a uint8/float numpy array"


def _is_pil(obj: object) -> bool:
    return type(obj).__module__.startswith("PIL.")


def _to_hwc(array: np.ndarray, what: str) -> np.ndarray:
    """One image's pixels as H×W×C (C = 1, 3 or 4)."""
    if array.ndim == 2:
        return array[:, :, None]
    if array.ndim == 3:
        if array.shape[-1] in (1, 3, 4) and array.shape[0] not in (1, 3):
            return array
        if array.shape[0] in (1, 3):
            return array.transpose(1, 2, 0)
        if array.shape[-1] in (1, 3, 4):
            return array
    raise ShapeError(f"{what}: array of shape {list(array.shape)} is not an image; allowed: H×W, "
                     f"H×W×C or C×H×W with C in 1, 3 (or 4 last), or a batch N×C×H×W / N×H×W×C")


def _check_dtype(array: np.ndarray, what: str) -> np.ndarray:
    if array.dtype == np.uint8:
        return array
    if np.issubdtype(array.dtype, np.floating):
        if array.size and (float(array.min()) < 0.0 or float(array.max()) > 1.0):
            raise UsageError(f"{what}: float pixels must lie in [0, 1], got "
                             f"[{float(array.min()):.3g}, {float(array.max()):.3g}]; send a "
                             f"normalised tensor with Client.infer() instead")
        return array.astype(np.float32, copy=False)
    raise UsageError(f"{what}: array dtype {array.dtype} is not supported; allowed: uint8 "
                     f"(0-255) or float (0-1) pixels")


def expand(images: ImageLike | Sequence[ImageLike]) -> list[Item]:
    """One image, a sequence of them, or an N×… batch array → one item per image, in order."""
    single = isinstance(images, (str, os.PathLike, bytes, bytearray, memoryview, np.ndarray)) \
        or _is_pil(images)
    sources: Iterable[Any] = [images] if single else images  # type: ignore[assignment]
    items: list[Item] = []
    for i, obj in enumerate(sources):
        what = f"image {i}"
        if isinstance(obj, (bytes, bytearray, memoryview)):
            items.append(bytes(obj))
        elif isinstance(obj, (str, os.PathLike)):
            path = Path(obj)
            try:
                items.append(path.read_bytes())
            except FileNotFoundError:
                raise UsageError(f"{what}: file {str(path)!r} does not exist") from None
            except OSError as exc:
                raise UsageError(f"{what}: cannot read {str(path)!r} ({exc.strerror})") from None
        elif isinstance(obj, np.ndarray):
            array = _check_dtype(obj, what)
            if array.ndim == 4:
                batch = array if array.shape[1] in (1, 3) else array.transpose(0, 3, 1, 2)
                items.extend(_to_hwc(img, f"{what}[{j}]") for j, img in enumerate(batch))
            else:
                items.append(_to_hwc(array, what))
        elif _is_pil(obj):
            items.append(_to_hwc(np.asarray(_pil_pixels(obj)), what))
        else:
            raise UsageError(f"{what}: {type(obj).__name__} is not an image; allowed: {_KINDS}")
    if not items:
        raise UsageError("no images given; pass at least one")
    return items


def _pil_pixels(img: PILImage.Image) -> PILImage.Image:
    return img if img.mode in ("L", "RGB", "RGBA") else img.convert("RGB")


def encode_png(pixels: np.ndarray) -> bytes:
    """H×W×C pixels → PNG bytes (lossless; compression level 1: speed over size)."""
    from PIL import Image

    u8 = as_uint8(pixels)
    img = Image.fromarray(u8[:, :, 0] if u8.shape[2] == 1 else u8)
    buf = io.BytesIO()
    img.save(buf, format="PNG", compress_level=1)
    return buf.getvalue()


def to_encoded(item: Item) -> bytes:
    return item if isinstance(item, bytes) else encode_png(item)


def pack_bytes(elements: Sequence[bytes]) -> bytes:
    """KServe v2's raw BYTES layout: each element prefixed by its 4-byte little-endian length."""
    return b"".join(struct.pack("<I", len(e)) + e for e in elements)


def list_images(folder: str | os.PathLike[str]) -> list[Path]:
    """The PNG/JPEG files directly in ``folder``, sorted by name."""
    root = Path(folder)
    if not root.is_dir():
        raise UsageError(f"image folder {str(root)!r} does not exist or is not a directory")
    files = sorted(p for p in root.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
    if not files:
        raise UsageError(f"no images in {str(root)!r}; looked for {', '.join(IMAGE_SUFFIXES)}")
    return files
