from __future__ import annotations

import torch

from cnnctl.training.transforms import crop_flip, prepare_batch


def test_prepare_batch_normalises_per_channel() -> None:
    images = torch.tensor([0, 255], dtype=torch.uint8).view(2, 1, 1, 1).expand(2, 3, 2, 2)
    out = prepare_batch(images.contiguous(), (0.5, 0.0, 1.0), (0.5, 1.0, 0.25))
    assert out.dtype == torch.float32
    assert torch.allclose(out[0, :, 0, 0], torch.tensor([-1.0, 0.0, -4.0]))
    assert torch.allclose(out[1, :, 0, 0], torch.tensor([1.0, 1.0, 0.0]))


def test_prepare_batch_matches_totensor_normalize() -> None:
    from torchvision import transforms

    g = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (4, 1, 28, 28), dtype=torch.uint8, generator=g)
    seed_tf = transforms.Compose([transforms.ToTensor(), transforms.Normalize((0.1307,), (0.3081,))])
    expected = torch.stack([seed_tf(img[0].numpy()) for img in images])
    assert torch.allclose(prepare_batch(images, (0.1307,), (0.3081,)), expected, atol=1e-6)


def test_prepare_batch_resizes_to_the_model_input() -> None:
    images = torch.full((3, 1, 28, 28), 128, dtype=torch.uint8)
    out = prepare_batch(images, (0.0,), (1.0,), size=(32, 32))
    assert out.shape == (3, 1, 32, 32)
    assert torch.allclose(out, torch.full_like(out, 128 / 255))


def test_crop_flip_is_a_shifted_window_of_the_padded_image() -> None:
    g = torch.Generator().manual_seed(1)
    images = torch.arange(2 * 3 * 8 * 8, dtype=torch.int64).view(2, 3, 8, 8).to(torch.uint8)
    out = crop_flip(images, (1, 2, 3, 4), torch.Generator().manual_seed(1), flip=False)
    padded = torch.nn.functional.pad(images, (1, 3, 2, 4))  # left, right, top, bottom
    dy = torch.randint(0, 7, (2,), generator=g)
    dx = torch.randint(0, 5, (2,), generator=g)
    for i in range(2):
        assert torch.equal(out[i], padded[i, :, dy[i]:dy[i] + 8, dx[i]:dx[i] + 8])


def test_crop_flip_flips_about_half_and_is_reproducible() -> None:
    images = torch.randint(0, 256, (400, 3, 4, 4), dtype=torch.uint8)
    out = crop_flip(images, (0, 0, 0, 0), torch.Generator().manual_seed(3))
    flipped = [bool(torch.equal(o, i.flip(-1))) and not torch.equal(o, i) for o, i in zip(out, images)]
    assert 120 < sum(flipped) < 280
    again = crop_flip(images, (0, 0, 0, 0), torch.Generator().manual_seed(3))
    assert torch.equal(out, again)
