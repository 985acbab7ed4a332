"""The model zoo: every network of the seed tutorials, registered by name.

Layer names follow the seeds so that a state_dict saved by a seed script loads by naming its model
(``--model resnet-mini --state-dict F``). Where a seed hard-codes 10 classes or 1 input channel, the
model takes ``num_classes`` / ``in_channels`` instead; where a layer size depends on the input size
(the flattened features), the seed's input size is the only one the model accepts.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch import nn

from cnnctl.errors import ShapeError, UnknownNameError, known


@dataclass(frozen=True)
class Recipe:
    """A default training recipe: what ``cnnctl train --model M`` uses when no flag overrides it."""

    epochs: int = 3
    # With --epochs unset, a small dataset gets more epochs until the run has at least this many
    # optimizer steps (the embedded sample: 183 steps of 64 images an epoch).
    min_steps: int = 0
    batch_size: int = 128
    lr: float = 0.01  # peak learning rate
    optimizer: str = "sgd"  # sgd | adam | adamw
    schedule: str = "onecycle"  # onecycle | cosine | multistep | none
    momentum: float = 0.9
    weight_decay: float = 5e-4
    label_smoothing: float = 0.0
    milestones: tuple[int, ...] = ()  # epochs, for the multistep schedule
    gamma: float = 0.1  # lr factor at each milestone
    augment: str = "none"  # none | crop-flip (CIFAR-style random crop with padding + h-flip)
    crop_padding: tuple[int, int, int, int] = (4, 4, 4, 4)  # left, top, right, bottom (torchvision order)
    val_fraction: float = 0.1  # share of the training split held out for model selection


@dataclass(frozen=True)
class ModelSpec:
    name: str
    builder: Callable[..., nn.Module]
    input_shape: tuple[int, int, int]  # (channels, height, width) the model expects
    seed: str  # the seed file the definition comes from
    summary: str
    default_dataset: str
    recipe: Recipe = field(default_factory=Recipe)
    # Other names a seed script used for the same parameters: {their prefix: ours}.
    key_aliases: tuple[tuple[str, str], ...] = ()
    fixed_channels: bool = False  # True when the seed's design allows no other input channel count
    # The normalisation the seed trained with ((mean...), (std...)), for importing its state_dicts:
    # 001/002 use Normalize((0.1307,), (0.3081,)); 000, 003 and 004 use ToTensor() alone.
    seed_normalization: tuple[tuple[float, ...], tuple[float, ...]] | None = None


_REGISTRY: dict[str, ModelSpec] = {}


def register(spec: ModelSpec) -> ModelSpec:
    if spec.name in _REGISTRY:
        raise ValueError(f"model {spec.name!r} registered twice")
    _REGISTRY[spec.name] = spec
    return spec


def model_names() -> list[str]:
    return list(_REGISTRY)


def get_spec(name: str) -> ModelSpec:
    try:
        return _REGISTRY[name]
    except KeyError:
        raise UnknownNameError(f"unknown model {name!r}; known: {known(_REGISTRY)}") from None


def format_shape(shape: tuple[int, ...] | list[int]) -> str:
    return "×".join(str(int(s)) for s in shape)


def build_model(
    name: str, num_classes: int = 10, in_channels: int | None = None, check_inputs: bool = True
) -> nn.Module:
    """Build a registered model. With ``check_inputs``, a wrongly sized tensor gets a readable error
    (seed 003 asks what a non-32×32 input does to LeNet-5: a matmul shape error deep inside)."""
    spec = get_spec(name)
    if num_classes < 2:
        raise ShapeError(f"num_classes must be at least 2, got {num_classes}")
    channels = in_channels or spec.input_shape[0]
    if spec.fixed_channels and channels != spec.input_shape[0]:
        raise ShapeError(
            f"model {name} takes {spec.input_shape[0]} input channels only, got {channels}"
        )
    model = spec.builder(num_classes=num_classes, in_channels=channels)
    if check_inputs:
        expected = (channels, *spec.input_shape[1:])
        model.register_forward_pre_hook(_InputCheck(name, expected))
    return model


class _InputCheck:
    """Forward pre-hook that names the expected shape instead of failing in a Linear layer."""

    def __init__(self, name: str, expected: tuple[int, int, int]) -> None:
        self.name = name
        self.expected = expected

    def __call__(self, module: nn.Module, args: tuple[Any, ...]) -> None:
        x = args[0]
        if x.dim() != 4 or tuple(x.shape[1:]) != self.expected:
            got = format_shape(tuple(x.shape))
            raise ShapeError(
                f"model {self.name} expects input of shape N×{format_shape(self.expected)}, "
                f"got {got}"
            )


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


# --- 000: LeNet with Sigmoid activations, 28×28 (Fashion-MNIST) -------------------------------


class LeNetClassic(nn.Module):
    """000_4fdc2e1dbfde85c1.txt: conv 6/16 k5 + Sigmoid + maxpool, fc 256→120→84→classes."""

    def __init__(self, num_classes: int = 10, in_channels: int = 1) -> None:
        super().__init__()
        self.conv = nn.Sequential(
            nn.Conv2d(in_channels, 6, 5),
            nn.Sigmoid(),
            nn.MaxPool2d(2, 2),
            nn.Conv2d(6, 16, 5),
            nn.Sigmoid(),
            nn.MaxPool2d(2, 2),
        )
        self.fc = nn.Sequential(
            nn.Linear(16 * 4 * 4, 120),
            nn.Sigmoid(),
            nn.Linear(120, 84),
            nn.Sigmoid(),
            nn.Linear(84, num_classes),
        )

    def forward(self, img: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.flatten(self.conv(img), 1))


# --- 003: LeNet-5 with ReLU, 32×32 -----------------------------------------------------------


class LeNet5(nn.Module):
    """003_48869fd2ff75c094.txt: conv 6/16 k5 + ReLU + maxpool, fc 400→120→84→classes."""

    def __init__(self, num_classes: int = 10, in_channels: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, 6, 5)
        self.conv2 = nn.Conv2d(6, 16, 5)
        self.fc1 = nn.Linear(16 * 5 * 5, 120)
        self.fc2 = nn.Linear(120, 84)
        self.fc3 = nn.Linear(84, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.max_pool2d(F.relu(self.conv1(x)), (2, 2))
        x = F.max_pool2d(F.relu(self.conv2(x)), 2)
        x = torch.flatten(x, 1)
        x = F.relu(self.fc1(x))
        x = F.relu(self.fc2(x))
        return self.fc3(x)


# --- 001: the simple conv Net, the 3-conv net, the Inception net -----------------------------


class ConvNet(nn.Module):
    """001_a579858227a78759.txt ``Net``: conv 10/20 k5, maxpool, ReLU, linear 320→classes."""

    def __init__(self, num_classes: int = 10, in_channels: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, 10, kernel_size=5)
        self.conv2 = nn.Conv2d(10, 20, kernel_size=5)
        self.pooling = nn.MaxPool2d(2)
        self.linear = nn.Linear(320, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.pooling(self.conv1(x)))
        x = F.relu(self.pooling(self.conv2(x)))
        return self.linear(torch.flatten(x, 1))


class ConvNet3(nn.Module):
    """001_a579858227a78759.txt ``ImageNet`` (作业1): conv 10 k5 / 20 k3 / 30 k2, linear 120."""

    def __init__(self, num_classes: int = 10, in_channels: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, 10, kernel_size=5)
        self.conv2 = nn.Conv2d(10, 20, kernel_size=3)
        self.conv3 = nn.Conv2d(20, 30, kernel_size=2)
        self.pooling = nn.MaxPool2d(2)
        self.linear = nn.Linear(120, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.pooling(F.relu(self.conv1(x)))
        x = self.pooling(F.relu(self.conv2(x)))
        x = self.pooling(F.relu(self.conv3(x)))
        return self.linear(torch.flatten(x, 1))


class InceptionModule(nn.Module):
    """001: four branches (1×1; 1×1→5×5; 1×1→3×3→3×3; avgpool→1×1) concatenated: 88 channels."""

    def __init__(self, in_channels: int) -> None:
        super().__init__()
        self.branch1x1 = nn.Conv2d(in_channels, 16, kernel_size=1)
        self.branch5x5_1 = nn.Conv2d(in_channels, 16, kernel_size=1)
        self.branch5x5_2 = nn.Conv2d(16, 24, kernel_size=5, padding=2)
        self.branch3x3_1 = nn.Conv2d(in_channels, 16, kernel_size=1)
        self.branch3x3_2 = nn.Conv2d(16, 24, kernel_size=3, padding=1)
        self.branch3x3_3 = nn.Conv2d(24, 24, kernel_size=3, padding=1)
        self.branch_pool = nn.Conv2d(in_channels, 24, kernel_size=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        branch1x1 = self.branch1x1(x)
        branch5x5 = self.branch5x5_2(self.branch5x5_1(x))
        branch3x3 = self.branch3x3_3(self.branch3x3_2(self.branch3x3_1(x)))
        branch_pool = self.branch_pool(F.avg_pool2d(x, kernel_size=3, stride=1, padding=1))
        return torch.cat([branch1x1, branch5x5, branch3x3, branch_pool], dim=1)


class InceptionNet(nn.Module):
    """001_a579858227a78759.txt Inception ``Net``: conv1 10 k5, incep1, conv2 88→20 k5, incep2,
    linear 1408→classes."""

    def __init__(self, num_classes: int = 10, in_channels: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, 10, kernel_size=5)
        self.conv2 = nn.Conv2d(88, 20, kernel_size=5)
        self.incep1 = InceptionModule(in_channels=10)
        self.incep2 = InceptionModule(in_channels=20)
        self.pool = nn.MaxPool2d(2)
        self.linear = nn.Linear(1408, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.pool(self.conv1(x)))
        x = self.incep1(x)
        x = F.relu(self.pool(self.conv2(x)))
        x = self.incep2(x)
        return self.linear(torch.flatten(x, 1))


# --- 001/002: the ResidualBlock net ----------------------------------------------------------


class ResidualBlock(nn.Module):
    """001/002: two 3×3 convs keeping the channel count, relu(x + conv2(relu(conv1(x))))."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(channels, channels, kernel_size=3, padding=1)
        self.conv2 = nn.Conv2d(channels, channels, kernel_size=3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.relu(self.conv1(x))
        y = self.conv2(y)
        return F.relu(x + y)


class ResNetMini(nn.Module):
    """002_3b448b9890e3532f.txt ``Net`` (names as in 002; 001 calls the blocks rblock1/rblock2 and
    the head ``linear``, which the checkpoint loader maps). 002 ends in ``log_softmax`` trained with
    ``nll_loss``: that is exactly cross-entropy on these logits, so the model returns logits. 002's
    ``conv2_drop`` is declared but never called, so it is left out (it holds no parameters).

    002 computes ``max_pool2d(relu(conv(x)), 2)``; ``forward`` pools first. Max-pooling and relu
    commute exactly (relu is monotone), so outputs are the seed's bit for bit and gradients equal
    up to float rounding, and relu and its backward touch a quarter of the values
    (tests/unit/training/test_models.py)."""

    def __init__(self, num_classes: int = 10, in_channels: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, 16, kernel_size=5)
        self.conv2 = nn.Conv2d(16, 32, kernel_size=5)
        self.res_block_1 = ResidualBlock(16)
        self.res_block_2 = ResidualBlock(32)
        self.fc1 = nn.Linear(512, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(F.max_pool2d(self.conv1(x), 2))
        x = self.res_block_1(x)
        x = F.relu(F.max_pool2d(self.conv2(x), 2))
        x = self.res_block_2(x)
        return self.fc1(torch.flatten(x, 1))


# --- 004: the CIFAR-10 nets ------------------------------------------------------------------


class CifarNet(nn.Module):
    """004_812b555d09f90945.txt ``CIFAR10_Network``: three conv 5×5 + maxpool, no activations
    (as in the seed), linear 1024→64→classes."""

    def __init__(self, num_classes: int = 10, in_channels: int = 3) -> None:
        super().__init__()
        self.model = nn.Sequential(
            nn.Conv2d(in_channels, 32, kernel_size=5, stride=1, padding=2),
            nn.MaxPool2d(kernel_size=2),
            nn.Conv2d(32, 32, kernel_size=5, stride=1, padding=2),
            nn.MaxPool2d(kernel_size=2),
            nn.Conv2d(32, 64, kernel_size=5, stride=1, padding=2),
            nn.MaxPool2d(kernel_size=2),
            nn.Flatten(),
            nn.Linear(1024, 64),
            nn.Linear(64, num_classes),
        )

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        return self.model(input)


def _v3_stage(cin: int, cout: int) -> list[nn.Module]:
    return [
        nn.Conv2d(cin, cout, kernel_size=3, stride=1, padding=1),
        nn.ReLU(inplace=True),
        nn.BatchNorm2d(cout),
        nn.Conv2d(cout, cout, kernel_size=3, stride=1, padding=1),
        nn.ReLU(inplace=True),
        nn.BatchNorm2d(cout),
        nn.MaxPool2d(kernel_size=2),
    ]


class CifarNetV3(nn.Module):
    """004_812b555d09f90945.txt ``CIFAR10_Net_Simple_v3`` (~88% on CIFAR-10 in the seed): three
    stages of 2×(conv 3×3, ReLU, BatchNorm) + maxpool, Dropout 0.4, linear 2048→64→classes.
    The Sequential's indices match the seed's, so its state_dicts load as they are."""

    def __init__(self, num_classes: int = 10, in_channels: int = 3) -> None:
        super().__init__()
        self.model = nn.Sequential(
            *_v3_stage(in_channels, 32),
            *_v3_stage(32, 64),
            *_v3_stage(64, 128),
            nn.Flatten(),
            nn.Dropout(p=0.4),
            nn.Linear(2048, 64),
            nn.ReLU(inplace=True),
            nn.Dropout(p=0.4),
            nn.Linear(64, num_classes),
        )

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        return self.model(input)


def _vgg16(num_classes: int = 10, in_channels: int = 3) -> nn.Module:
    """004: torchvision's VGG16 with the last classifier Linear replaced for ``num_classes`` (the
    seed's ``vgg.classifier[6] = nn.Linear(4096, 10)``). Pretrained ImageNet weights come from a
    local torchvision state_dict via ``--weights PATH`` (training/checkpoint.py), no hub."""
    from torchvision.models import vgg16

    model = vgg16(weights=None)
    model.classifier[6] = nn.Linear(4096, num_classes)
    return model


_MNIST_RECIPE = Recipe(epochs=3, batch_size=128, lr=0.05, optimizer="sgd", schedule="onecycle")

register(ModelSpec("lenet-classic", LeNetClassic, (1, 28, 28), "000_4fdc2e1dbfde85c1.txt",
                   "LeNet with Sigmoid activations (the seed's Fashion-MNIST net)", "fashion-mnist",
                   Recipe(epochs=5, batch_size=64, lr=0.01, optimizer="adam", schedule="none",
                          weight_decay=0.0)))
register(ModelSpec("lenet5", LeNet5, (1, 32, 32), "003_48869fd2ff75c094.txt",
                   "LeNet-5 with ReLU, 32×32 input", "mnist", _MNIST_RECIPE))
register(ModelSpec("convnet", ConvNet, (1, 28, 28), "001_a579858227a78759.txt",
                   "conv 10/20 k5 + linear 320", "mnist", _MNIST_RECIPE,
                   seed_normalization=((0.1307,), (0.3081,))))
register(ModelSpec("convnet3", ConvNet3, (1, 28, 28), "001_a579858227a78759.txt",
                   "three convs (k5/k3/k2) + linear 120", "mnist", _MNIST_RECIPE,
                   seed_normalization=((0.1307,), (0.3081,))))
register(ModelSpec("inception", InceptionNet, (1, 28, 28), "001_a579858227a78759.txt",
                   "two Inception modules + linear 1408", "mnist", _MNIST_RECIPE,
                   seed_normalization=((0.1307,), (0.3081,))))
register(ModelSpec("resnet-mini", ResNetMini, (1, 28, 28), "002_3b448b9890e3532f.txt",
                   "two ResidualBlocks + linear 512 (99% MNIST in the seed)", "mnist",
                   # One epoch to 99% on the MNIST test set (five seeds); the tuning runs behind
                   # it are in docs/training.md. The floor of 900 steps gives the embedded
                   # sample (183 steps an epoch) 5 epochs.
                   Recipe(epochs=1, batch_size=64, lr=0.05, optimizer="sgd", schedule="onecycle",
                          label_smoothing=0.1,
                          val_fraction=0.02, min_steps=900),
                   key_aliases=(("rblock1.", "res_block_1."), ("rblock2.", "res_block_2."),
                                ("linear.", "fc1.")),
                   seed_normalization=((0.1307,), (0.3081,))))
register(ModelSpec("cifar-net", CifarNet, (3, 32, 32), "004_812b555d09f90945.txt",
                   "CIFAR10_Network: 3 conv 5×5 + maxpool, linear 1024→64", "cifar10",
                   Recipe(epochs=20, batch_size=64, lr=0.01, optimizer="sgd", schedule="none",
                          momentum=0.0, weight_decay=0.0)))
register(ModelSpec("cifar-net-v3", CifarNetV3, (3, 32, 32), "004_812b555d09f90945.txt",
                   "CIFAR10_Net_Simple_v3: BatchNorm, Dropout (≈88% CIFAR-10 in the seed)",
                   "cifar10",
                   Recipe(epochs=40, batch_size=32, lr=0.01, optimizer="sgd", schedule="multistep",
                          momentum=0.9, weight_decay=0.0, milestones=(8, 16, 24, 32), gamma=0.5,
                          # 004: RandomCrop(32, padding=[0, 2, 3, 4]) + RandomHorizontalFlip
                          augment="crop-flip", crop_padding=(0, 2, 3, 4))))
register(ModelSpec("vgg16", _vgg16, (3, 224, 224), "004_812b555d09f90945.txt",
                   "torchvision VGG16, last Linear replaced (transfer learning)", "cifar10",
                   Recipe(epochs=5, batch_size=32, lr=0.001, optimizer="sgd", schedule="cosine"),
                   fixed_channels=True))
