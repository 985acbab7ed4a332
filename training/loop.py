"""The training loop: ``train(config)`` reads top to bottom, one helper per phase.

The dataset is one uint8 tensor moved to the device once; each step takes a slice by index, augments
and normalises it there (transforms.py) and runs one optimizer step. Nothing per item happens in
Python, so the CPU spends its time in convolutions, not in ``ToTensor`` (seed 002's loop spends
most of an epoch in its DataLoader; bench/train_speed.py measures both).

Under torchrun (WORLD_SIZE > 1) the same function runs once per process with DistributedDataParallel:
each rank takes its own shard of a permutation drawn per epoch from the seed, metrics are summed
across ranks, and only rank 0 writes files or prints.

Beside it, one job per module: device.py (device, ranks, precision), data.py (datasets and the batch
sources), split.py (a CPU step's batch as one slice per core), evaluate.py, checkpoint.py (the one
format), rundir.py (config.json, metrics.csv, curves.png, TensorBoard).
"""

from __future__ import annotations

import contextlib
import functools
import logging
import os
import random
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch import nn

from cnnctl.errors import CheckpointError, UsageError
from cnnctl.training import checkpoint as ckpt_io
from cnnctl.training.config import RESUMABLE, TrainConfig
from cnnctl.training.data import Source, load_for_training, make_source
from cnnctl.training.device import (Placement, Precision, autocast, place, resolve_precision,
                                    sum_across_ranks, wait_for_all_ranks)
from cnnctl.training.evaluate import default_eval_batch, evaluate
from cnnctl.training.models import build_model, get_spec
from cnnctl.training.rundir import (log_epoch, new_run_dir, open_tensorboard, plot_curves,
                                    write_config, write_metrics)
from cnnctl.training.split import BatchSplit, SplitPlan, plan_split
from cnnctl.training.transforms import crop_flip, prepare_batch

log = logging.getLogger(__name__)

__all__ = ["EpochRecord", "RunResult", "Callbacks", "Preempted", "train"]


@dataclass(frozen=True)
class EpochRecord:
    epoch: int
    train_loss: float
    train_acc: float
    val_loss: float
    val_acc: float
    lr: float  # at the end of the epoch
    images_per_s: float  # training only, evaluation excluded
    epoch_s: float  # training + validation wall time
    elapsed_s: float  # since train() started (this process; a resumed run restarts the clock)

    def to_dict(self) -> dict[str, float]:
        return {k: (int(v) if k == "epoch" else float(v)) for k, v in self.__dict__.items()}


@dataclass(frozen=True)
class RunResult:
    run_dir: Path
    best_path: Path
    last_path: Path
    best_epoch: int
    best_val_acc: float
    history: list[EpochRecord]
    device: str
    config: TrainConfig
    model: nn.Module | None = None  # the trained model (unwrapped, last epoch's weights), in train mode


@dataclass(frozen=True)
class Callbacks:
    """Hooks for the CLI and the benchmark; called on rank 0 only."""

    on_start: Callable[[dict[str, Any]], None] | None = None
    on_epoch_end: Callable[[EpochRecord, nn.Module], None] | None = None


@dataclass(frozen=True)
class Inputs:
    """What the model is fed and predicts: input shape, per-channel normalisation, class names."""

    shape: tuple[int, int, int]
    mean: list[float]
    std: list[float]
    class_names: list[str]

    @property
    def size(self) -> tuple[int, int]:
        return (self.shape[1], self.shape[2])


