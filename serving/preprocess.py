"""Raw images → the model's input tensor, as the manifest's ImageSpec says.

A request may send the model input as a BYTES tensor of encoded PNG/JPEG images (shape [n] or
[n, 1]) instead of the float tensor; the server decodes them with PIL, converts to grayscale or RGB,
resizes to the model's size, scales to [0, 1] and normalises with the manifest's mean/std. This is
blocking work: the servicer runs it in a thread, and the result joins the same batch queue as the
tensor requests.
"""

from __future__ import annotations

import io
import struct

import numpy as np

from cnnctl.errors import UsageError
from cnnctl.export.manifest import ImageSpec


def split_bytes_tensor(raw: bytes, input_name: str) -> list[bytes]:
    """Decode KServe's raw BYTES layout: each element is a 4-byte little-endian length + bytes."""
    items = []
    offset = 0
    while offset < len(raw):
        if offset + 4 > len(raw):
            raise UsageError(f"input '{input_name}': BYTES raw contents end inside an element's "
                             f"4-byte length prefix (offset {offset} of {len(raw)} bytes)")
        (size,) = struct.unpack_from("<I", raw, offset)
        offset += 4
        if offset + size > len(raw):
            raise UsageError(f"input '{input_name}': BYTES element {len(items)} claims {size} bytes "
                             f"but only {len(raw) - offset} remain")
        items.append(raw[offset:offset + size])
        offset += size
    return items


def decode_images(images: list[bytes], spec: ImageSpec, input_name: str) -> np.ndarray:
    """Blocking: encoded images → float32 (n, C, H, W), normalised as the model was trained."""
    from PIL import Image, UnidentifiedImageError

    mode = "L" if spec.channels == 1 else "RGB"
    mean = np.asarray(spec.mean, dtype=np.float32).reshape(-1, 1, 1)
    std = np.asarray(spec.std, dtype=np.float32).reshape(-1, 1, 1)
    out = np.empty((len(images), spec.channels, spec.height, spec.width), dtype=np.float32)
    for i, data in enumerate(images):
        try:
            with Image.open(io.BytesIO(data)) as img:
                if img.format not in ("PNG", "JPEG"):
                    raise UsageError(f"input '{input_name}': element {i} is a {img.format} image; "
                                     f"allowed: PNG, JPEG")
                img = img.convert(mode)
                if img.size != (spec.width, spec.height):
                    img = img.resize((spec.width, spec.height), Image.Resampling.BILINEAR)
                pixels = np.asarray(img, dtype=np.float32) / 255.0
        except (UnidentifiedImageError, OSError, ValueError) as exc:
            # PIL's own message for an unknown format names a memory address: keep ours stable.
            reason = "unrecognised format" if isinstance(exc, UnidentifiedImageError) else str(exc)
            raise UsageError(f"input '{input_name}': element {i} ({len(data)} bytes) is not a "
                             f"decodable PNG or JPEG image ({reason})") from None
        chw = pixels[None] if pixels.ndim == 2 else pixels.transpose(2, 0, 1)
        out[i] = (chw - mean) / std
    return out
