"""Training configuration: one frozen dataclass, defaults in one place, and what each setting
allows (choices, datasets, numeric ranges), checked once when a TrainConfig is made.

Imports neither torch nor click at import time (the CLI builds its click types from these
tables); making a TrainConfig does, since validation looks the model up in models.py.
A flag left unset takes the model's default recipe (``ModelSpec.recipe`` in models.py), so
``cnnctl train --model cifar-net-v3`` runs seed 004's recipe while every value stays overridable
(``--optimizer sgd --lr 0.01 --momentum 0.5 --schedule none --batch-size 64`` is seed 002's own).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, fields
from typing import Any

from cnnctl.errors import UnknownNameError, UsageError, known

OPTIMIZERS = ("sgd", "adam", "adamw")
SCHEDULES = ("onecycle", "cosine", "multistep", "none")
AUGMENTS = ("none", "crop", "crop-flip")  # crop: random shifts only (digits must not flip)
DEVICES = ("auto", "cpu", "cuda")
AMP_DTYPES = ("bf16", "fp16")
STREAM_MODES = ("auto", "memory", "stream")
SPLITS = ("train", "val", "test")


@dataclass(frozen=True)
class DatasetInfo:
    name: str
    summary: str
    shape: tuple[int, int, int] | None  # None: depends on the files (folder datasets)
    num_classes: int | None
    needs_download: bool


# The datasets a config may name; data.py loads them.
DATASETS: dict[str, DatasetInfo] = {
    "mnist-sample": DatasetInfo("mnist-sample", "embedded slice of real MNIST (12,000 train / "
                                "2,000 test), offline, the default", (1, 28, 28), 10, False),
    "mnist": DatasetInfo("mnist", "MNIST digits via torchvision (60k/10k)", (1, 28, 28), 10, True),
    "fashion-mnist": DatasetInfo("fashion-mnist", "Fashion-MNIST via torchvision (60k/10k)",
                                 (1, 28, 28), 10, True),
    "cifar10": DatasetInfo("cifar10", "CIFAR-10 via torchvision (50k/10k)", (3, 32, 32), 10, True),
    "folder:PATH": DatasetInfo("folder:PATH", "class-per-subfolder images; PATH/train + PATH/val "
                               "(or test), or one folder split by --val-fraction", None, None, False),
}


def check_dataset_name(name: str) -> None:
    if name.startswith("folder:"):
        if not name[len("folder:"):]:
            raise UnknownNameError("dataset 'folder:' needs a path, e.g. folder:./ants_bees")
        return
    if name not in DATASETS:
        raise UnknownNameError(f"unknown dataset {name!r}; known: {known(DATASETS)}")


@dataclass(frozen=True)
class Range:
    """The allowed values of a numeric setting, written as click writes ranges (``0<=x<1``). The
    CLI turns each into a click IntRange/FloatRange; ``validate`` checks API users' configs."""

    min: float
    max: float | None = None
    min_open: bool = False
    max_open: bool = False
    integer: bool = False

    def __contains__(self, value: object) -> bool:
        if not isinstance(value, int if self.integer else (int, float)) or isinstance(value, bool):
            return False
        if value < self.min or (self.min_open and value == self.min):
            return False
        return self.max is None or value < self.max or (not self.max_open and value == self.max)

    def check(self, name: str, value: object) -> None:
        """A UsageError naming the setting, its value and this range, unless the value is in it."""
        if value not in self:
            kind = "an integer " if self.integer else ""
            raise UsageError(f"{name}: {value!r} is not {kind}in the range {self}")

    def __str__(self) -> str:
        if self.max is None:
            return f"x{'>' if self.min_open else '>='}{self.min:g}"
        return (f"{self.min:g}{'<' if self.min_open else '<='}x"
                f"{'<' if self.max_open else '<='}{self.max:g}")


# Every numeric setting a user can get out of range; None (where a field allows it) means "default".
RANGES: dict[str, Range] = {
    "epochs": Range(1, integer=True),
    "min_steps": Range(0, integer=True),
    "batch_size": Range(1, integer=True),
    "eval_batch_size": Range(1, integer=True),
    "max_steps_per_epoch": Range(1, integer=True),
    "checkpoint_every_steps": Range(1, integer=True),
    "nproc": Range(1, integer=True),
    "workers": Range(0, integer=True),
    "lr": Range(0, min_open=True),
    "momentum": Range(0, 1, max_open=True),
    "weight_decay": Range(0),
    "label_smoothing": Range(0, 1, max_open=True),
    "gamma": Range(0, 1, min_open=True),
    "val_fraction": Range(0, 1, min_open=True, max_open=True),
}

# What a resumed run may change: how it runs, never what it computes.
RESUMABLE = ("device", "progress", "tensorboard", "plot", "workers", "checkpoint_every_steps",
             "cpu_split")