@dataclass(frozen=True)
class _Setup:
    """What the configuration resolved to in this process, fixed for the whole run."""

    config: TrainConfig
    where: Placement
    precision: Precision
    inputs: Inputs
    local_batch: int  # images per step in this process
    steps: int  # per epoch
    train_images: int
    val_images: int
    split: SplitPlan  # CPU steps as slices run at once (split.py), or whole

    def resolved(self) -> dict[str, Any]:
        """config.json's "resolved" entry."""
        p = self.precision
        return {"device": str(self.where.device), "world_size": self.where.world,
                "per_process_batch": self.local_batch, "amp": p.amp,
                "amp_dtype": str(p.dtype) if p.dtype else None, "channels_last": p.channels_last,
                "torch": torch.__version__, "input_shape": list(self.inputs.shape),
                "mean": self.inputs.mean, "std": self.inputs.std,
                "class_names": self.inputs.class_names, "train_images": self.train_images,
                "val_images": self.val_images, "steps_per_epoch": self.steps,
                "cpu_split": self.split.slices,
                "cpu_split_why_not": self.split.reason or None}

    def start_info(self, run_dir: Path, start_epoch: int, start_step: int = 0) -> dict[str, Any]:
        """What ``Callbacks.on_start`` receives."""
        cfg, p = self.config, self.precision
        return {"run_dir": str(run_dir), "device": self.where.description,
                "world_size": self.where.world, "model": cfg.model, "dataset": cfg.dataset,
                "train": self.train_images, "val": self.val_images,
                "classes": len(self.inputs.class_names), "steps_per_epoch": self.steps,
                "amp": str(p.dtype).replace("torch.", "") if p.amp else "off",
                "channels_last": p.channels_last, "cpu_split": self.split.slices,
                "start_epoch": start_epoch,
                "start_step": start_step, "config": cfg}


