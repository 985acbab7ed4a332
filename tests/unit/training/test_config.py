from __future__ import annotations

import pytest

from cnnctl.errors import UnknownNameError, UsageError
from cnnctl.training.config import TrainConfig, from_flags
from cnnctl.training.models import get_spec


def test_unset_flags_take_the_model_recipe() -> None:
    config = from_flags("cifar-net-v3", dataset="cifar10")
    recipe = get_spec("cifar-net-v3").recipe
    assert (config.epochs, config.batch_size, config.lr, config.schedule) == \
        (recipe.epochs, recipe.batch_size, recipe.lr, "multistep")
    assert config.milestones == (8, 16, 24, 32) and config.gamma == 0.5
    assert config.augment == "crop-flip" and config.crop_padding == (0, 2, 3, 4)


def test_seed_002_recipe_is_reachable_by_flags() -> None:
    config = from_flags("resnet-mini", optimizer="sgd", lr=0.01, momentum=0.5, batch_size=64,
                        schedule="none", weight_decay=0.0, nesterov=False)
    assert (config.lr, config.momentum, config.batch_size, config.schedule) == \
        (0.01, 0.5, 64, "none")


def test_config_round_trips_through_a_dict() -> None:
    config = from_flags("cifar-net-v3", dataset="folder:/x", seed=3)
    assert TrainConfig.from_dict(config.to_dict()) == config


@pytest.mark.parametrize("flags, message", [
    ({"optimizer": "rmsprop"}, "unknown optimizer 'rmsprop'; known: sgd, adam, adamw"),
    ({"schedule": "step"}, "unknown schedule 'step'; known: onecycle, cosine, multistep, none"),
    ({"epochs": 0}, "--epochs must be a positive integer, got 0"),
    ({"batch_size": -4}, "--batch-size must be a positive integer, got -4"),
    ({"batch_size": 3, "nproc": 2}, "--batch-size 3 (global) must be divisible by --nproc 2"),
    ({"lr": 0.0}, "--lr must be positive, got 0.0"),
    ({"dataset": "imagenet"}, "unknown dataset 'imagenet'"),
    ({"device": "tpu"}, "unknown device 'tpu'; known: auto, cpu, cuda"),
    ({"label_smoothing": 1.0}, "--label-smoothing must be in [0, 1)"),
    ({"freeze_features": True}, "--freeze-features applies to vgg16 only"),
])
def test_bad_values_are_named(flags: dict, message: str) -> None:
    with pytest.raises(UsageError) as info:
        from_flags("resnet-mini", **flags)
    assert message in str(info.value)


def test_unknown_model_lists_the_zoo() -> None:
    with pytest.raises(UnknownNameError, match="unknown model 'lenet6'; known: lenet-classic"):
        from_flags("lenet6")


def test_min_steps_applies_only_without_explicit_epochs() -> None:
    assert from_flags("resnet-mini").min_steps == 250
    assert from_flags("resnet-mini", epochs=2).min_steps == 0
