"""export/image.py: images → a model's input tensor, as an ImageSpec says; without torch."""

from __future__ import annotations

import io
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from cnnctl.errors import UsageError
from cnnctl.export.image import as_uint8, to_tensor
from cnnctl.export.manifest import ImageSpec

GRAY = ImageSpec(channels=1, height=4, width=6, mean=[0.5], std=[0.25])
RGB = ImageSpec(channels=3, height=4, width=6, mean=[0.0, 0.5, 1.0], std=[1.0, 0.5, 0.25])


def _encoded(img: Image.Image, format: str) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=format)
    return buf.getvalue()


def test_scaled_and_normalised_per_channel() -> None:
    pixels = np.zeros((4, 6, 3), np.uint8)
    pixels[..., 0], pixels[..., 1], pixels[..., 2] = 255, 51, 0
    png = _encoded(Image.fromarray(pixels, "RGB"), "PNG")
    for image in (png, pixels, pixels.astype(np.float32) / 255, Image.fromarray(pixels, "RGB")):
        x = to_tensor([image], RGB)
        assert x.dtype == np.float32 and x.shape == (1, 3, 4, 6)
        np.testing.assert_allclose(x[0, :, 0, 0], [(1 - 0) / 1, (0.2 - 0.5) / 0.5, (0 - 1) / 0.25],
                                   rtol=1e-6)
    gray = to_tensor([_encoded(Image.new("L", (6, 4), 255), "JPEG")], GRAY)
    np.testing.assert_allclose(gray, 2.0, rtol=1e-6)  # (1 - 0.5) / 0.25


def test_converted_and_resized_bilinearly_as_pil_does() -> None:
    rng = np.random.default_rng(0)
    rgb = rng.integers(0, 256, (9, 11, 3), dtype=np.uint8)
    x = to_tensor([rgb], GRAY)
    expected = Image.fromarray(rgb, "RGB").convert("L").resize((6, 4), Image.Resampling.BILINEAR)
    np.testing.assert_array_equal(x[0, 0], (np.asarray(expected, np.float32) / 255.0 - 0.5) / 0.25)
    assert to_tensor([rgb[:, :, :1], rgb], RGB).shape == (2, 3, 4, 6)  # gray to RGB as well


def test_only_png_and_jpeg_and_the_bad_one_is_named() -> None:
    gif = _encoded(Image.new("L", (6, 4)), "GIF")
    with pytest.raises(UsageError, match=r"^image 1 \(\d+ bytes\) is not a PNG or JPEG image; "
                                         r"allowed: PNG, JPEG$"):
        to_tensor([_encoded(Image.new("L", (6, 4)), "PNG"), gif], GRAY)
    with pytest.raises(UsageError, match=r"^input 'x': element 0 \(3 bytes\) is not a PNG or "
                                         r"JPEG image; allowed: PNG, JPEG$"):
        to_tensor([b"abc"], GRAY, "input 'x': element")
    truncated = _encoded(Image.new("L", (60, 40), 7), "PNG")[:-30]
    with pytest.raises(UsageError, match=r"^image 0 \(\d+ bytes\) is not a decodable PNG or "):
        to_tensor([truncated], GRAY)


def test_float_pixels_round_to_uint8() -> None:
    assert as_uint8(np.array([0.0, 0.5, 1.0, 1.5])).tolist() == [0, 128, 255, 255]
    u8 = np.array([3], np.uint8)
    assert as_uint8(u8) is u8


def test_imports_neither_torch_nor_training() -> None:
    code = ("import sys; sys.modules['torch'] = None; import cnnctl.export.image; "
            "assert not [m for m in sys.modules if m.startswith('cnnctl.training')]")
    subprocess.run([sys.executable, "-c", code], check=True)