def train(config: TrainConfig, callbacks: Callbacks | None = None,
          resume: str | os.PathLike[str] | None = None, *, epochs: int | None = None
          ) -> RunResult:
    """Train ``config.model`` on ``config.dataset``; write best.pt, last.pt, metrics.csv and
    config.json into the run directory.

    With ``resume`` (a run directory), continue from its last.pt with the configuration saved
    there; ``epochs`` then trains a finished run longer (``_extend``). Without it, a ``config.out``
    that already holds a last.pt of the same configuration is continued the same way (a restarted
    job just runs its command again), and one of another configuration is an error naming the
    difference. SIGTERM ends the run at the next step boundary with last.pt written there
    (``Preempted``)."""
    started = time.perf_counter()
    callbacks = callbacks or Callbacks()
    saved = _saved_run(config, resume)
    requested = config.to_dict()  # as asked for, before the recipe's min_steps is resolved
    schedule_start, new_schedule = 0, False
    if saved is not None:
        out = str(resume) if resume is not None else str(config.out)
        requested = saved.get("requested") or saved["config"]
        schedule_start = int(saved.get("schedule_start", 0))
        config = TrainConfig.from_dict(saved["config"]).resumed_with(config, out=out)
        if epochs is not None and epochs != config.epochs:
            config, requested, schedule_start, new_schedule = _extend(saved, config, requested,
                                                                      epochs, out)

    # Where it runs: this process's device and rank, and the precision it computes in.
    where = place(config)
    if config.batch_size % where.world:
        raise UsageError(f"--batch-size {config.batch_size} (global) must be divisible by the "
                         f"{where.world} processes")
    local_batch = config.batch_size // where.world
    precision = resolve_precision(config, where.device)

    # Data: both splits as uint8 images; the training split's statistics normalise both.
    spec = get_spec(config.model)
    train_data, val_data = load_for_training(config, spec.input_shape)
    inputs = Inputs(spec.input_shape, list(train_data.mean), list(train_data.std),
                    list(train_data.class_names))

    # The model, seeded; the sources it is fed from; how many steps an epoch has.
    torch.manual_seed(config.seed)
    random.seed(config.seed)
    model = _build_model(config, inputs, where.device, precision, start_weights=saved is None)
    split = plan_split(config.cpu_split, device=where.device, world=where.world,
                       threads=torch.get_num_threads(), batch=local_batch, model=model,
                       amp=precision.amp, compiled=config.compile)
    train_src = make_source(train_data, where.device, config.workers)
    val_src = make_source(val_data, where.device, config.workers)
    steps = train_src.steps(local_batch, where.world)
    if config.max_steps_per_epoch:
        steps = min(steps, config.max_steps_per_epoch)
    if saved is None:
        config = _at_least_min_steps(config, steps)
    opt = _Optimization(config, model, steps, precision, where.device,
                        schedule_epochs=config.epochs - schedule_start)
    setup = _Setup(config, where, precision, inputs, local_batch, steps, len(train_data),
                   len(val_data), split)

    # A resumed run continues from last.pt: weights, optimizer, schedule, RNG, history, and the
    # position inside an epoch when it was written mid-epoch.
    start_epoch, history, best_acc, best_epoch = 1, [], -1.0, 0
    position: dict[str, Any] | None = None
    if saved is not None:
        start_epoch, history, best_acc, best_epoch = _restore(saved, model, opt, config.model,
                                                              where.device, new_schedule)
        position = _own_position(saved.get("position"), where, steps)
    train_model = _wrap_for_training(model, config, where)

    # The run directory: config.json first, so that even a run that dies says what it was.
    run_dir = Path(config.out) if config.out else new_run_dir(config.model)
    board = None
    if where.is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
        write_config(run_dir, config.to_dict(), setup.resolved())
        if config.tensorboard:
            board = open_tensorboard(run_dir, model, train_src.sample(32), inputs.mean,
                                     inputs.std, inputs.size, precision.channels_last)
        log.debug("training %s on %s (%d train / %d val images) on %s", config.model,
                  config.dataset, setup.train_images, setup.val_images, where.description)
        if callbacks.on_start:
            callbacks.on_start(setup.start_info(run_dir, start_epoch,
                                                position["step"] if position else 0))

    last_path, best_path = run_dir / "last.pt", run_dir / "best.pt"

    def save_last(done: int, metrics: dict[str, float], at: dict[str, Any] | None) -> None:
        """last.pt after ``done`` whole epochs, plus ``at`` (the position) when mid-epoch."""
        extra: dict[str, Any] = {"history": [r.to_dict() for r in history],
                                 "best_val_acc": best_acc, "best_epoch": best_epoch,
                                 "world_size": where.world, "requested": requested,
                                 "schedule_start": schedule_start}
        if at is not None:
            extra["position"] = at
        ckpt_io.save_checkpoint(ckpt_io.make_checkpoint(
            model=model, model_name=config.model, num_classes=len(inputs.class_names),
            in_channels=inputs.shape[0], input_shape=inputs.shape, mean=inputs.mean,
            std=inputs.std, class_names=inputs.class_names, dataset=config.dataset,
            epoch=done, metrics=metrics, config=config.to_dict(), **opt.state(),
            rng=_rng_state(where.device), extra=extra), last_path)

    # Each epoch: train, validate on the held-out slice, then rank 0 writes last.pt (best.pt
    # becomes a link to it when validation accuracy improved), metrics.csv and TensorBoard.
    # SIGTERM, and --checkpoint-every-steps, write last.pt at a step boundary inside the epoch.
    eval_batch = config.eval_batch_size or default_eval_batch(config.model)
    splitter = BatchSplit(model, split) if split.slices > 1 else None
    with _StopSignal(where.world) as stop, splitter or contextlib.nullcontext():
        for epoch in range(start_epoch, config.epochs + 1):
            epoch_start = time.perf_counter()

            def between_steps(done: int, state: Callable[[], dict[str, Any]]) -> None:
                """After each step: a mid-epoch last.pt when it is due or SIGTERM came."""
                stopping = stop.requested(done == steps or done % 8 == 0)
                due = (config.checkpoint_every_steps is not None and done < steps
                       and ((epoch - 1) * steps + done) % config.checkpoint_every_steps == 0)
                if stopping or due:
                    at = _gather_position(state(), where)
                    if where.is_main:
                        save_last(epoch - 1, history[-1].to_dict() if history else {}, at)
                if stopping:
                    wait_for_all_ranks(where.world)  # no rank leaves before last.pt is written
                    raise Preempted(last_path, epoch, done)

            with splitter.stepping() if splitter is not None else contextlib.nullcontext():
                train_loss, train_acc, images, train_s = _train_epoch(
                    train_model, train_src, opt, epoch, setup, position, between_steps, splitter)
            position = None
            lr = opt.end_epoch()
            val = evaluate(model, val_src, inputs.mean, inputs.std, where.device, eval_batch,
                           size=inputs.size, class_names=inputs.class_names,
                           channels_last=precision.channels_last, autocast_dtype=precision.dtype,
                           rank=where.rank, world=where.world)
            record = EpochRecord(
                epoch=epoch, train_loss=train_loss, train_acc=train_acc, val_loss=val["loss"],
                val_acc=val["accuracy"], lr=lr, images_per_s=images / train_s,
                epoch_s=time.perf_counter() - epoch_start,
                elapsed_s=time.perf_counter() - started)
            history.append(record)
            improved = record.val_acc > best_acc
            if improved:
                best_acc, best_epoch = record.val_acc, epoch
            if where.is_main:
                save_last(epoch, record.to_dict(), None)
                if improved:
                    ckpt_io.link_or_copy(last_path, best_path)
                write_metrics(run_dir, [r.to_dict() for r in history])
                if board is not None:
                    log_epoch(board, record.to_dict())
                if callbacks.on_epoch_end:
                    callbacks.on_epoch_end(record, model)
            if epoch < config.epochs and stop.requested(True):
                wait_for_all_ranks(where.world)
                raise Preempted(last_path, epoch + 1, 0)

    if where.is_main:
        if board is not None:
            board.close()
        if config.plot and len(history) > 1:  # one point is no curve (and matplotlib costs 1 s)
            plot_curves(run_dir, [r.to_dict() for r in history])
    wait_for_all_ranks(where.world)
    return RunResult(run_dir=run_dir, best_path=best_path, last_path=last_path,
                     best_epoch=best_epoch, best_val_acc=best_acc, history=history,
                     device=str(where.device), config=config, model=model)


