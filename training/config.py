"""Training configuration: one frozen dataclass, defaults in one place.

A flag left unset takes the model's default recipe (``ModelSpec.recipe`` in models.py), so
``cnnctl train --model cifar-net-v3`` runs seed 004's recipe while every value stays overridable
(``--optimizer sgd --lr 0.01 --momentum 0.5 --schedule none --batch-size 64`` is seed 002's own).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field, fields
from typing import Any

from cnnctl.errors import UnknownNameError, UsageError, known

OPTIMIZERS = ("sgd", "adam", "adamw")
SCHEDULES = ("onecycle", "cosine", "multistep", "none")
AUGMENTS = ("none", "crop", "crop-flip")  # crop: random shifts only (digits must not flip)
DEVICES = ("auto", "cpu", "cuda")
AMP_DTYPES = ("bf16", "fp16")
STREAM_MODES = ("auto", "memory", "stream")


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
    eval_batch_size: int | None = None  # None: 1024 at 28×28, fewer for larger inputs
    max_steps_per_epoch: int | None = None  # cap for smoke tests and quick checks
    stream: str = "auto"  # folder datasets: decode into memory, or stream through workers
    workers: int = 2  # DataLoader worker processes when streaming
    tensorboard: bool = False
    plot: bool = True  # curves.png in the run dir when matplotlib is installed
    progress: bool = True
    nproc: int = 1  # processes the launcher starts (torchrun); the loop reads WORLD_SIZE instead

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


_RECIPE_FIELDS = ("epochs", "min_steps", "batch_size", "lr", "optimizer", "schedule", "momentum",
                  "weight_decay", "label_smoothing", "milestones", "gamma", "augment")


def from_flags(model: str, **flags: Any) -> TrainConfig:
    """A config for ``model``: flags that are None take the model's recipe, then TrainConfig's
    defaults. Validates everything a user can get wrong before any data is read."""
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
    config = TrainConfig(**values)
    validate(config)
    return config


def _check_choice(what: str, value: str, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        raise UnknownNameError(f"unknown {what} {value!r}; known: {known(allowed)}")


def validate(config: TrainConfig) -> None:
    from cnnctl.training.data import check_dataset_name
    from cnnctl.training.models import get_spec

    get_spec(config.model)
    check_dataset_name(config.dataset)
    _check_choice("optimizer", config.optimizer, OPTIMIZERS)
    _check_choice("schedule", config.schedule, SCHEDULES)
    _check_choice("augment", config.augment, AUGMENTS)
    _check_choice("device", config.device, DEVICES)
    _check_choice("amp dtype", config.amp_dtype, AMP_DTYPES)
    _check_choice("stream mode", config.stream, STREAM_MODES)
    for name in ("epochs", "batch_size", "eval_batch_size", "nproc"):
        value = getattr(config, name)
        if name == "eval_batch_size" and value is None:
            continue
        if not isinstance(value, int) or value <= 0:
            raise UsageError(f"--{name.replace('_', '-')} must be a positive integer, got {value}")
    if config.batch_size % config.nproc:  # checked again in each rank against WORLD_SIZE
        raise UsageError(f"--batch-size {config.batch_size} (global) must be divisible by "
                         f"--nproc {config.nproc}")
    if config.min_steps < 0:
        raise UsageError(f"min_steps must be ≥ 0, got {config.min_steps}")
    if config.max_steps_per_epoch is not None and config.max_steps_per_epoch <= 0:
        raise UsageError(f"max_steps_per_epoch must be positive, got {config.max_steps_per_epoch}")
    if not config.lr > 0:
        raise UsageError(f"--lr must be positive, got {config.lr}")
    if config.momentum < 0 or config.momentum >= 1:
        raise UsageError(f"--momentum must be in [0, 1), got {config.momentum}")
    if config.weight_decay < 0:
        raise UsageError(f"--weight-decay must be ≥ 0, got {config.weight_decay}")
    if not 0 <= config.label_smoothing < 1:
        raise UsageError(f"--label-smoothing must be in [0, 1), got {config.label_smoothing}")
    if not 0 < config.val_fraction < 1:
        raise UsageError(f"--val-fraction must be between 0 and 1 (exclusive), got {config.val_fraction}")
    if not 0 < config.gamma <= 1:
        raise UsageError(f"gamma must be in (0, 1], got {config.gamma}")
    if config.workers < 0:
        raise UsageError(f"--workers must be ≥ 0, got {config.workers}")
    if any(p < 0 for p in config.crop_padding) or len(config.crop_padding) != 4:
        raise UsageError(f"crop padding must be 4 non-negative ints, got {config.crop_padding}")
    if config.freeze_features and config.model != "vgg16":
        raise UsageError(f"--freeze-features applies to vgg16 only, not {config.model}")
    if config.weights and config.state_dict:
        raise UsageError("give --weights or --state-dict, not both")
