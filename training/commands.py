"""``cnnctl train``, ``evaluate``, ``models``, ``datasets``.

Only click and config.py (no torch) are imported at module level: ``cnnctl --help`` must not pay
for importing torch. Flag values are checked by click types built from config.py's tables; every
user mistake becomes a CnnctlError, which the CLI prints as one line (exit 2).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import click

from cnnctl.errors import UsageError
from cnnctl.training.config import (AUGMENTS, DEVICES, OPTIMIZERS, RANGES, RESUMABLE, SCHEDULES,
                                    SPLITS, STREAM_MODES)


def _range(name: str) -> click.ParamType:
    """The click type for a numeric TrainConfig field, from its entry in config.RANGES."""
    r = RANGES[name]
    kind = click.IntRange if r.integer else click.FloatRange
    return kind(r.min, r.max, min_open=r.min_open, max_open=r.max_open)


class _Ints(click.ParamType):
    """Comma-separated integers (``8,16,24``); ``count`` fixes how many, ``minimum`` bounds each."""

    name = "ints"

    def __init__(self, count: int | None = None, minimum: int | None = None) -> None:
        self.count = count
        self.minimum = minimum

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None
                ) -> tuple[int, ...]:
        if isinstance(value, tuple):
            return value
        try:
            ints = tuple(int(v) for v in str(value).split(",") if v.strip())
        except ValueError:
            self.fail(f"{value!r} is not a comma-separated list of integers", param, ctx)
        if self.count is not None and len(ints) != self.count:
            self.fail(f"{value!r} has {len(ints)} integers; {self.count} are needed", param, ctx)
        if self.minimum is not None and any(i < self.minimum for i in ints):
            self.fail(f"{value!r} has a value below {self.minimum}", param, ctx)
        return ints


@click.command()
@click.option("--model", "model", default=None, metavar="NAME",
              help="Model from `cnnctl models` (default resnet-mini).")
@click.option("--dataset", default=None, metavar="NAME",
              help="mnist-sample (embedded), mnist, fashion-mnist, cifar10 or folder:PATH. "
                   "Default: mnist-sample for 1-channel models, else the model's dataset.")
@click.option("--data-dir", default=None, type=click.Path(file_okay=False),
              help="Where torchvision datasets live / download to (default: user cache dir).")
@click.option("--epochs", type=_range("epochs"), default=None, help="Default: the model's recipe.")
@click.option("--batch-size", type=_range("batch_size"), default=None,
              help="Global batch size (split across --nproc processes).")
@click.option("--lr", type=_range("lr"), default=None, help="Peak learning rate.")
@click.option("--optimizer", type=click.Choice(OPTIMIZERS), default=None)
@click.option("--schedule", type=click.Choice(SCHEDULES), default=None)
@click.option("--momentum", type=_range("momentum"), default=None, help="SGD momentum.")
@click.option("--nesterov/--no-nesterov", default=None, help="Nesterov momentum (SGD).")
@click.option("--weight-decay", type=_range("weight_decay"), default=None)
@click.option("--label-smoothing", type=_range("label_smoothing"), default=None)
@click.option("--milestones", type=_Ints(), default=None, metavar="E1,E2,…",
              help="Epochs at which the multistep schedule multiplies lr by --gamma.")
@click.option("--gamma", type=_range("gamma"), default=None)
@click.option("--augment", type=click.Choice(AUGMENTS), default=None,
              help="On-device random crop with --crop-padding (and horizontal flip).")
@click.option("--crop-padding", type=_Ints(count=4, minimum=0), default=None, metavar="L,T,R,B",
              help="Zero padding before the random crop (default 4,4,4,4; seed 004: 0,2,3,4).")
@click.option("--val-fraction", type=_range("val_fraction"), default=None,
              help="Share of the training split held out for model selection (default 0.1).")
@click.option("--device", type=click.Choice(DEVICES), default="auto", show_default=True)
@click.option("--seed", type=int, default=None, help="Random seed (default 0).")
@click.option("--out", default=None, type=click.Path(file_okay=False),
              help="Run directory (default runs/<model>-<timestamp>). One holding last.pt of the "
                   "same configuration is continued from it (a restarted job just reruns its "
                   "command); another configuration there is an error.")
@click.option("--state-dict", default=None, type=click.Path(exists=True, dir_okay=False),
              help="Start from a seed's bare state_dict file (keys as the seed saved them).")
@click.option("--import-only", is_flag=True,
              help="With --state-dict: write it as best.pt/last.pt in the run dir, no training.")
@click.option("--weights", default=None, type=click.Path(exists=True, dir_okay=False),
              help="Pretrained torchvision state_dict (vgg16); the classifier head is replaced.")
@click.option("--freeze-features", is_flag=True, default=None,
              help="vgg16: train only the classifier.")
@click.option("--resume", default=None, type=click.Path(exists=True, file_okay=False),
              help="Continue RUN_DIR from its last.pt with the configuration saved there; with "
                   "--epochs N, train a finished run to N epochs in all.")
@click.option("--checkpoint-every-steps", "checkpoint_every_steps",
              type=_range("checkpoint_every_steps"), default=None, metavar="N",
              help="Also write last.pt every N steps inside epochs (SIGTERM writes one at the "
                   "next step anyway).")
@click.option("--nproc", type=_range("nproc"), default=None,
              help="Data-parallel processes on this machine (torchrun + DDP; gloo on CPU).")
@click.option("--tensorboard", is_flag=True, default=None,
              help="Write TensorBoard logs into the run dir.")
@click.option("--compile", "compile_", is_flag=True, default=None, help="torch.compile the model.")
@click.option("--amp/--no-amp", default=None,
              help="Mixed precision (default: on for CUDA, off on CPU where bf16 measured slower).")
@click.option("--channels-last/--no-channels-last", default=None,
              help="NHWC memory format (default on).")
@click.option("--cpu-split/--no-cpu-split", default=None,
              help="CPU: run each step's batch as one slice per core at once and sum the "
                   "gradients (default: on where that is exact: one process, 2+ cores, no "
                   "BatchNorm or dropout, no --amp/--compile).")
@click.option("--max-steps", "max_steps_per_epoch", type=_range("max_steps_per_epoch"),
              default=None, help="At most this many steps per epoch (quick checks).")
@click.option("--stream", type=click.Choice(STREAM_MODES), default=None,
              help="folder datasets: decode into memory or stream through DataLoader workers.")
@click.option("--workers", type=_range("workers"), default=None,
              help="DataLoader workers when streaming.")
@click.option("--plot/--no-plot", default=None, help="curves.png in the run dir (default on).")
@click.option("--progress/--no-progress", default=True, help="Progress bars.")
def train(model: str | None, dataset: str | None, resume: str | None, nproc: int | None,
          import_only: bool, compile_: bool | None, **flags: Any) -> None:
    """Train a model; writes best.pt, last.pt, metrics.csv and config.json into the run dir."""
    from cnnctl.training.config import from_flags

    flags["compile"] = compile_
    if resume is not None:
        return _resume(resume, nproc, {**flags, "model": model, "dataset": dataset,
                                       "import_only": import_only or None})
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


def _run(config: Any, resume: str | None, epochs: int | None = None) -> None:
    import os
    import sys

    import torch.distributed as dist

    from cnnctl.training.echo import echo_callbacks, echo_result
    from cnnctl.training.loop import Preempted
    from cnnctl.training.loop import train as run_training

    code = 0
    try:
        result = run_training(config, callbacks=echo_callbacks(), resume=resume, epochs=epochs)
        if int(os.environ.get("RANK", 0)) == 0:  # under torchrun, rank 0 speaks for all
            echo_result(result)
    except Preempted as exc:
        click.echo(f"preempted: {exc}", err=True)
        code = exc.exit_code
    if dist.is_available() and dist.is_initialized():  # a worker of the user's own torchrun
        from cnnctl.training.distributed import leave_worker

        leave_worker(code)
    if code:
        sys.exit(code)


def _resume(run_dir: str, nproc: int | None, flags: dict[str, Any]) -> None:
    from cnnctl.training.config import TrainConfig

    # Only how the run executes may change; --epochs trains a finished run longer.
    fixed = sorted(k for k, v in flags.items()
                   if v is not None and k not in RESUMABLE and k != "epochs")
    if fixed:
        names = ", ".join("--" + k.replace("_", "-") for k in fixed)
        raise UsageError(f"--resume continues a run with its saved configuration; {names} cannot "
                         f"change (allowed with --resume: --epochs, "
                         f"{', '.join('--' + k.replace('_', '-') for k in RESUMABLE)})")
    config = TrainConfig(**{k: flags[k] for k in RESUMABLE if flags.get(k) is not None})
    epochs = flags.get("epochs")
    if nproc and nproc > 1:
        # The saved run's settings (its batch size must divide among the processes), not the
        # defaults that stand in for them here.
        from cnnctl.training.checkpoint import load_checkpoint

        saved = TrainConfig.from_dict(load_checkpoint(Path(run_dir) / "last.pt")["config"])
        return _launch(saved.resumed_with(config, out=run_dir).replace(nproc=nproc), run_dir,
                       epochs)
    _run(config, run_dir, epochs)


def _launch(config: Any, resume: str | None, epochs: int | None = None) -> None:
    import sys

    from cnnctl.training.distributed import launch

    rc = launch(config, resume, epochs)
    if rc != 0:
        click.echo(f"error: torchrun exited with status {rc}", err=True)
        sys.exit(rc if 0 < rc < 256 else 1)


def _import_only(config: Any) -> None:
    """--state-dict F --import-only: the seed's weights as a cnnctl checkpoint, no training."""
    from cnnctl.training.checkpoint import import_state_dict, link_or_copy, save_checkpoint
    from cnnctl.training.config import DATASETS
    from cnnctl.training.rundir import new_run_dir

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
@click.argument("checkpoint", type=click.Path(exists=True, dir_okay=False))
@click.option("--dataset", default=None, help="Default: the dataset the checkpoint was trained on.")
@click.option("--data-dir", default=None, type=click.Path(file_okay=False))
@click.option("--split", type=click.Choice(SPLITS), default="test", show_default=True)
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object.")
@click.option("--batch-size", type=_range("eval_batch_size"), default=None)
@click.option("--device", type=click.Choice(DEVICES), default="auto", show_default=True)
@click.option("--model", default=None, metavar="NAME",
              help="Evaluate a bare state_dict file by naming its model.")
def evaluate(checkpoint: str, dataset: str | None, data_dir: str | None, split: str,
             as_json: bool, batch_size: int | None, device: str, model: str | None) -> None:
    """Accuracy and per-class accuracy of CHECKPOINT on a dataset's test split."""
    import time

    import torch

    from cnnctl.errors import ShapeError
    from cnnctl.training.checkpoint import import_state_dict, load_checkpoint, model_from_checkpoint
    from cnnctl.training.data import check_compatible, load_split
    from cnnctl.training.device import select_device
    from cnnctl.training.evaluate import default_eval_batch, evaluate as run_eval

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
    from cnnctl.training.config import DATASETS
    from cnnctl.training.data import default_data_dir
    from cnnctl.training.models import format_shape

    for info in DATASETS.values():
        shape = format_shape(info.shape) if info.shape else "model's"
        where = "download" if info.needs_download else "local"
        click.echo(f"{info.name:<14} {shape:<8} {where:<8} {info.summary}")
    click.echo(f"default --data-dir: {default_data_dir()}")