@dataclass(frozen=True)
class TrainConfig:
    model: str = "resnet-mini"
    dataset: str = "mnist-sample"
    data_dir: str | None = None  # None: the user cache dir (data.default_data_dir)
    out: str | None = None  # run directory; None: runs/<model>-<timestamp>
    # The recipe (None in from_flags means "the model's default").
    epochs: int = 3
    min_steps: int = 0  # recipe's floor on total steps when --epochs was not given (0: none)
    batch_size: int = 128  # global: split evenly across processes under DDP
    lr: float = 0.01  # peak learning rate
    optimizer: str = "sgd"
    schedule: str = "onecycle"
    momentum: float = 0.9  # SGD momentum; Adam's beta1 stays at its default
    nesterov: bool = True  # SGD only, and only with momentum > 0
    weight_decay: float = 5e-4
    label_smoothing: float = 0.0
    milestones: tuple[int, ...] = ()  # epochs, multistep schedule
    gamma: float = 0.1
    augment: str = "none"
    crop_padding: tuple[int, int, int, int] = (4, 4, 4, 4)  # left, top, right, bottom (crop-flip)
    val_fraction: float = 0.1  # held out of the training split for model selection
    seed: int = 0
    # Starting weights.
    state_dict: str | None = None  # a seed's bare state_dict (keys fixed up by checkpoint.py)
    weights: str | None = None  # torchvision-style pretrained file (vgg16); head replaced
    freeze_features: bool = False  # train only the classifier head
    # Where and how it runs.
    device: str = "auto"
    amp: bool | None = None  # None: on for CUDA, off on CPU (bf16 autocast measured slower there)
    amp_dtype: str = "bf16"  # on CUDA without bf16 support, fp16 + GradScaler is used instead
    channels_last: bool | None = None  # None: on (measured faster on CPU for resnet-mini, and on CUDA)
    compile: bool = False
    cpu_split: bool | None = None  # None: split CPU steps across the cores where exact (split.py)
    eval_batch_size: int | None = None  # None: 1024 at 28×28, fewer for larger inputs
    max_steps_per_epoch: int | None = None  # cap for smoke tests and quick checks
    checkpoint_every_steps: int | None = None  # also write last.pt mid-epoch every N steps
    stream: str = "auto"  # folder datasets: decode into memory, or stream through workers
    workers: int = 2  # DataLoader worker processes when streaming
    tensorboard: bool = False
    plot: bool = True  # curves.png in the run dir when matplotlib is installed
    progress: bool = True
    nproc: int = 1  # processes the launcher starts (torchrun); the loop reads WORLD_SIZE instead

    def __post_init__(self) -> None:
        validate(self)  # a TrainConfig is valid from the moment it exists: checked here, once

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["milestones"] = list(self.milestones)
        d["crop_padding"] = list(self.crop_padding)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "TrainConfig":
        names = {f.name for f in fields(cls)}
        kwargs = {k: v for k, v in d.items() if k in names}
        for key in ("milestones", "crop_padding"):
            if key in kwargs and kwargs[key] is not None:
                kwargs[key] = tuple(int(v) for v in kwargs[key])
        return cls(**kwargs)

    def replace(self, **changes: Any) -> "TrainConfig":
        return dataclasses.replace(self, **changes)

    def resumed_with(self, current: "TrainConfig", out: str) -> "TrainConfig":
        """This (saved) configuration, with ``current``'s RESUMABLE settings, writing to ``out``."""
        return self.replace(out=out, **{name: getattr(current, name) for name in RESUMABLE})


_RECIPE_FIELDS = ("epochs", "min_steps", "batch_size", "lr", "optimizer", "schedule", "momentum",
                  "weight_decay", "label_smoothing", "milestones", "gamma", "augment",
                  "val_fraction")


def from_flags(model: str, **flags: Any) -> TrainConfig:
    """A config for ``model``: flags that are None take the model's recipe, then TrainConfig's
    defaults. Like every TrainConfig, it is validated before any data is read."""
    from cnnctl.training.models import get_spec

    spec = get_spec(model)
    values: dict[str, Any] = {"model": model}
    for name in _RECIPE_FIELDS:
        values[name] = getattr(spec.recipe, name)
    if getattr(spec.recipe, "crop_padding", None) is not None:
        values["crop_padding"] = spec.recipe.crop_padding
    values.update({k: v for k, v in flags.items() if v is not None})
    if flags.get("epochs") is not None:
        values["min_steps"] = 0  # an explicit --epochs is taken as given
    for key in ("milestones", "crop_padding"):
        if key in values:
            values[key] = tuple(int(v) for v in values[key])
    return TrainConfig(**values)


def _check_choice(what: str, value: str, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        raise UnknownNameError(f"unknown {what} {value!r}; known: {known(allowed)}")


def validate(config: TrainConfig) -> None:
    """Raise a UsageError naming the first bad setting and what is allowed."""
    from cnnctl.training.models import get_spec

    get_spec(config.model)
    check_dataset_name(config.dataset)
    _check_choice("optimizer", config.optimizer, OPTIMIZERS)
    _check_choice("schedule", config.schedule, SCHEDULES)
    _check_choice("augment", config.augment, AUGMENTS)
    _check_choice("device", config.device, DEVICES)
    _check_choice("amp dtype", config.amp_dtype, AMP_DTYPES)
    _check_choice("stream mode", config.stream, STREAM_MODES)
    for name, allowed in RANGES.items():
        value = getattr(config, name)
        if value is None and TrainConfig.__dataclass_fields__[name].default is None:
            continue  # unset: the default applies
        allowed.check(name, value)
    if config.batch_size % config.nproc:  # checked again in each rank against WORLD_SIZE
        raise UsageError(f"--batch-size {config.batch_size} (global) must be divisible by "
                         f"--nproc {config.nproc}")
    if any(p < 0 for p in config.crop_padding) or len(config.crop_padding) != 4:
        raise UsageError(f"crop padding must be 4 non-negative ints, got {config.crop_padding}")
    if config.freeze_features and config.model != "vgg16":
        raise UsageError(f"--freeze-features applies to vgg16 only, not {config.model}")
    if config.weights and config.state_dict:
        raise UsageError("give --weights or --state-dict, not both")
