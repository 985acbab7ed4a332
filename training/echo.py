"""What the CLI prints about a training run: the device and plan, one line per epoch, the result.

Shared by ``cnnctl train`` (commands.py) and the torchrun workers it starts (distributed.py).
"""

from __future__ import annotations

from typing import Any

import click

from cnnctl.training.loop import Callbacks, EpochRecord, RunResult


def echo_callbacks() -> Callbacks:
    """The CLI's view of a run: which device, then one summary line per epoch."""

    def on_start(info: dict[str, Any]) -> None:
        cfg = info["config"]
        click.echo(f"device: {info['device']}"
                   + (f", {info['world_size']} processes" if info["world_size"] > 1 else ""))
        click.echo(
            f"training {cfg.model} on {cfg.dataset}: {info['train']} train / {info['val']} val "
            f"images, {info['classes']} classes; {cfg.epochs} epochs × {info['steps_per_epoch']} "
            f"steps of {cfg.batch_size}; {cfg.optimizer} lr {cfg.lr:g} {cfg.schedule}; "
            f"amp {info['amp']}, channels_last {'on' if info['channels_last'] else 'off'}"
            + (f", batch split {info['cpu_split']} ways across the cores"
               if info.get("cpu_split", 1) > 1 else ""))
        if info["start_epoch"] > cfg.epochs:
            click.echo(f"{info['run_dir']} has finished its {cfg.epochs} epochs: nothing to train")
        elif info["start_epoch"] > 1 or info["start_step"]:
            step = f", step {info['start_step']}" if info["start_step"] else ""
            click.echo(f"resuming at epoch {info['start_epoch']}{step}")
        click.echo(f"run dir: {info['run_dir']}")

    def on_epoch_end(r: EpochRecord, model: Any) -> None:
        click.echo(
            f"epoch {r.epoch}: train loss {r.train_loss:.4f} acc {100 * r.train_acc:.2f}% | "
            f"val loss {r.val_loss:.4f} acc {100 * r.val_acc:.2f}% | lr {r.lr:.3g} | "
            f"{r.images_per_s:.0f} img/s | {r.epoch_s:.1f}s")

    return Callbacks(on_start=on_start, on_epoch_end=on_epoch_end)


def echo_result(result: RunResult) -> None:
    """The run's last lines: the best epoch and where its checkpoint is."""
    if not result.history:
        click.echo(f"nothing to do: {result.run_dir} already finished {result.config.epochs} "
                   f"epochs")
        return
    click.echo(f"best val acc {100 * result.best_val_acc:.2f}% at epoch {result.best_epoch}; "
               f"{result.history[-1].elapsed_s:.1f}s")
    click.echo(f"best checkpoint: {result.best_path}")
