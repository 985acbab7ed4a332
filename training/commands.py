"""``cnnctl train``, ``evaluate``, ``models``, ``datasets``.

Only click is imported at module level: ``cnnctl --help`` must not pay for importing torch.
Every user mistake becomes a CnnctlError, which clients/cli.py prints as one line (exit 2).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import click

_CHOICE_HELP = {
    "optimizer": "sgd|adam|adamw",
    "schedule": "onecycle|cosine|multistep|none",
}


def _echo_callbacks() -> Any:
    """The CLI's view of a run: which device, then one summary line per epoch."""
    from cnnctl.training.loop import Callbacks

    def on_start(info: dict[str, Any]) -> None:
        cfg = info["config"]
        click.echo(f"device: {info['device']}"
                   + (f", {info['world_size']} processes" if info["world_size"] > 1 else ""))
        click.echo(
            f"training {cfg.model} on {cfg.dataset}: {info['train']} train / {info['val']} val "
            f"images, {info['classes']} classes; {cfg.epochs} epochs × {info['steps_per_epoch']} "
            f"steps of {cfg.batch_size}; {cfg.optimizer} lr {cfg.lr:g} {cfg.schedule}; "
            f"amp {info['amp']}, channels_last {'on' if info['channels_last'] else 'off'}")
        if info["start_epoch"] > 1:
            click.echo(f"resuming at epoch {info['start_epoch']}")
        click.echo(f"run dir: {info['run_dir']}")

    def on_epoch_end(r: Any, model: Any) -> None:
        click.echo(
            f"epoch {r.epoch}: train loss {r.train_loss:.4f} acc {100 * r.train_acc:.2f}% | "
            f"val loss {r.val_loss:.4f} acc {100 * r.val_acc:.2f}% | lr {r.lr:.3g} | "
            f"{r.images_per_s:.0f} img/s | {r.epoch_s:.1f}s")

    return Callbacks(on_start=on_start, on_epoch_end=on_epoch_end)


@click.command()
@click.option("--model", "model", default=None, metavar="NAME",
              help="Model from `cnnctl models` (default resnet-mini).")
@click.option("--dataset", default=None, metavar="NAME",
              help="mnist-sample (embedded), mnist, fashion-mnist, cifar10 or folder:PATH. "
                   "Default: mnist-sample for 1-channel models, else the model's dataset.")
@click.option("--data-dir", default=None, type=click.Path(file_okay=False),
              help="Where torchvision datasets live / download to (default: user cache dir).")
@click.option("--epochs", type=int, default=None, help="Default: the model's recipe.")
@click.option("--batch-size", type=int, default=None,
              help="Global batch size (split across --nproc processes).")
@click.option("--lr", type=float, default=None, help="Peak learning rate.")
@click.option("--optimizer", default=None, metavar=_CHOICE_HELP["optimizer"])
@click.option("--schedule", default=None, metavar=_CHOICE_HELP["schedule"])
@click.option("--momentum", type=float, default=None, help="SGD momentum.")
@click.option("--nesterov/--no-nesterov", default=None, help="Nesterov momentum (SGD).")
@click.option("--weight-decay", type=float, default=None)
@click.option("--label-smoothing", type=float, default=None)
@click.option("--milestones", default=None, metavar="E1,E2,…",
              help="Epochs at which the multistep schedule multiplies lr by --gamma.")
@click.option("--gamma", type=float, default=None)
@click.option("--augment", default=None, metavar="none|crop|crop-flip",
              help="On-device random crop with --crop-padding (and horizontal flip).")
@click.option("--crop-padding", default=None, metavar="L,T,R,B",
              help="Zero padding before the random crop (default 4,4,4,4; seed 004: 0,2,3,4).")
@click.option("--val-fraction", type=float, default=None,
              help="Share of the training split held out for model selection (default 0.1).")
@click.option("--device", default="auto", metavar="auto|cpu|cuda", show_default=True)
@click.option("--seed", type=int, default=None, help="Random seed (default 0).")
@click.option("--out", default=None, type=click.Path(file_okay=False),
              help="Run directory (default runs/<model>-<timestamp>).")
@click.option("--state-dict", default=None, type=click.Path(dir_okay=False),
              help="Start from a seed's bare state_dict file (keys as the seed saved them).")
@click.option("--import-only", is_flag=True,
              help="With --state-dict: write it as best.pt/last.pt in the run dir, no training.")
@click.option("--weights", default=None, type=click.Path(dir_okay=False),
              help="Pretrained torchvision state_dict (vgg16); the classifier head is replaced.")
@click.option("--freeze-features", is_flag=True, default=None,
              help="vgg16: train only the classifier.")
@click.option("--resume", default=None, type=click.Path(file_okay=False),
              help="Continue RUN_DIR from its last.pt with the configuration saved there.")