class Preempted(Exception):
    """SIGTERM stopped the run at a step boundary after last.pt was written there; running the
    same command again continues from it. The CLI exits with 143 (128 + SIGTERM), which torchrun
    treats as a failed worker to restart and Kubernetes' ``ExitCode`` restart policy (PyTorchJob)
    as retryable."""

    exit_code = 143

    def __init__(self, checkpoint: Path, epoch: int, step: int) -> None:
        super().__init__(f"stopped by SIGTERM at epoch {epoch}, step {step}; {checkpoint} "
                         f"holds the run up to there: the same command continues it")
        self.checkpoint = checkpoint
        self.epoch = epoch
        self.step = step


# --- resuming: finding the run, extending it, the position inside an epoch -------------------


def _saved_run(config: TrainConfig, resume: str | os.PathLike[str] | None
               ) -> dict[str, Any] | None:
    """last.pt of the run to continue: ``resume``'s, or ``config.out``'s when it holds one of
    the same configuration."""
    if resume is not None:
        saved = ckpt_io.load_checkpoint(Path(resume) / "last.pt")
        _check_is_run(saved, Path(resume), "--resume")
        return saved
    path = Path(config.out) / "last.pt" if config.out else None
    if path is None or not path.is_file():
        return None
    saved = ckpt_io.load_checkpoint(path)
    _check_is_run(saved, path.parent, "--out")
    before = TrainConfig.from_dict(saved.get("requested") or saved["config"]).to_dict()
    now = config.to_dict()
    ignored = set(RESUMABLE) | {"out", "data_dir"}
    changed = [f"{k} {before[k]!r} there, {now[k]!r} now" for k in now
               if k not in ignored and before[k] != now[k]]
    if changed:
        raise UsageError(
            f"--out {path.parent} holds a run with another configuration ({'; '.join(changed)}); "
            f"give another --out, or run the same command to continue that run "
            f"(--resume {path.parent} --epochs N trains a finished run longer)")
    log.info("continuing the run in %s", path.parent)
    return saved


def _check_is_run(saved: dict[str, Any], run_dir: Path, flag: str) -> None:
    if "model" not in saved.get("config", {}):
        raise UsageError(f"{flag} {run_dir}: its last.pt was not written by cnnctl train "
                         f"({saved.get('config') or 'no configuration'}); there is no run to "
                         f"continue")


