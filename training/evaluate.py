"""Accuracy, loss and per-class accuracy of a model on a split: the loop's validation each epoch,
``cnnctl evaluate``, and the demo all call ``evaluate``."""

from __future__ import annotations

from typing import Any, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from cnnctl.training.data import ImageData, Source, StreamedData, make_source
from cnnctl.training.device import autocast, sum_across_ranks
from cnnctl.training.models import get_spec
from cnnctl.training.transforms import prepare_batch


def evaluate(
    model: nn.Module,
    data: ImageData | StreamedData | Source,
    mean: Sequence[float],
    std: Sequence[float],
    device: str | torch.device = "cpu",
    batch_size: int = 1024,
    *,
    size: tuple[int, int] | None = None,
    class_names: Sequence[str] | None = None,
    channels_last: bool = False,
    autocast_dtype: torch.dtype | None = None,
    rank: int = 0,
    world: int = 1,
) -> dict[str, Any]:
    """Accuracy, mean loss and per-class accuracy of ``model`` on ``data``.

    Images go through ``prepare_batch`` with the given normalisation and are resized to ``size``
    (H, W; default: the model's input hook would reject a wrong size, so pass the checkpoint's).
    Under DDP each rank evaluates its share and the sums are all-reduced."""
    device = torch.device(device)
    source = data if isinstance(data, Source) else make_source(data, device)
    names = list(class_names if class_names is not None else getattr(data, "class_names", []))
    num_classes = len(names) if names else 0
    was_training = model.training
    model.eval()
    loss_sum = torch.zeros((), dtype=torch.float64, device=device)
    per_class_n = torch.zeros(max(num_classes, 1), dtype=torch.float64, device=device)
    per_class_ok = torch.zeros_like(per_class_n)
    with torch.inference_mode():
        for images, labels in source.eval_batches(batch_size, rank, world):
            x = prepare_batch(images.to(device, non_blocking=True), mean, std, size,
                              channels_last=channels_last)
            labels = labels.to(device, non_blocking=True)
            with autocast(device, autocast_dtype):
                logits = model(x)
            logits = logits.float()
            if num_classes == 0:
                num_classes = logits.shape[1]
                per_class_n = torch.zeros(num_classes, dtype=torch.float64, device=device)
                per_class_ok = torch.zeros_like(per_class_n)
            loss_sum += F.cross_entropy(logits, labels, reduction="sum").double()
            ok = (logits.argmax(1) == labels).double()
            per_class_n += torch.bincount(labels, minlength=num_classes).double()[:num_classes]
            per_class_ok += torch.bincount(labels, weights=ok, minlength=num_classes)[:num_classes]
    packed = sum_across_ranks(torch.cat([loss_sum.view(1), per_class_n, per_class_ok]), world)
    loss_sum, per_class_n, per_class_ok = (packed[0], packed[1:1 + num_classes],
                                           packed[1 + num_classes:])
    model.train(was_training)
    n = int(per_class_n.sum().item())
    correct = int(per_class_ok.sum().item())
    names = names or [str(i) for i in range(num_classes)]
    per_class = {
        names[c]: (float(per_class_ok[c] / per_class_n[c]) if per_class_n[c] > 0 else None)
        for c in range(num_classes)
    }
    return {
        "accuracy": correct / n if n else 0.0,
        "loss": float(loss_sum.item()) / n if n else 0.0,
        "n": n,
        "correct": correct,
        "per_class": per_class,
    }


def default_eval_batch(model_name: str) -> int:
    """1024 images of 28×28, scaled down by pixel count (vgg16 at 224×224: 16)."""
    c, h, w = get_spec(model_name).input_shape
    return max(8, min(1024, int(1024 * 28 * 28 / (h * w))))
