"""Checkpoints to export, built once per session.

lenet5 gets 200 SGD steps on the embedded mnist-sample (a few seconds, ~93 % test accuracy), so its
real-image accuracy means something and int8 calibration has real activations to measure; the rest
of the zoo is exported untrained (random init), which is all an exporter check needs.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

from cnnctl.training.checkpoint import make_checkpoint, save_checkpoint
from cnnctl.training.data import load_split
from cnnctl.training.models import build_model, get_spec
from cnnctl.training.transforms import prepare_batch



def make_test_checkpoint(name: str, steps: int = 0, seed: int = 0) -> dict[str, Any]:
    """A cnnctl checkpoint for zoo model ``name``; ``steps`` SGD steps on mnist-sample (1-channel
    models only). 3-channel models name cifar10, which is not available offline, on purpose: the
    verifier must say so rather than skip silently."""
    torch.manual_seed(seed)
    spec = get_spec(name)
    c, h, w = spec.input_shape
    model = build_model(name, num_classes=10, check_inputs=False)
    if c == 1:
        dataset, mean, std = "mnist-sample", [0.1307], [0.3081]
    else:
        dataset, mean, std = "cifar10", [0.4914, 0.4822, 0.4465], [0.2470, 0.2435, 0.2616]
    if steps:
        data = load_split("mnist-sample", "train")
        opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
        g = torch.Generator().manual_seed(seed)
        model.train()
        for _ in range(steps):
            idx = torch.randint(0, len(data), (64,), generator=g)
            x = prepare_batch(data.images[idx], mean, std, (h, w))
            loss = torch.nn.functional.cross_entropy(model(x), data.labels[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
    model.eval()
    return make_checkpoint(
        model=model, model_name=name, num_classes=10, in_channels=c, input_shape=(c, h, w),
        mean=mean, std=std, class_names=[str(i) for i in range(10)], dataset=dataset,
        epoch=1 if steps else 0, metrics={"steps": steps},
    )


@pytest.fixture(scope="session")
def checkpoint_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("checkpoints")


@pytest.fixture(scope="session")
def trained_checkpoints(checkpoint_dir: Path) -> dict[str, Path]:
    """lenet5 after 200 SGD steps on mnist-sample."""
    return {"lenet5": save_checkpoint(make_test_checkpoint("lenet5", steps=200),
                                      checkpoint_dir / "lenet5.pt")}