def _extend(saved: dict[str, Any], config: TrainConfig, requested: dict[str, Any], epochs: int,
            run_dir: str) -> tuple[TrainConfig, dict[str, Any], int, bool]:
    """``--resume RUN_DIR --epochs N`` on a finished run: train it to N epochs in all. The added
    epochs get a schedule of their own: onecycle and cosine start a new cycle over them (warm-up
    to --lr and anneal again, as a run of N − done epochs would from these weights), multistep
    and none go on as before (milestones are absolute epochs)."""
    done = int(saved["epoch"])
    if saved.get("position") or done < config.epochs:
        raise UsageError(f"--epochs {epochs}: {run_dir} has not finished its {config.epochs} "
                         f"epochs (at epoch {done}); continue it with --resume {run_dir} first")
    if epochs < done:
        raise UsageError(f"--epochs {epochs}: {run_dir} has already trained {done} epochs; give "
                         f"more to train it longer")
    restart = config.schedule in ("onecycle", "cosine")
    start = done if restart else int(saved.get("schedule_start", 0))
    requested = {**requested, "epochs": epochs, "min_steps": 0}
    log.info("extending %s from %d to %d epochs%s", run_dir, done, epochs,
             f" with a new {config.schedule} cycle" if restart else "")
    return config.replace(epochs=epochs), requested, start, restart


def _position(epoch: int, step: int, loss_sum: torch.Tensor, correct: torch.Tensor, seen: int,
              train_s: float, aug_gen: torch.Generator) -> dict[str, Any]:
    """What this rank needs to continue an epoch from step ``step``: the running sums (exact:
    float64 and int64) and the augmentation generator's state."""
    return {"epoch": epoch, "step": step, "train_s": train_s,
            "ranks": [{"loss_sum": float(loss_sum), "correct": int(correct), "seen": seen,
                       "aug_rng": aug_gen.get_state()}]}


def _gather_position(mine: dict[str, Any], where: Placement) -> dict[str, Any]:
    """Every rank's part of the position, for rank 0 to save (all ranks must call this)."""
    if where.world == 1:
        return mine
    import torch.distributed as dist

    parts: list[Any] = [None] * where.world
    dist.all_gather_object(parts, mine["ranks"][0])
    return {**mine, "ranks": parts}


def _own_position(position: dict[str, Any] | None, where: Placement, steps: int
                  ) -> dict[str, Any] | None:
    """This rank's part of a mid-epoch position, checked against how this run is set up."""
    if position is None:
        return None
    if len(position["ranks"]) != where.world:
        raise UsageError(f"last.pt was written mid-epoch by {len(position['ranks'])} processes; "
                         f"continue it with the same number (here: {where.world})")
    if position["step"] > steps:
        raise UsageError(f"last.pt was written at step {position['step']} of an epoch that now "
                         f"has {steps} steps")
    return {**position, **position["ranks"][where.rank]}


class _StopSignal:
    """SIGTERM sets a flag that the loop reads at step boundaries. Under torchrun the ranks agree
    (an all-reduce of the flags every few steps) so that all stop at the same step; a signal
    reaching one rank only (a spot VM's notice to one pod) stops them all."""

    def __init__(self, world: int) -> None:
        self.world = world
        self.signalled = False
        self._previous: Any = None

    def __enter__(self) -> "_StopSignal":
        import signal
        import threading

        if threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(signal.SIGTERM, self._handle)
        return self

    def __exit__(self, *exc: object) -> None:
        import signal

        if self._previous is not None:
            signal.signal(signal.SIGTERM, self._previous)

    def _handle(self, signum: int, frame: Any) -> None:
        self.signalled = True

    def requested(self, agree_now: bool) -> bool:
        """Whether to stop here; with several ranks only where ``agree_now`` (every rank passes
        the same value at the same step, so the all-reduce lines up)."""
        if self.world == 1:
            return self.signalled
        if not agree_now:
            return False
        import torch.distributed as dist

        flag = torch.tensor([int(self.signalled)])
        if dist.get_backend() == "nccl":
            flag = flag.cuda()
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return bool(flag.item())


# --- the phases, in the order train() runs them ------------------------------------------------


