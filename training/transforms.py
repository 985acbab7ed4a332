"""Per-batch transforms on the device: the only place pixels turn into model inputs.

Training, evaluation and export verification all go through ``prepare_batch`` so that a model sees
exactly the same numbers wherever it runs (uint8 → [0, 1] → resize → normalise). Augmentation works
on whole uint8 batches with index arithmetic, never per item in Python (airbench's approach).
"""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F


def prepare_batch(
    images_uint8: torch.Tensor,
    mean: Sequence[float],
    std: Sequence[float],
    size: tuple[int, int] | None = None,
    dtype: torch.dtype = torch.float32,
    *,
    channels_last: bool = False,
) -> torch.Tensor:
    """uint8 N×C×H×W (any device) → float N×C×size normalised with ``mean``/``std`` (per channel, on
    pixels scaled to [0, 1]). ``size`` (H, W) resizes bilinearly when it differs from the images'
    (seed 003 feeds 28×28 MNIST to the 32×32 LeNet-5 this way). ``channels_last``: in the NHWC
    layout of a model converted to it."""
    if images_uint8.dim() != 4:
        raise ValueError(f"expected N×C×H×W images, got shape {tuple(images_uint8.shape)}")
    x = images_uint8.to(dtype).div_(255.0)
    if size is not None and tuple(x.shape[-2:]) != tuple(size):
        x = F.interpolate(x, size=tuple(size), mode="bilinear", align_corners=False, antialias=False)
    channels = x.shape[1]
    m = torch.as_tensor(list(mean), dtype=dtype, device=x.device)
    s = torch.as_tensor(list(std), dtype=dtype, device=x.device)
    if m.numel() == 1 and channels > 1:
        m, s = m.expand(channels), s.expand(channels)
    x = x.sub_(m.view(1, -1, 1, 1)).div_(s.view(1, -1, 1, 1))
    return x.contiguous(memory_format=torch.channels_last) if channels_last else x


def crop_flip(
    images: torch.Tensor,
    padding: tuple[int, int, int, int],
    generator: torch.Generator,
    flip: bool = True,
) -> torch.Tensor:
    """torchvision's ``RandomCrop(size, padding=(left, top, right, bottom))`` + ``RandomHorizontalFlip``
    for a whole batch at once: zero-pad, then gather each image's window by index arithmetic.

    The random numbers come from ``generator`` (a CPU generator, seeded per epoch by the loop), so the
    result is the same on every device and after a resume."""
    n, c, h, w = images.shape
    left, top, right, bottom = padding
    padded = F.pad(images, (left, right, top, bottom))
    dy = torch.randint(0, top + bottom + 1, (n,), generator=generator).to(images.device)
    dx = torch.randint(0, left + right + 1, (n,), generator=generator).to(images.device)
    rows = torch.arange(h, device=images.device).view(1, h) + dy.view(n, 1)  # n×h
    cols = torch.arange(w, device=images.device).view(1, w) + dx.view(n, 1)  # n×w
    if flip:
        flipped = torch.rand(n, generator=generator).to(images.device) < 0.5
        cols = torch.where(flipped.view(n, 1), cols.flip(1), cols)
    batch = torch.arange(n, device=images.device).view(n, 1, 1, 1)
    chan = torch.arange(c, device=images.device).view(1, c, 1, 1)
    return padded[batch, chan, rows.view(n, 1, h, 1), cols.view(n, 1, 1, w)]
