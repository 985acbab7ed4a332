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
from collections.abc import Sequence
from typing import TYPE_CHECKING, Union

import numpy as np

from cnnctl.errors import UsageError
from cnnctl.export.manifest import ImageSpec

if TYPE_CHECKING:
    from PIL import Image as PILImage

__all__ = ["FORMATS", "ImageSpec", "Pixels", "as_uint8", "to_tensor"]

# Encoded bytes, H×W×C pixels (uint8 0-255 or float 0-1, C = 1, 3 or 4), or a PIL image.
Pixels = Union[bytes, np.ndarray, "PILImage.Image"]
FORMATS = ("PNG", "JPEG")


def to_tensor(images: Sequence[Pixels], spec: ImageSpec, what: str = "image") -> np.ndarray:
    """Blocking: the images → float32 (n, C, H, W), normalised as the model was trained.
    ``what``: how an error names the images (``f"{what} {i}"``)."""
    mean = np.asarray(spec.mean, dtype=np.float32).reshape(-1, 1, 1)
    std = np.asarray(spec.std, dtype=np.float32).reshape(-1, 1, 1)
    out = np.empty((len(images), spec.channels, spec.height, spec.width), dtype=np.float32)
    for i, image in enumerate(images):
        pixels = _scaled(image, spec, f"{what} {i}")
        chw = pixels[None] if pixels.ndim == 2 else pixels.transpose(2, 0, 1)
        out[i] = (chw - mean) / std
    return out


def as_uint8(pixels: np.ndarray) -> np.ndarray:
    """uint8 pixels as they are; float pixels in [0, 1] rounded to 0-255."""
    if pixels.dtype == np.uint8:
        return pixels
    return np.clip(np.rint(pixels * 255.0), 0, 255).astype(np.uint8)


def _scaled(image: Pixels, spec: ImageSpec, what: str) -> np.ndarray:
    """One image at the model's size and colour, as float32 pixels in [0, 1] (H×W or H×W×C)."""
    from PIL import Image

    if isinstance(image, np.ndarray) and image.shape == (spec.height, spec.width, spec.channels):
        # Already the model's size and colour: no PIL round trip (and no float→uint8 rounding).
        if image.dtype == np.uint8:
            return image.astype(np.float32) / 255.0
        return image.astype(np.float32, copy=False)
    if isinstance(image, bytes):
        img = _decode(image, what)
    elif isinstance(image, np.ndarray):
        u8 = as_uint8(image)
        img = Image.fromarray(u8[:, :, 0] if u8.shape[2] == 1 else u8)
    else:
        img = image
    img = img.convert("L" if spec.channels == 1 else "RGB")
    if img.size != (spec.width, spec.height):
        img = img.resize((spec.width, spec.height), Image.Resampling.BILINEAR)
    return np.asarray(img, dtype=np.float32) / 255.0


def _decode(data: bytes, what: str) -> PILImage.Image:
    from PIL import Image, UnidentifiedImageError

    try:
        img = Image.open(io.BytesIO(data))
        if img.format not in FORMATS:
            raise UsageError(f"{what} is a {img.format} image; allowed: {', '.join(FORMATS)}")
        img.load()
    except (UnidentifiedImageError, OSError, ValueError) as exc:
        # PIL's own message for an unknown format names a memory address: keep ours stable.
        reason = "unrecognised format" if isinstance(exc, UnidentifiedImageError) else str(exc)
        raise UsageError(f"{what} ({len(data)} bytes) is not a decodable PNG or JPEG image "
                         f"({reason})") from None
    return img