def _build_model(config: TrainConfig, inputs: Inputs, device: torch.device, precision: Precision,
                 start_weights: bool) -> nn.Module:
    """The model, with the starting weights the config names (unless resuming: those come from
    last.pt, and the starting files may be gone by now), on the device in its memory format."""
    model = build_model(config.model, num_classes=len(inputs.class_names),
                        in_channels=inputs.shape[0])
    if start_weights and config.state_dict:
        raw = ckpt_io.import_state_dict(config.state_dict, config.model)
        try:
            ckpt_io.load_weights(model, raw["state_dict"], config.model)
        except CheckpointError as exc:
            raise CheckpointError(f"--state-dict {config.state_dict}: {exc}") from None
    elif start_weights and config.weights:
        skipped = ckpt_io.load_pretrained(model, config.weights, config.model)
        log.info("loaded %s; re-initialised (shape differs): %s", config.weights,
                 ", ".join(skipped) or "nothing")
    if config.freeze_features:
        for p in model.features.parameters():
            p.requires_grad_(False)
    model = model.to(device)
    if precision.channels_last:
        model = model.to(memory_format=torch.channels_last)
    return model


def _at_least_min_steps(config: TrainConfig, steps: int) -> TrainConfig:
    """More epochs when the recipe's floor on total steps is not met (a small dataset)."""
    if not config.min_steps or config.epochs * steps >= config.min_steps:
        return config
    epochs = -(-config.min_steps // steps)
    log.info("%d epochs of %d steps are fewer than the recipe's %d steps: %d epochs",
             config.epochs, steps, config.min_steps, epochs)
    return config.replace(epochs=epochs, min_steps=0)  # saved resolved: resume agrees


class _Optimization:
    """Optimizer, lr schedule and grad scaler: ``step`` per batch, ``end_epoch`` per epoch."""

    def __init__(self, config: TrainConfig, model: nn.Module, steps: int, precision: Precision,
                 device: torch.device, schedule_epochs: int) -> None:
        params = [p for p in model.parameters() if p.requires_grad]
        self.optimizer = _make_optimizer(config, params)
        # The schedule spans schedule_epochs: all of them, or those an extension added.
        self._make = lambda: _make_schedule(config, self.optimizer, steps, schedule_epochs)
        self.scheduler, self.per_step = self._make()
        self.scaler = torch.amp.GradScaler(device.type, enabled=precision.grad_scaling)

    def step(self, loss: torch.Tensor) -> None:
        self.optimizer.zero_grad(set_to_none=True)
        self.scaler.scale(loss).backward()
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self._after_step()

    def step_on_grads(self) -> None:
        """The step for gradients already in ``.grad`` (a split batch's sum; no loss scaling:
        split steps run in float32)."""
        self.optimizer.step()
        self._after_step()

    def _after_step(self) -> None:
        if self.scheduler is not None and self.per_step:
            self.scheduler.step()

    def end_epoch(self) -> float:
        """The lr the epoch ended with; then a per-epoch schedule takes its step."""
        lr = float(self.optimizer.param_groups[0]["lr"])
        if self.scheduler is not None and not self.per_step:
            self.scheduler.step()
        return lr

    def state(self) -> dict[str, Any]:
        """The checkpoint's optimizer, scheduler and scaler entries."""
        return {"optimizer": self.optimizer.state_dict(),
                "scheduler": self.scheduler.state_dict() if self.scheduler is not None else None,
                "scaler": self.scaler.state_dict() if self.scaler.is_enabled() else None}

    def load(self, ckpt: dict[str, Any], new_schedule: bool = False) -> None:
        """The saved states; with ``new_schedule`` (an extension), a fresh schedule instead."""
        self.optimizer.load_state_dict(ckpt["optimizer"])
        if new_schedule:
            self.scheduler, self.per_step = self._make()
        elif self.scheduler is not None and ckpt.get("scheduler"):
            self.scheduler.load_state_dict(ckpt["scheduler"])
        if ckpt.get("scaler"):
            self.scaler.load_state_dict(ckpt["scaler"])


def _make_optimizer(config: TrainConfig, params: list[nn.Parameter]) -> torch.optim.Optimizer:
    # The fused step (one kernel per tensor, not a handful of ops each) where torch has it: on
    # the 2-core CPU resnet-mini's Nesterov SGD step takes 75 µs instead of 273.
    fused = all(p.device.type in ("cpu", "cuda") and p.is_floating_point() for p in params)
    if config.optimizer == "sgd":
        return torch.optim.SGD(params, lr=config.lr, momentum=config.momentum,
                               nesterov=config.nesterov and config.momentum > 0,
                               weight_decay=config.weight_decay, fused=fused)
    if config.optimizer == "adam":
        return torch.optim.Adam(params, lr=config.lr, weight_decay=config.weight_decay,
                                fused=fused)
    return torch.optim.AdamW(params, lr=config.lr, weight_decay=config.weight_decay, fused=fused)


def _make_schedule(config: TrainConfig, optimizer: torch.optim.Optimizer, steps: int,
                   epochs: int) -> tuple[Any, bool]:
    """(scheduler or None, stepped per batch?) over ``epochs`` epochs of ``steps`` steps."""
    # +1: OneCycleLR counts its construction as step 0, and stepping past total_steps
    # extrapolates the last phase to a negative lr.
    total = epochs * steps + 1
    if config.schedule == "onecycle" and total < 4:
        log.warning("onecycle needs at least 3 steps; this run has %d: constant lr", total - 1)
        return None, False
    if config.schedule == "onecycle":
        # Momentum is not cycled: it would override the momentum the user chose (0.5 in seed 002).
        return torch.optim.lr_scheduler.OneCycleLR(
            # Warm up over the first quarter; at least 2 steps, or a tiny run divides by zero.
            optimizer, max_lr=config.lr, total_steps=total, pct_start=min(0.5, max(0.25, 2 / total)),
            anneal_strategy="linear", cycle_momentum=False, div_factor=10.0,
            final_div_factor=100.0), True
    if config.schedule == "cosine":
        return torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=total), True
    if config.schedule == "multistep":
        # Milestones in epochs, as seed 004's MultiStepLR(milestones=[8, 16, 24, 32], gamma=0.5).
        return torch.optim.lr_scheduler.MultiStepLR(
            optimizer, milestones=list(config.milestones), gamma=config.gamma), False
    return None, False