@click.option("--nproc", type=int, default=None,
              help="Data-parallel processes on this machine (torchrun + DDP; gloo on CPU).")
@click.option("--tensorboard", is_flag=True, default=None,
              help="Write TensorBoard logs into the run dir.")
@click.option("--compile", "compile_", is_flag=True, default=None, help="torch.compile the model.")
@click.option("--amp/--no-amp", default=None,
              help="Mixed precision (default: on for CUDA, off on CPU where bf16 measured slower).")
@click.option("--channels-last/--no-channels-last", default=None,
              help="NHWC memory format (default on).")
@click.option("--max-steps", "max_steps_per_epoch", type=int, default=None,
              help="At most this many steps per epoch (quick checks).")
@click.option("--stream", default=None, metavar="auto|memory|stream",
              help="folder datasets: decode into memory or stream through DataLoader workers.")
@click.option("--workers", type=int, default=None, help="DataLoader workers when streaming.")
@click.option("--plot/--no-plot", default=None, help="curves.png in the run dir (default on).")
@click.option("--progress/--no-progress", default=True, help="Progress bars.")
def train(model: str | None, dataset: str | None, milestones: str | None, crop_padding: str | None,
          resume: str | None, nproc: int | None, import_only: bool, compile_: bool | None,
          **flags: Any) -> None:
    """Train a model; writes best.pt, last.pt, metrics.csv and config.json into the run dir."""
    from cnnctl.errors import UsageError
    from cnnctl.training.config import from_flags

    flags["compile"] = compile_
    if milestones is not None:
        try:
            flags["milestones"] = tuple(int(m) for m in milestones.split(",") if m.strip())
        except ValueError:
            raise UsageError(f"--milestones must be comma-separated epochs, got {milestones!r}") \
                from None
    if crop_padding is not None:
        try:
            flags["crop_padding"] = tuple(int(p) for p in crop_padding.split(","))
        except ValueError:
            raise UsageError(f"--crop-padding must be 4 comma-separated ints, got {crop_padding!r}") \
                from None
    if resume is not None:
        return _resume(resume, nproc, flags)
    model = model or "resnet-mini"
    if dataset is None:
        from cnnctl.training.models import get_spec

        spec = get_spec(model)
        dataset = "mnist-sample" if spec.input_shape[0] == 1 else spec.default_dataset
    config = from_flags(model, dataset=dataset, nproc=nproc, **flags)
    if import_only:
        return _import_only(config)
    if config.nproc > 1:
        return _launch(config, None)
    _run(config, None)


def _run(config: Any, resume: str | None) -> None:
    from cnnctl.training.loop import train as run_training

    result = run_training(config, callbacks=_echo_callbacks(), resume=resume)
    if not result.history:
        click.echo(f"nothing to do: {result.run_dir} already finished {config.epochs} epochs")
    else:
        click.echo(f"best val acc {100 * result.best_val_acc:.2f}% at epoch {result.best_epoch}; "
                   f"{result.history[-1].elapsed_s:.1f}s")
        click.echo(f"best checkpoint: {result.best_path}")
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():  # a worker of the user's own torchrun
        from cnnctl.training.distributed import leave_worker

        leave_worker(0)


def _resume(run_dir: str, nproc: int | None, flags: dict[str, Any]) -> None:
    from cnnctl.training.config import TrainConfig

    overrides = {k: flags[k] for k in ("device", "progress", "tensorboard", "plot", "workers")
                 if flags.get(k) is not None}
    config = TrainConfig(**overrides)
    if nproc and nproc > 1:
        return _launch(config.replace(nproc=nproc), run_dir)
    _run(config, run_dir)


def _launch(config: Any, resume: str | None) -> None:
    from cnnctl.training.distributed import launch

    rc = launch(config, resume)
    if rc != 0:
        raise click.ClickException(f"torchrun exited with status {rc}")


def _import_only(config: Any) -> None:
    """--state-dict F --import-only: the seed's weights as a cnnctl checkpoint, no training."""
    from cnnctl.errors import UsageError
    from cnnctl.training.checkpoint import import_state_dict, link_or_copy, save_checkpoint
    from cnnctl.training.data import DATASETS
    from cnnctl.training.loop import new_run_dir

    if not config.state_dict:
        raise UsageError("--import-only needs --state-dict FILE")
    class_names = None
    info = DATASETS.get(config.dataset)
    if config.dataset in ("mnist", "mnist-sample"):
        class_names = [str(i) for i in range(10)]
    elif info is None:
        raise UsageError("--import-only works with the built-in datasets' class names; "
                         f"got {config.dataset}")
    ckpt = import_state_dict(config.state_dict, config.model, class_names=class_names,
                             dataset=config.dataset)
    run_dir = Path(config.out) if config.out else new_run_dir(config.model)
    run_dir.mkdir(parents=True, exist_ok=True)
    last = save_checkpoint(ckpt, run_dir / "last.pt")
    link_or_copy(last, run_dir / "best.pt")
    click.echo(f"imported {config.state_dict} as {config.model}: {run_dir / 'best.pt'}")


