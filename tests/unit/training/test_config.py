from __future__ import annotations

import pytest

from cnnctl.errors import UnknownNameError, UsageError
from cnnctl.training.config import RANGES, RESUMABLE, TrainConfig, from_flags
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
    ({"epochs": 0}, "epochs: 0 is not an integer in the range x>=1"),
    ({"epochs": 2.5}, "epochs: 2.5 is not an integer in the range x>=1"),
    ({"batch_size": -4}, "batch_size: -4 is not an integer in the range x>=1"),
    ({"batch_size": 3, "nproc": 2}, "--batch-size 3 (global) must be divisible by --nproc 2"),
    ({"lr": 0.0}, "lr: 0.0 is not in the range x>0"),
    ({"dataset": "imagenet"}, "unknown dataset 'imagenet'"),
    ({"device": "tpu"}, "unknown device 'tpu'; known: auto, cpu, cuda"),
    ({"label_smoothing": 1.0}, "label_smoothing: 1.0 is not in the range 0<=x<1"),
    ({"gamma": 0.0}, "gamma: 0.0 is not in the range 0<x<=1"),
    ({"freeze_features": True}, "--freeze-features applies to vgg16 only"),
])
def test_bad_values_are_named(flags: dict, message: str) -> None:
    with pytest.raises(UsageError) as info:
        from_flags("resnet-mini", **flags)
    assert message in str(info.value)


def test_a_config_built_directly_is_validated_too() -> None:
    """API users who skip from_flags get the same checks: a TrainConfig cannot exist invalid."""
    with pytest.raises(UsageError, match="momentum: 1.0 is not in the range 0<=x<1"):
        TrainConfig(momentum=1.0)
    with pytest.raises(UsageError, match="workers: -1"):
        TrainConfig().replace(workers=-1)
    assert TrainConfig(eval_batch_size=None, max_steps_per_epoch=None).eval_batch_size is None


@pytest.mark.parametrize("name", sorted(RANGES))
def test_click_types_and_validate_allow_the_same_values(name: str) -> None:
    """The CLI's click types are built from the same RANGES table validate checks: a value on
    each side of each bound is accepted or refused alike, and the range reads as click writes it."""
    import click

    from cnnctl.training.commands import _range

    allowed = RANGES[name]
    kind = _range(name)
    for value in (allowed.min - 1, allowed.min, allowed.min + 0.5, allowed.max or 10, 1.5, 7):
        if allowed.integer and value != int(value):
            continue
        value = int(value) if allowed.integer else float(value)
        try:
            kind.convert(value, None, None)
            click_ok = True
        except click.BadParameter as exc:
            click_ok = False
            assert f"not in the range {allowed}" in exc.format_message()
        assert click_ok == (value in allowed), (name, value)


def test_resume_keeps_what_it_computes_and_takes_how_it_runs() -> None:
    saved = from_flags("convnet", epochs=5, lr=0.02, workers=2, plot=True)
    current = TrainConfig(epochs=1, lr=0.5, workers=0, plot=False, progress=False)
    resumed = saved.resumed_with(current, out="runs/x")
    assert (resumed.epochs, resumed.lr, resumed.model) == (5, 0.02, "convnet")
    assert resumed.out == "runs/x"
    assert all(getattr(resumed, name) == getattr(current, name) for name in RESUMABLE)


def test_unknown_model_lists_the_zoo() -> None:
    with pytest.raises(UnknownNameError, match="unknown model 'lenet6'; known: lenet-classic"):
        from_flags("lenet6")


def test_min_steps_applies_only_without_explicit_epochs() -> None:
    assert from_flags("resnet-mini").min_steps == 900
    assert from_flags("resnet-mini", epochs=2).min_steps == 0