def _restore(saved: dict[str, Any], model: nn.Module, opt: _Optimization, model_name: str,
             device: torch.device, new_schedule: bool
             ) -> tuple[int, list[EpochRecord], float, int]:
    """Load last.pt's states; returns (first epoch to run, history, best val acc, best epoch)."""
    ckpt_io.load_weights(model, saved["state_dict"], model_name)
    opt.load(saved, new_schedule)
    _set_rng_state(saved.get("rng"), device)
    return (int(saved["epoch"]) + 1, [EpochRecord(**r) for r in saved.get("history", [])],
            float(saved.get("best_val_acc", -1.0)), int(saved.get("best_epoch", 0)))


def _rng_state(device: torch.device) -> dict[str, Any]:
    state: dict[str, Any] = {"torch": torch.get_rng_state(), "python": random.getstate()}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def _set_rng_state(state: dict[str, Any] | None, device: torch.device) -> None:
    if not state:
        return
    torch.set_rng_state(state["torch"].cpu())
    random.setstate(_to_tuple(state["python"]))
    if device.type == "cuda" and "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"].cpu(), device)


def _to_tuple(value: Any) -> Any:
    """random.setstate wants the nested tuples that a checkpoint stores as lists."""
    return tuple(_to_tuple(v) for v in value) if isinstance(value, (list, tuple)) else value


def _wrap_for_training(model: nn.Module, config: TrainConfig, where: Placement) -> nn.Module:
    """torch.compile and DDP wrap the model for the training steps; evaluation and checkpoints use
    the plain module underneath."""
    wrapped = torch.compile(model) if config.compile else model
    if where.world > 1:
        from torch.nn.parallel import DistributedDataParallel as DDP

        # DDP broadcasts rank 0's parameters and buffers here: all ranks start identical.
        device_ids = [where.device.index] if where.device.type == "cuda" else None
        wrapped = DDP(wrapped, device_ids=device_ids)
    return wrapped