@click.command()
@click.argument("checkpoint", type=click.Path())
@click.option("--dataset", default=None, help="Default: the dataset the checkpoint was trained on.")
@click.option("--data-dir", default=None, type=click.Path(file_okay=False))
@click.option("--split", default="test", metavar="test|val|train", show_default=True)
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object.")
@click.option("--batch-size", type=int, default=None)
@click.option("--device", default="auto", metavar="auto|cpu|cuda", show_default=True)
@click.option("--model", default=None, metavar="NAME",
              help="Evaluate a bare state_dict file by naming its model.")
def evaluate(checkpoint: str, dataset: str | None, data_dir: str | None, split: str,
             as_json: bool, batch_size: int | None, device: str, model: str | None) -> None:
    """Accuracy and per-class accuracy of CHECKPOINT on a dataset's test split."""
    import time

    import torch

    from cnnctl.errors import ShapeError, UsageError
    from cnnctl.training.checkpoint import import_state_dict, load_checkpoint, model_from_checkpoint
    from cnnctl.training.data import check_compatible, load_split
    from cnnctl.training.loop import default_eval_batch, evaluate as run_eval, select_device

    if batch_size is not None and batch_size <= 0:
        raise UsageError(f"--batch-size must be a positive integer, got {batch_size}")
    ckpt = import_state_dict(checkpoint, model) if model else load_checkpoint(checkpoint)
    dataset = dataset or ckpt.get("dataset") or "mnist-sample"
    dev, why = select_device(device)
    shape = tuple(int(s) for s in ckpt["input_shape"])
    data = load_split(dataset, split, data_dir=data_dir, shape=shape)  # type: ignore[arg-type]
    check_compatible(ckpt["model"], shape, data)  # type: ignore[arg-type]
    n_classes = int(ckpt["model_kwargs"]["num_classes"])
    if len(data.class_names) != n_classes:
        raise ShapeError(f"checkpoint {checkpoint} has {n_classes} classes; dataset {dataset} has "
                         f"{len(data.class_names)}")
    net = model_from_checkpoint(ckpt, device=dev).to(memory_format=torch.channels_last)
    norm = ckpt["normalization"]
    started = time.perf_counter()
    result = run_eval(net, data, norm["mean"], norm["std"], dev,
                      batch_size or default_eval_batch(ckpt["model"]),
                      size=(shape[1], shape[2]), class_names=ckpt["class_names"],
                      channels_last=True)
    seconds = time.perf_counter() - started
    out = {"accuracy": result["accuracy"], "n": result["n"], "correct": result["correct"],
           "loss": result["loss"], "model": ckpt["model"], "dataset": dataset, "split": split,
           "checkpoint": str(checkpoint), "epoch": ckpt.get("epoch"), "device": str(dev),
           "seconds": round(seconds, 3), "per_class": result["per_class"]}
    if as_json:
        click.echo(json.dumps(out))
        return
    click.echo(f"device: {why}")
    click.echo(f"{ckpt['model']} on {dataset} {split}: accuracy {100 * out['accuracy']:.2f}% "
               f"({out['correct']}/{out['n']}), loss {out['loss']:.4f}")
    for name, acc in result["per_class"].items():
        click.echo(f"  {name:>12}: {'-' if acc is None else f'{100 * acc:.2f}%'}")


@click.command()
def models() -> None:
    """The model zoo: parameters, input shape, seed file, default dataset."""
    import torch

    from cnnctl.training.models import build_model, count_parameters, format_shape, get_spec, \
        model_names

    rows = []
    for name in model_names():
        spec = get_spec(name)
        with torch.device("meta"):  # counts parameters without allocating vgg16's 528 MB
            n = count_parameters(build_model(name, check_inputs=False))
        rows.append((name, f"{n:,}", format_shape(spec.input_shape), spec.seed,
                     spec.default_dataset, spec.summary))
    header = ("model", "params", "input", "seed", "dataset", "")
    widths = [max(len(r[i]) for r in rows + [header]) for i in range(5)]
    for row in [header, *rows]:
        click.echo("  ".join(c.ljust(w) if i != 1 else c.rjust(w)
                             for i, (c, w) in enumerate(zip(row[:5], widths))) + "  " + row[5])


@click.command()
def datasets() -> None:
    """Datasets cnnctl can train on."""
    from cnnctl.training.data import DATASETS, default_data_dir
    from cnnctl.training.models import format_shape

    for info in DATASETS.values():
        shape = format_shape(info.shape) if info.shape else "model's"
        where = "download" if info.needs_download else "local"
        click.echo(f"{info.name:<14} {shape:<8} {where:<8} {info.summary}")
    click.echo(f"default --data-dir: {default_data_dir()}")
