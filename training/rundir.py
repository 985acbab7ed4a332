"""The run directory's files besides the checkpoints (checkpoint.py): config.json, metrics.csv,
curves.png and TensorBoard logs. Only rank 0 writes them, each atomically (cnnctl/files.py), so
a run killed at any moment leaves every file whole.

Metrics arrive as the dicts ``EpochRecord.to_dict`` makes, one per epoch.
"""

from __future__ import annotations

import csv
import io
import json
import logging
import warnings
from datetime import datetime
from pathlib import Path
from typing import Any, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from cnnctl.errors import UsageError
from cnnctl.files import write_atomic, write_atomic_with
from cnnctl.training.transforms import prepare_batch

log = logging.getLogger(__name__)

# TensorBoard tag -> EpochRecord field.
_SCALARS = (("loss/train", "train_loss"), ("loss/val", "val_loss"),
            ("accuracy/train", "train_acc"), ("accuracy/val", "val_acc"), ("lr", "lr"),
            ("images_per_s", "images_per_s"))


def new_run_dir(model: str, root: str | Path = "runs") -> Path:
    """``runs/<model>-<timestamp>``, with a suffix if two runs start in the same second."""
    stamp = datetime.now().strftime("%Y%m%d-%H%M%S")
    base = Path(root) / f"{model}-{stamp}"
    path, i = base, 1
    while path.exists():
        path, i = base.with_name(f"{base.name}-{i}"), i + 1
    return path


def write_config(run_dir: Path, config: dict[str, Any], resolved: dict[str, Any]) -> None:
    """config.json: the configuration as given, plus what it resolved to on this machine."""
    write_atomic(run_dir / "config.json",
                 json.dumps({**config, "resolved": resolved}, indent=2) + "\n")


def write_metrics(run_dir: Path, history: list[dict[str, float]]) -> None:
    """metrics.csv: one row per epoch so far."""
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=list(history[0]))
    writer.writeheader()
    for record in history:
        writer.writerow({k: (f"{v:.6g}" if isinstance(v, float) else v) for k, v in record.items()})
    write_atomic(run_dir / "metrics.csv", buf.getvalue())


def plot_curves(run_dir: Path, history: list[dict[str, float]]) -> Path | None:
    """curves.png: loss and accuracy per epoch; skipped when matplotlib is not installed."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        log.info("matplotlib not installed: no curves.png")
        return None
    epochs = [r["epoch"] for r in history]
    fig, (ax_loss, ax_acc) = plt.subplots(1, 2, figsize=(10, 4))
    ax_loss.plot(epochs, [r["train_loss"] for r in history], "o-", label="train")
    ax_loss.plot(epochs, [r["val_loss"] for r in history], "o-", label="val")
    ax_loss.set(xlabel="epoch", ylabel="loss", title="loss")
    ax_acc.plot(epochs, [100 * r["train_acc"] for r in history], "o-", label="train")
    ax_acc.plot(epochs, [100 * r["val_acc"] for r in history], "o-", label="val")
    ax_acc.set(xlabel="epoch", ylabel="accuracy (%)", title="accuracy")
    for ax in (ax_loss, ax_acc):
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    path = write_atomic_with(run_dir / "curves.png",
                             lambda f: fig.savefig(f, dpi=100, format="png"))
    plt.close(fig)
    return path


def open_tensorboard(run_dir: Path, model: nn.Module, images: torch.Tensor, mean: Sequence[float],
                     std: Sequence[float], size: tuple[int, int], channels_last: bool) -> Any:
    """A SummaryWriter in the run dir, with, once, a grid of sample ``images`` (uint8) and the
    model graph; ``log_epoch`` adds the scalars."""
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError as exc:
        raise UsageError(f"--tensorboard needs the tensorboard package ({exc}); "
                         f"pip install tensorboard") from None
    writer = SummaryWriter(log_dir=str(run_dir))
    grid = images.float().div(255)
    if tuple(grid.shape[-2:]) != size:
        grid = F.interpolate(grid, size=size, mode="bilinear", align_corners=False)
    writer.add_images("inputs", grid.cpu(), 0)
    sample = prepare_batch(images[:2], mean, std, size, channels_last=channels_last)
    try:
        was = model.training
        model.eval()
        with warnings.catch_warnings():  # add_graph traces with torch.jit, which warns about itself
            warnings.simplefilter("ignore")
            writer.add_graph(model, sample)
        model.train(was)
    except Exception as exc:  # tracing is best effort: a graph that fails must not stop training
        log.warning("tensorboard: could not trace the model graph (%s)", exc)
    writer.flush()
    return writer


def log_epoch(writer: Any, record: dict[str, float]) -> None:
    for tag, key in _SCALARS:
        writer.add_scalar(tag, record[key], record["epoch"])
    writer.flush()