def _train_epoch(model: nn.Module, source: Source, opt: _Optimization, epoch: int,
                 setup: _Setup, position: dict[str, Any] | None,
                 between_steps: Callable[[int, Callable[[], dict[str, Any]]], None],
                 splitter: BatchSplit | None = None) -> tuple[float, float, float, float]:
    """One pass over this rank's shard, from ``position`` when resuming mid-epoch; returns (loss,
    accuracy, images) summed over all ranks, and the seconds it took. ``between_steps(done,
    state)`` runs after each step (``state()`` makes the position to save there). With a
    ``splitter`` each step's batch runs as slices at once (split.py; the caller holds
    ``splitter.stepping()`` around the epoch)."""
    config, where, inputs, precision = setup.config, setup.where, setup.inputs, setup.precision
    start = time.perf_counter()
    model.train()
    # Augmentation draws from its own generator, fixed by (seed, epoch, rank): a resumed run and
    # every device see the same crops.
    aug_seed = config.seed * 1_000_003 + epoch + 7919 * (where.rank + 1)
    aug_gen = torch.Generator().manual_seed(aug_seed)
    loss_sum = torch.zeros((), dtype=torch.float64, device=where.device)
    correct = torch.zeros((), dtype=torch.int64, device=where.device)
    seen, first, earlier_s = 0, 0, 0.0
    if position is not None:
        aug_gen.set_state(position["aug_rng"])
        loss_sum.fill_(position["loss_sum"])
        correct.fill_(position["correct"])
        seen, first, earlier_s = position["seen"], position["step"], position["train_s"]
    steps = setup.steps
    prepare = functools.partial(prepare_batch, mean=inputs.mean, std=inputs.std, size=inputs.size,
                                channels_last=precision.channels_last)
    bar = _progress(steps, first, f"epoch {epoch}/{config.epochs}",
                    config.progress and where.is_main)
    batches = source.batches(config.seed, epoch, setup.local_batch, where.rank, where.world, steps,
                             start=first)
    for step, (images, labels) in enumerate(batches, start=first):
        if config.augment != "none":
            images = crop_flip(images, config.crop_padding, aug_gen,
                               flip=config.augment == "crop-flip")
        if splitter is not None:
            # Each slice normalises its own images, on its own thread.
            logits, loss = splitter.backward(images, labels, config.label_smoothing, prepare)
            opt.step_on_grads()
        else:
            x = prepare(images)
            with autocast(where.device, precision.dtype):
                logits = model(x)
                loss = F.cross_entropy(logits.float(), labels,
                                       label_smoothing=config.label_smoothing)
            opt.step(loss)
        # Accumulated on the device: no host sync per step (it would stall a GPU's queue).
        loss_sum += loss.detach().double() * labels.shape[0]
        correct += (logits.detach().argmax(1) == labels).sum()
        seen += labels.shape[0]
        if bar is not None:
            bar.update(1)
            if step % 20 == 0 or step == steps - 1:
                elapsed = time.perf_counter() - start
                bar.set_postfix(loss=f"{loss_sum.item() / seen:.4f}",
                                acc=f"{100 * correct.item() / seen:.2f}%",
                                img_s=f"{seen * where.world / max(elapsed + earlier_s, 1e-9):.0f}")
        between_steps(step + 1, lambda: _position(
            epoch, step + 1, loss_sum, correct, seen, earlier_s + time.perf_counter() - start,
            aug_gen))
    if where.device.type == "cuda":
        torch.cuda.synchronize(where.device)
    seconds = earlier_s + time.perf_counter() - start
    if bar is not None:
        bar.close()
    totals = sum_across_ranks(torch.stack([loss_sum, correct.double(), torch.tensor(
        float(seen), dtype=torch.float64, device=where.device)]), where.world)
    return (float(totals[0] / max(float(totals[2]), 1.0)),
            float(totals[1] / max(float(totals[2]), 1.0)), float(totals[2]), max(seconds, 1e-9))


def _progress(total: int, initial: int, desc: str, enabled: bool) -> Any:
    if not enabled:
        return None
    from tqdm import tqdm

    return tqdm(total=total, initial=initial, desc=desc, unit="batch", leave=False,
                dynamic_ncols=True)
