"""Images → a model's input tensor, as the manifest's ImageSpec says: the one implementation.

Decode (PNG or JPEG bytes; arrays and PIL images are taken as they are), convert to grayscale or
RGB, resize bilinearly to the model's size, scale to [0, 1] and normalise with the spec's mean/std.
The server applies it to a BYTES input of encoded images, the client (``preprocess="client"``) to
the images it sends as tensors, so both give the same tensor for the same image. Training decodes
its dataset once into uint8 and normalises whole batches on the device instead
(docs/architecture.md says why).

Imports numpy, and PIL only when it decodes: serving and clients load it without torch.
"""

from __future__ import annotations

import io
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Union

import numpy as np

from cnnctl.errors import DeadlineExceededError, UsageError
from cnnctl.export.manifest import ImageSpec

if TYPE_CHECKING:
    from PIL import Image as PILImage

__all__ = ["FORMATS", "ImageSpec", "PixelLimits", "Pixels", "as_uint8", "to_tensor"]

# Encoded bytes, H×W×C pixels (uint8 0-255 or float 0-1, C = 1, 3 or 4), or a PIL image.
Pixels = Union[bytes, np.ndarray, "PILImage.Image"]
FORMATS = ("PNG", "JPEG")


@dataclass(frozen=True)
class PixelLimits:
    """How many pixels encoded images may declare, checked from their headers before any is
    decoded: a few hundred bytes of PNG can declare gigabytes of pixels."""

    per_image: int = 4096 * 4096
    per_request: int = 8192 * 8192


def to_tensor(images: Sequence[Pixels], spec: ImageSpec, what: str = "image",
              limits: PixelLimits | None = None,
              expired: Callable[[], bool] | None = None) -> np.ndarray:
    """Blocking: the images → float32 (n, C, H, W), normalised as the model was trained.
    ``what``: how an error names the images (``f"{what} {i}"``). ``limits``: refuse encoded
    images that declare more pixels (None: no limit). ``expired``: checked before each image is
    decoded; when it says True the rest are not (DeadlineExceededError)."""
    opened = [_open(image, f"{what} {i}", limits) if isinstance(image, (bytes, memoryview))
              else image for i, image in enumerate(images)]
    if limits is not None:
        _check_pixels(opened, limits, what)
    mean = np.asarray(spec.mean, dtype=np.float32).reshape(-1, 1, 1)
    std = np.asarray(spec.std, dtype=np.float32).reshape(-1, 1, 1)
    out = np.empty((len(images), spec.channels, spec.height, spec.width), dtype=np.float32)
    for i, image in enumerate(opened):
        if expired is not None and expired():
            raise DeadlineExceededError(f"deadline passed while decoding {what}s; {i} of "
                                        f"{len(opened)} decoded, the rest not")
        pixels = _scaled(image, spec, f"{what} {i}")
        chw = pixels[None] if pixels.ndim == 2 else pixels.transpose(2, 0, 1)
        out[i] = (chw - mean) / std
    return out


def as_uint8(pixels: np.ndarray) -> np.ndarray:
    """uint8 pixels as they are; float pixels in [0, 1] rounded to 0-255."""
    if pixels.dtype == np.uint8:
        return pixels
    return np.clip(np.rint(pixels * 255.0), 0, 255).astype(np.uint8)


def _scaled(image: np.ndarray | PILImage.Image, spec: ImageSpec, what: str) -> np.ndarray:
    """One image at the model's size and colour, as float32 pixels in [0, 1] (H×W or H×W×C)."""
    from PIL import Image

    if isinstance(image, np.ndarray) and image.shape == (spec.height, spec.width, spec.channels):
        # Already the model's size and colour: no PIL round trip (and no float→uint8 rounding).
        if image.dtype == np.uint8:
            return image.astype(np.float32) / 255.0
        return image.astype(np.float32, copy=False)
    if isinstance(image, np.ndarray):
        u8 = as_uint8(image)
        img = Image.fromarray(u8[:, :, 0] if u8.shape[2] == 1 else u8)
    elif isinstance(image, _Encoded):
        img = image.decode(spec)
    else:
        img = image
    img = img.convert("L" if spec.channels == 1 else "RGB")
    if img.size != (spec.width, spec.height):
        img = img.resize((spec.width, spec.height), Image.Resampling.BILINEAR)
    return np.asarray(img, dtype=np.float32) / 255.0


@dataclass(eq=False)
class _Encoded:
    """A PNG or JPEG whose header has been read; its pixels are decoded by ``decode``."""

    img: PILImage.Image
    nbytes: int
    what: str

    @property
    def pixels(self) -> int:
        return self.img.size[0] * self.img.size[1]

    def decode(self, spec: ImageSpec) -> PILImage.Image:
        img = self.img
        if img.format == "JPEG":
            # Decode at the smallest DCT scale (1/8 to 1/1) still at least the model's size:
            # a large photo then costs a fraction of its full decode, in time and memory.
            img.draft("L" if spec.channels == 1 else None, (spec.width, spec.height))
        try:
            img.load()
        except Exception as exc:  # noqa: BLE001 - any decoder failure is the image's fault
            raise _undecodable(self.nbytes, self.what, exc) from None
        return img


def _open(data: bytes | memoryview, what: str, limits: PixelLimits | None) -> _Encoded:
    """Read the image's header only: its format (PNG or JPEG only) and size."""
    from PIL import Image

    try:
        img = Image.open(io.BytesIO(data), formats=FORMATS)
    except Image.DecompressionBombError:  # Pillow's own limit, checked as it reads the header
        limit = (f"at most {limits.per_image} per image (--max-image-pixels)" if limits
                 else "Pillow's decompression-bomb limit")
        raise UsageError(f"{what} declares more than {2 * Image.MAX_IMAGE_PIXELS} pixels; "
                         f"{limit}") from None
    except Exception as exc:  # noqa: BLE001 - PIL raises many kinds for bad input
        raise _undecodable(len(data), what, exc) from None
    return _Encoded(img, len(data), what)


def _undecodable(nbytes: int, what: str, exc: BaseException) -> UsageError:
    from PIL import UnidentifiedImageError

    # PIL's own message for an unknown format names a memory address: keep ours stable.
    if isinstance(exc, UnidentifiedImageError):
        return UsageError(f"{what} ({nbytes} bytes) is not a {' or '.join(FORMATS)} image; "
                          f"allowed: {', '.join(FORMATS)}")
    reason = f"{type(exc).__name__}: {exc}"[:200]
    return UsageError(f"{what} ({nbytes} bytes) is not a decodable PNG or JPEG image ({reason})")


def _check_pixels(images: Sequence[object], limits: PixelLimits, what: str) -> None:
    total = 0
    for i, image in enumerate(images):
        if not isinstance(image, _Encoded):
            continue
        w, h = image.img.size
        if w * h > limits.per_image:
            raise UsageError(f"{what} {i} declares {w}x{h} = {w * h} pixels; at most "
                             f"{limits.per_image} per image (--max-image-pixels)")
        total += w * h
    if total > limits.per_request:
        raise UsageError(f"{what}s declare {total} pixels in all; at most {limits.per_request} "
                         f"per request (--max-request-pixels)")
