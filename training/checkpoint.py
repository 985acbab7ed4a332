"""The one checkpoint format.

A checkpoint is a plain dict of tensors, numbers, strings, lists and dicts, so that it loads with
``torch.load(weights_only=True)``: no pickled classes, no code runs on load. It carries everything
needed to rebuild the model (name, kwargs, input shape, normalisation, class names) and to resume
training (optimizer, scheduler, scaler, epoch, RNG states, config). State-dict keys are fixed up
once, here (``module.`` from DataParallel/DDP, ``_orig_mod.`` from torch.compile, the seeds' own
aliases), so no reader ever does it by hand.
"""

from __future__ import annotations

import os
import pickle
import shutil
from pathlib import Path
from typing import Any, Mapping

import torch
from torch import nn

from cnnctl.errors import CheckpointError, ShapeError
from cnnctl.files import replacing, write_atomic_with
from cnnctl.training.models import build_model, get_spec

FORMAT = "cnnctl.checkpoint"
FORMAT_VERSION = 1
_PREFIXES = ("module.", "_orig_mod.")


def clean_state_dict(state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """CPU copies with wrapper prefixes removed (DDP's ``module.``, torch.compile's ``_orig_mod.``)."""
    out: dict[str, torch.Tensor] = {}
    for key, value in state_dict.items():
        changed = True
        while changed:
            changed = False
            for prefix in _PREFIXES:
                if key.startswith(prefix):
                    key = key[len(prefix):]
                    changed = True
        out[key] = value.detach().to("cpu", copy=True) if isinstance(value, torch.Tensor) else value
    return out


def unwrap(model: nn.Module) -> nn.Module:
    """The plain module inside DDP / torch.compile wrappers."""
    while True:
        if hasattr(model, "module") and isinstance(model.module, nn.Module):
            model = model.module
        elif hasattr(model, "_orig_mod") and isinstance(model._orig_mod, nn.Module):
            model = model._orig_mod
        else:
            return model


def make_checkpoint(
    *,
    model: nn.Module,
    model_name: str,
    num_classes: int,
    in_channels: int,
    input_shape: tuple[int, int, int],
    mean: list[float],
    std: list[float],
    class_names: list[str],
    dataset: str,
    epoch: int = 0,
    metrics: dict[str, Any] | None = None,
    config: dict[str, Any] | None = None,
    optimizer: dict[str, Any] | None = None,
    scheduler: dict[str, Any] | None = None,
    scaler: dict[str, Any] | None = None,
    rng: dict[str, Any] | None = None,
    extra: dict[str, Any] | None = None,
) -> dict[str, Any]:
    return {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "model": model_name,
        "model_kwargs": {"num_classes": int(num_classes), "in_channels": int(in_channels)},
        "input_shape": [int(s) for s in input_shape],
        "normalization": {"mean": [float(m) for m in mean], "std": [float(s) for s in std]},
        "class_names": [str(c) for c in class_names],
        "dataset": dataset,
        "state_dict": clean_state_dict(unwrap(model).state_dict()),
        "optimizer": optimizer,
        "scheduler": scheduler,
        "scaler": scaler,
        "epoch": int(epoch),
        "metrics": dict(metrics or {}),
        "config": dict(config or {}),
        "rng": rng,
        **(extra or {}),
    }


def save_checkpoint(checkpoint: Mapping[str, Any], path: str | os.PathLike[str]) -> Path:
    """Write atomically (cnnctl/files.py): a crash mid-write leaves the previous file as it was."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    return write_atomic_with(path, lambda f: torch.save(dict(checkpoint), f))


def link_or_copy(source: str | os.PathLike[str], target: str | os.PathLike[str]) -> Path:
    """Make ``target`` hold the same bytes as ``source``, atomically: a hard link (no second copy
    of a 500 MB vgg16 checkpoint), or a copy where the filesystem has no hard links. ``source``
    being replaced later (os.replace) leaves ``target`` intact."""
    try:
        with replacing(target) as tmp:
            os.link(source, tmp)
    except OSError:
        with open(source, "rb") as src:
            write_atomic_with(target, lambda f: shutil.copyfileobj(src, f))
    return Path(target)


def _torch_load(path: str | os.PathLike[str], map_location: Any) -> Any:
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint {str(path)!r} does not exist")
    try:
        return torch.load(path, weights_only=True, map_location=map_location)
    except pickle.UnpicklingError as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else "unpickling error"
        raise CheckpointError(
            f"{path}: refused: the file holds a pickled Python object, not plain tensors "
            f"({first[:160]}). Save a state_dict (torch.save(model.state_dict(), path)) instead"
        ) from None
    except (RuntimeError, EOFError, OSError, ValueError) as exc:
        raise CheckpointError(f"{path}: not a readable PyTorch file ({exc})") from None


def load_checkpoint(path: str | os.PathLike[str], map_location: Any = "cpu") -> dict[str, Any]:
    """Load a cnnctl checkpoint; tensors land on ``map_location`` (CPU by default, so a GPU-trained
    checkpoint loads on a CPU-only machine)."""
    ckpt = _torch_load(path, map_location)
    if not isinstance(ckpt, dict) or ckpt.get("format") != FORMAT:
        hint = ""
        if isinstance(ckpt, dict) and ckpt and all(isinstance(v, torch.Tensor) for v in ckpt.values()):
            hint = " It looks like a bare state_dict: import it with --model NAME --state-dict PATH."
        raise CheckpointError(f"{path}: not a cnnctl checkpoint.{hint}")
    version = ckpt.get("format_version")
    if version != FORMAT_VERSION:
        raise CheckpointError(
            f"{path}: checkpoint format_version {version!r} is not supported; this cnnctl reads "
            f"{FORMAT_VERSION}"
        )
    for key in ("model", "model_kwargs", "input_shape", "normalization", "class_names", "state_dict"):
        if key not in ckpt:
            raise CheckpointError(f"{path}: checkpoint is missing {key!r}")
    return ckpt


def model_from_checkpoint(
    ckpt: Mapping[str, Any], device: str | torch.device = "cpu", check_inputs: bool = True
) -> nn.Module:
    """Rebuild the model a checkpoint describes, weights loaded, in eval mode."""
    model = build_model(ckpt["model"], check_inputs=check_inputs, **ckpt["model_kwargs"])
    load_weights(model, ckpt["state_dict"], ckpt["model"])
    return model.to(device).eval()


def apply_aliases(model_name: str, state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    aliases = get_spec(model_name).key_aliases
    out: dict[str, torch.Tensor] = {}
    for key, value in clean_state_dict(state_dict).items():
        for theirs, ours in aliases:
            if key.startswith(theirs):
                key = ours + key[len(theirs):]
                break
        out[key] = value
    return out


def load_weights(model: nn.Module, state_dict: Mapping[str, torch.Tensor], model_name: str) -> None:
    """Strict load with a readable error listing what does not fit."""
    state_dict = apply_aliases(model_name, state_dict)
    own = model.state_dict()
    missing = [k for k in own if k not in state_dict]
    unexpected = [k for k in state_dict if k not in own]
    wrong = [
        f"{k} {tuple(state_dict[k].shape)} vs {tuple(v.shape)}"
        for k, v in own.items()
        if k in state_dict and tuple(state_dict[k].shape) != tuple(v.shape)
    ]
    if missing or unexpected or wrong:
        parts = []
        if missing:
            parts.append(f"missing {', '.join(missing[:5])}{'…' if len(missing) > 5 else ''}")
        if unexpected:
            parts.append(f"unexpected {', '.join(unexpected[:5])}{'…' if len(unexpected) > 5 else ''}")
        if wrong:
            parts.append(f"wrong shape {', '.join(wrong[:3])}")
        raise CheckpointError(f"weights do not fit model {model_name}: {'; '.join(parts)}")
    model.load_state_dict(state_dict)


def _infer_num_classes(state_dict: Mapping[str, torch.Tensor]) -> int:
    """The output size of the last 2-D weight (the classifier head)."""
    weights = [v for k, v in state_dict.items() if k.endswith("weight") and v.dim() == 2]
    if not weights:
        raise CheckpointError("cannot infer the number of classes: no Linear weight in the state_dict")
    return int(weights[-1].shape[0])


def _infer_in_channels(state_dict: Mapping[str, torch.Tensor]) -> int:
    convs = [v for k, v in state_dict.items() if k.endswith("weight") and v.dim() == 4]
    if not convs:
        raise CheckpointError("cannot infer input channels: no Conv2d weight in the state_dict")
    return int(convs[0].shape[1])


def import_state_dict(
    path: str | os.PathLike[str],
    model_name: str,
    class_names: list[str] | None = None,
    mean: list[float] | None = None,
    std: list[float] | None = None,
    dataset: str = "",
) -> dict[str, Any]:
    """Turn a bare ``torch.save(model.state_dict(), path)`` file (a seed script's) into a checkpoint.

    The number of classes and input channels come from the weights; normalisation defaults to what
    the model's seed trained with."""
    raw = _torch_load(path, "cpu")
    if isinstance(raw, dict) and raw.get("format") == FORMAT:
        return load_checkpoint(path)
    if not isinstance(raw, dict) or not all(isinstance(v, torch.Tensor) for v in raw.values()):
        raise CheckpointError(f"{path}: not a state_dict (a dict of parameter name → tensor)")
    spec = get_spec(model_name)
    state_dict = apply_aliases(model_name, raw)
    num_classes = _infer_num_classes(state_dict)
    in_channels = _infer_in_channels(state_dict)
    model = build_model(model_name, num_classes=num_classes, in_channels=in_channels)
    load_weights(model, state_dict, model_name)
    if mean is None or std is None:
        seed_mean, seed_std = spec.seed_normalization or ((0.0,), (1.0,))
        mean = list(seed_mean) * (in_channels if len(seed_mean) == 1 else 1)
        std = list(seed_std) * (in_channels if len(seed_std) == 1 else 1)
    if class_names is None:
        class_names = [str(i) for i in range(num_classes)]
    if len(class_names) != num_classes:
        raise ShapeError(
            f"{len(class_names)} class names given but the weights have {num_classes} outputs"
        )
    return make_checkpoint(
        model=model,
        model_name=model_name,
        num_classes=num_classes,
        in_channels=in_channels,
        input_shape=(in_channels, *spec.input_shape[1:]),
        mean=mean,
        std=std,
        class_names=class_names,
        dataset=dataset,
        config={"imported_from": str(path)},
    )


def load_pretrained(model: nn.Module, path: str | os.PathLike[str], model_name: str) -> list[str]:
    """Load a torchvision-style pretrained state_dict (e.g. VGG16 ImageNet weights saved to a file),
    skipping only tensors whose shape differs (the replaced classifier head). Returns skipped keys."""
    raw = _torch_load(path, "cpu")
    if isinstance(raw, dict) and raw.get("format") == FORMAT:
        raw = raw["state_dict"]
    if not isinstance(raw, dict):
        raise CheckpointError(f"{path}: not a state_dict")
    state_dict = apply_aliases(model_name, raw)
    own = model.state_dict()
    unknown = [k for k in state_dict if k not in own]
    if unknown:
        raise CheckpointError(
            f"{path}: weights do not fit model {model_name}: unexpected {', '.join(unknown[:5])}"
        )
    absent = [k for k in own if k not in state_dict]
    if absent:
        raise CheckpointError(
            f"{path}: weights do not fit model {model_name}: missing {', '.join(absent[:5])}"
        )
    skipped = [k for k, v in state_dict.items() if tuple(v.shape) != tuple(own[k].shape)]
    model.load_state_dict({k: v for k, v in state_dict.items() if k not in skipped}, strict=False)
    return skipped
