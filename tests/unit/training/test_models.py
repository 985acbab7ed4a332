"""The zoo's models against the seeds' own layer order."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from cnnctl.training.models import ResNetMini


def _seed_002_forward(model: ResNetMini, x: torch.Tensor) -> torch.Tensor:
    """002_3b448b9890e3532f.txt's ``Net.forward`` as written: relu, then max-pool."""
    x = F.max_pool2d(F.relu(model.conv1(x)), 2)
    x = model.res_block_1(x)
    x = F.max_pool2d(F.relu(model.conv2(x)), 2)
    x = model.res_block_2(x)
    return model.fc1(x.view(x.shape[0], -1))


def test_resnet_mini_pools_before_relu_with_the_seeds_outputs_and_gradients() -> None:
    torch.manual_seed(0)
    model = ResNetMini()
    x = torch.randn(32, 1, 28, 28)
    labels = torch.randint(0, 10, (32,))

    ours = model(x)
    F.cross_entropy(ours, labels).backward()
    ours_grads = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    seeds = _seed_002_forward(model, x)
    F.cross_entropy(seeds, labels).backward()

    assert torch.equal(ours, seeds)
    for mine, theirs in zip(ours_grads, (p.grad for p in model.parameters())):
        torch.testing.assert_close(mine, theirs, rtol=1e-5, atol=1e-7)
