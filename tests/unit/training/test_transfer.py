"""Seed 004's VGG16 transfer learning: --weights (a torchvision state_dict file, head replaced) and
--freeze-features (only the classifier trains); inputs resized to 224×224."""

from __future__ import annotations

from pathlib import Path
from typing import Callable

import torch

from cnnctl.training.checkpoint import load_checkpoint
from cnnctl.training.config import from_flags
from cnnctl.training.loop import train


def test_vgg16_weights_and_frozen_features(tmp_path: Path, image_folder: Callable[..., Path]) -> None:
    from torchvision.models import vgg16

    torch.manual_seed(5)
    imagenet = vgg16(weights=None).state_dict()  # stands in for vgg16-397923af.pth (1000 classes)
    torch.save(imagenet, tmp_path / "vgg16.pth")
    folder = image_folder(size=48, per_class={"train": 3, "test": 1})  # resized to 224 on decode
    config = from_flags("vgg16", dataset=f"folder:{folder}", weights=str(tmp_path / "vgg16.pth"),
                        freeze_features=True, epochs=1, batch_size=2, max_steps_per_epoch=1,
                        momentum=0.0, eval_batch_size=2, val_fraction=0.34, progress=False,
                        plot=False, out=str(tmp_path / "run"))
    train(config)
    trained = load_checkpoint(tmp_path / "run" / "last.pt")
    state = trained["state_dict"]
    assert trained["input_shape"] == [3, 224, 224]
    assert state["classifier.6.weight"].shape == (2, 4096)  # head replaced for the 2 classes
    for key, value in imagenet.items():
        if key.startswith("features."):
            assert torch.equal(state[key], value), key  # frozen
    assert not torch.equal(state["classifier.0.weight"], imagenet["classifier.0.weight"])
