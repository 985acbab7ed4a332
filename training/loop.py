"""The training loop: data flows top to bottom through ``train(config)``.

The dataset is one uint8 tensor moved to the device once; each step takes a slice by index, augments
and normalises it there (transforms.py) and runs one optimizer step. Nothing per item happens in
Python, so a 2-core CPU spends its time in convolutions, not in ``ToTensor`` (seed 002's loop spends
most of an epoch in its DataLoader; bench/train_speed.py measures both).

Under torchrun (WORLD_SIZE > 1) the same function runs once per process with DistributedDataParallel:
each rank takes its own shard of a permutation drawn per epoch from the seed, metrics are summed
across ranks, and only rank 0 writes files or prints.
"""

from __future__ import annotations

import csv
import io
import json
import logging
import os
import random
import time
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from cnnctl.errors import CheckpointError, UsageError
from cnnctl.training import checkpoint as ckpt_io
from cnnctl.training.config import TrainConfig, validate
from cnnctl.training.data import (DATASETS, ImageData, StreamedData, check_compatible,
                                  load_train_val)
from cnnctl.training.models import build_model, format_shape, get_spec
from cnnctl.training.transforms import crop_flip, prepare_batch

log = logging.getLogger(__name__)

__all__ = [
    "EpochRecord", "RunResult", "Callbacks", "train", "evaluate", "prepare_batch", "select_device",
]


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


# --- device and precision --------------------------------------------------------------------


def _dist_env() -> tuple[int, int, int]:
    """(rank, world size, local rank) as torchrun sets them; (0, 1, 0) otherwise."""
    return (int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1)),
            int(os.environ.get("LOCAL_RANK", 0)))


def select_device(requested: str = "auto", local_rank: int = 0) -> tuple[torch.device, str]:
    """The device to use and a sentence saying why."""
    has_cuda = torch.cuda.is_available()
    if requested == "cuda" and not has_cuda:
        raise UsageError("--device cuda: no CUDA device is available here; use --device cpu or auto")
    if requested in ("cuda", "auto") and has_cuda:
        device = torch.device("cuda", local_rank % torch.cuda.device_count())
        return device, f"{device} ({torch.cuda.get_device_name(device)})"
    cores = _cpu_count()
    why = "no CUDA device found" if requested == "auto" else "as requested"
    return torch.device("cpu"), f"cpu ({cores} cores, {why})"


def _cpu_count() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def cpu_bf16_native() -> bool:
    """oneDNN has bf16 kernels for this CPU (native with AVX-512 BF16 / AMX, emulated with plain
    AVX-512); without them bf16 autocast falls back to slow reference code (seen on a 2-core AVX2
    EPYC)."""
    check = getattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported", None)
    try:
        return bool(check()) if check is not None else True
    except RuntimeError:
        return False


def cpu_bf16_works() -> bool:
    """bf16 autocast on this CPU: try a tiny conv rather than parse cpuinfo flags."""
    if not cpu_bf16_native():
        return False
    try:
        with torch.autocast("cpu", dtype=torch.bfloat16):
            y = torch.nn.functional.conv2d(torch.ones(1, 1, 4, 4), torch.ones(1, 1, 3, 3))
        return y.dtype == torch.bfloat16 and bool(torch.isfinite(y.float()).all())
    except RuntimeError:
        return False


@dataclass(frozen=True)
class Precision:
    amp: bool
    dtype: torch.dtype | None  # the autocast dtype when amp
    grad_scaling: bool  # fp16 needs loss scaling; bf16 has fp32's range and does not
    channels_last: bool


def resolve_precision(config: TrainConfig, device: torch.device) -> Precision:
    cuda = device.type == "cuda"
    # On this project's 2-core AVX-512/AMX Xeon, bf16 autocast made resnet-mini training slower
    # (2911 vs 3537 img/s at batch 64; docs/training.md), so CPU autocast is opt-in (--amp).
    amp = config.amp if config.amp is not None else cuda
    dtype: torch.dtype | None = None
    if amp and cuda:
        dtype = torch.bfloat16 if (config.amp_dtype == "bf16" and torch.cuda.is_bf16_supported()) \
            else torch.float16
    elif amp:
        if cpu_bf16_works():
            dtype = torch.bfloat16
        else:
            why = ("this CPU has no native bf16 kernels (oneDNN needs AVX-512; emulated bf16 "
                   "would be slower than float32)" if not cpu_bf16_native()
                   else "bf16 autocast does not work on this CPU")
            log.warning("--amp: %s; training in float32", why)
            amp = False
    # channels_last: 1.25-1.3× faster for resnet-mini on the CPU (4435 vs 3537 img/s at batch 64)
    # and the layout cuDNN's tensor-core kernels want.
    channels_last = config.channels_last if config.channels_last is not None else True
    return Precision(amp, dtype, bool(amp and dtype == torch.float16), channels_last)


# --- data ------------------------------------------------------------------------------------


class _Source:
    """Shared batching logic: a per-epoch permutation from the seed, sharded across ranks."""

    labels: torch.Tensor

    def __len__(self) -> int:
        return int(self.labels.shape[0])

    def steps(self, batch_size: int, world: int) -> int:
        """Full batches per rank (the remainder is dropped; it differs each epoch)."""
        per_rank = len(self) // world
        return max(1, per_rank // batch_size)

    def epoch_order(self, seed: int, epoch: int) -> torch.Tensor:
        # A permutation drawn from (seed, epoch) alone: every rank draws the same one, and a resumed
        # run draws the same one as the uninterrupted run, without saving any data-loader state.
        g = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
        return torch.randperm(len(self), generator=g)

    def shard(self, seed: int, epoch: int, rank: int, world: int) -> torch.Tensor:
        order = self.epoch_order(seed, epoch)
        per_rank = len(self) // world
        return order[: per_rank * world][rank::world]

    @staticmethod
    def eval_range(n: int, rank: int, world: int) -> range:
        return range(n * rank // world, n * (rank + 1) // world)


class MemorySource(_Source):
    """A split held as one uint8 tensor on the device; batches are index slices."""

    def __init__(self, data: ImageData, device: torch.device) -> None:
        self.images = data.images.to(device, non_blocking=True)
        self.labels = data.labels.to(device, non_blocking=True)
        self.device = device

    def batches(self, seed: int, epoch: int, batch_size: int, rank: int, world: int,
                steps: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        mine = self.shard(seed, epoch, rank, world).to(self.device)
        for i in range(steps):
            index = mine[i * batch_size:(i + 1) * batch_size]
            yield self.images[index], self.labels[index]

    def eval_batches(self, batch_size: int, rank: int, world: int
                     ) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        span = self.eval_range(len(self), rank, world)
        for i in range(span.start, span.stop, batch_size):
            j = min(i + batch_size, span.stop)
            yield self.images[i:j], self.labels[i:j]

    def sample(self, k: int) -> torch.Tensor:
        return self.images[:k]


class StreamSource(_Source):
    """A folder too large for memory: DataLoader workers decode and resize, batches arrive as uint8
    in pinned memory and are copied without blocking; the device does the rest as for MemorySource."""

    def __init__(self, data: StreamedData, device: torch.device, workers: int) -> None:
        self.dataset = data.dataset
        self.labels = data.labels
        self.device = device
        self.workers = workers

    def _load(self, batches: list[list[int]]) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        loader = torch.utils.data.DataLoader(
            self.dataset, batch_sampler=batches, num_workers=self.workers,
            pin_memory=self.device.type == "cuda", prefetch_factor=4 if self.workers else None)
        for images, labels in loader:
            yield (images.to(self.device, non_blocking=True),
                   labels.to(self.device, non_blocking=True))

    def batches(self, seed: int, epoch: int, batch_size: int, rank: int, world: int,
                steps: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        mine = self.shard(seed, epoch, rank, world).tolist()
        return self._load([mine[i * batch_size:(i + 1) * batch_size] for i in range(steps)])

    def eval_batches(self, batch_size: int, rank: int, world: int
                     ) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        span = self.eval_range(len(self), rank, world)
        return self._load([list(range(i, min(i + batch_size, span.stop)))
                           for i in range(span.start, span.stop, batch_size)])

    def sample(self, k: int) -> torch.Tensor:
        return torch.stack([self.dataset[i][0] for i in range(min(k, len(self)))]).to(self.device)


def make_source(data: ImageData | StreamedData, device: torch.device, workers: int = 2
                ) -> MemorySource | StreamSource:
    if isinstance(data, StreamedData):
        return StreamSource(data, device, workers)
    return MemorySource(data, device)


def _load_data(config: TrainConfig, input_shape: tuple[int, int, int]
               ) -> tuple[ImageData | StreamedData, ImageData | StreamedData]:
    info = DATASETS.get(config.dataset)
    if info is not None and info.shape is not None and info.shape[0] != input_shape[0]:
        # Before reading anything: a channel mismatch is known from the dataset's description.
        raise UsageError(
            f"model {config.model} expects {format_shape(input_shape)} input; dataset "
            f"{config.dataset} gives {format_shape(info.shape)}"
        )
    # The validation slice is fixed (seed 0), not tied to --seed: runs with different seeds are
    # selected on the same held-out images.
    kwargs: dict[str, Any] = dict(data_dir=config.data_dir, shape=input_shape,
                                  val_fraction=config.val_fraction, seed=0, stream=config.stream)
    train_data, val_data = load_train_val(config.dataset, **kwargs)
    check_compatible(config.model, input_shape, train_data)
    if len(val_data.class_names) != len(train_data.class_names):
        raise UsageError(f"dataset {config.dataset}: the validation split has classes "
                         f"{val_data.class_names}, the training split {train_data.class_names}")
    return train_data, val_data


# --- optimizer and schedule ------------------------------------------------------------------


def _make_optimizer(config: TrainConfig, params: list[nn.Parameter]) -> torch.optim.Optimizer:
    if config.optimizer == "sgd":
        return torch.optim.SGD(params, lr=config.lr, momentum=config.momentum,
                               nesterov=config.nesterov and config.momentum > 0,
                               weight_decay=config.weight_decay)
    if config.optimizer == "adam":
        return torch.optim.Adam(params, lr=config.lr, weight_decay=config.weight_decay)
    return torch.optim.AdamW(params, lr=config.lr, weight_decay=config.weight_decay)


def _make_schedule(config: TrainConfig, optimizer: torch.optim.Optimizer, steps: int
                   ) -> tuple[Any, bool]:
    """(scheduler or None, stepped per batch?)."""
    # +1: OneCycleLR counts its construction as step 0, and stepping past total_steps
    # extrapolates the last phase to a negative lr.
    total = config.epochs * steps + 1
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


# --- evaluation ------------------------------------------------------------------------------


def evaluate(
    model: nn.Module,
    data: ImageData | StreamedData | MemorySource | StreamSource,
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
    source = data if isinstance(data, _Source) else make_source(data, device)
    names = list(class_names if class_names is not None else getattr(data, "class_names", []))
    num_classes = len(names) if names else 0
    was_training = model.training
    model.eval()
    loss_sum = torch.zeros((), dtype=torch.float64, device=device)
    per_class_n = torch.zeros(max(num_classes, 1), dtype=torch.float64, device=device)
    per_class_ok = torch.zeros_like(per_class_n)
    with torch.inference_mode():
        for images, labels in source.eval_batches(batch_size, rank, world):
            x = prepare_batch(images.to(device, non_blocking=True), mean, std, size)
            if channels_last:
                x = x.contiguous(memory_format=torch.channels_last)
            labels = labels.to(device, non_blocking=True)
            with torch.autocast(device.type, dtype=autocast_dtype or torch.bfloat16,
                                enabled=autocast_dtype is not None):
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
    if world > 1:
        import torch.distributed as dist

        packed = torch.cat([loss_sum.view(1), per_class_n, per_class_ok])
        dist.all_reduce(packed)
        loss_sum, per_class_n, per_class_ok = packed[0], packed[1:1 + num_classes], \
            packed[1 + num_classes:]
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


# --- run directory files ---------------------------------------------------------------------


def new_run_dir(model: str, root: str | Path = "runs") -> Path:
    stamp = datetime.now().strftime("%Y%m%d-%H%M%S")
    base = Path(root) / f"{model}-{stamp}"
    path, i = base, 1
    while path.exists():
        path, i = base.with_name(f"{base.name}-{i}"), i + 1
    return path


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _write_metrics(run_dir: Path, history: list[EpochRecord]) -> None:
    buf = io.StringIO()
    columns = list(EpochRecord.__dataclass_fields__)
    writer = csv.DictWriter(buf, fieldnames=columns)
    writer.writeheader()
    for record in history:
        writer.writerow({k: (f"{v:.6g}" if isinstance(v, float) else v)
                         for k, v in record.to_dict().items()})
    _write_atomic(run_dir / "metrics.csv", buf.getvalue())


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
    return tuple(_to_tuple(v) for v in value) if isinstance(value, (list, tuple)) else value


def plot_curves(run_dir: Path, history: list[EpochRecord]) -> Path | None:
    """curves.png: loss and accuracy per epoch; skipped when matplotlib is not installed."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        log.info("matplotlib not installed: no curves.png")
        return None
    epochs = [r.epoch for r in history]
    fig, (ax_loss, ax_acc) = plt.subplots(1, 2, figsize=(10, 4))
    ax_loss.plot(epochs, [r.train_loss for r in history], "o-", label="train")
    ax_loss.plot(epochs, [r.val_loss for r in history], "o-", label="val")
    ax_loss.set(xlabel="epoch", ylabel="loss", title="loss")
    ax_acc.plot(epochs, [100 * r.train_acc for r in history], "o-", label="train")
    ax_acc.plot(epochs, [100 * r.val_acc for r in history], "o-", label="val")
    ax_acc.set(xlabel="epoch", ylabel="accuracy (%)", title="accuracy")
    for ax in (ax_loss, ax_acc):
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    path = run_dir / "curves.png"
    tmp = run_dir / ".curves.png.tmp"
    fig.savefig(tmp, dpi=100, format="png")
    plt.close(fig)
    os.replace(tmp, path)
    return path


# --- the loop --------------------------------------------------------------------------------


def train(config: TrainConfig, callbacks: Callbacks | None = None,
          resume: str | os.PathLike[str] | None = None) -> RunResult:
    """Train ``config.model`` on ``config.dataset``; write best.pt, last.pt, metrics.csv and
    config.json into the run directory. With ``resume`` (a run directory), continue from its
    last.pt with the configuration saved there."""
    started = time.perf_counter()
    callbacks = callbacks or Callbacks()
    resume_ckpt: dict[str, Any] | None = None
    if resume is not None:
        resume_ckpt = ckpt_io.load_checkpoint(Path(resume) / "last.pt")
        saved = TrainConfig.from_dict(resume_ckpt["config"])
        # Only how it runs may change on resume, never what it computes.
        config = saved.replace(out=str(resume), device=config.device, progress=config.progress,
                               tensorboard=config.tensorboard, plot=config.plot,
                               workers=config.workers)
    validate(config)
    rank, world, local_rank = _dist_env()
    is_main = rank == 0
    distributed = world > 1
    device, device_why = select_device(config.device, local_rank)
    if device.type == "cpu":
        # One process per core group: torchrun on a 2-core machine gives each rank one thread.
        torch.set_num_threads(max(1, _cpu_count() // int(os.environ.get("LOCAL_WORLD_SIZE", 1))))
    else:
        torch.backends.cudnn.benchmark = True  # fixed input shapes: pick the fastest conv once
    if distributed:
        import torch.distributed as dist

        if not dist.is_initialized():
            dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
        if device.type == "cuda":
            torch.cuda.set_device(device)
    if config.batch_size % world:
        raise UsageError(f"--batch-size {config.batch_size} (global) must be divisible by the "
                         f"{world} processes")
    local_batch = config.batch_size // world
    precision = resolve_precision(config, device)

    spec = get_spec(config.model)
    input_shape = spec.input_shape
    train_data, val_data = _load_data(config, input_shape)
    mean, std = list(train_data.mean), list(train_data.std)
    if len(mean) == 1 and input_shape[0] > 1:
        mean, std = mean * input_shape[0], std * input_shape[0]
    class_names = list(train_data.class_names)
    size = (input_shape[1], input_shape[2])

    torch.manual_seed(config.seed)
    random.seed(config.seed)
    model = build_model(config.model, num_classes=len(class_names), in_channels=input_shape[0])
    if resume_ckpt is not None:
        pass  # the weights come from last.pt below; the starting files may be gone by now
    elif config.state_dict:
        _load_start_weights(model, config)
    elif config.weights:
        skipped = ckpt_io.load_pretrained(model, config.weights, config.model)
        log.info("loaded %s; re-initialised (shape differs): %s", config.weights,
                 ", ".join(skipped) or "nothing")
    if config.freeze_features:
        for p in model.features.parameters():
            p.requires_grad_(False)
    model = model.to(device)
    if precision.channels_last:
        model = model.to(memory_format=torch.channels_last)

    train_src = make_source(train_data, device, config.workers)
    val_src = make_source(val_data, device, config.workers)
    steps = train_src.steps(local_batch, world)
    if config.max_steps_per_epoch:
        steps = min(steps, config.max_steps_per_epoch)
    if config.min_steps and resume_ckpt is None and config.epochs * steps < config.min_steps:
        epochs = -(-config.min_steps // steps)
        log.info("%d epochs of %d steps are fewer than the recipe's %d steps: %d epochs",
                 config.epochs, steps, config.min_steps, epochs)
        config = config.replace(epochs=epochs, min_steps=0)  # saved resolved: resume agrees
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = _make_optimizer(config, params)
    scheduler, per_step = _make_schedule(config, optimizer, steps)
    scaler = torch.amp.GradScaler(device.type, enabled=precision.grad_scaling)

    start_epoch, history, best_acc, best_epoch = 1, [], -1.0, 0
    if resume_ckpt is not None:
        ckpt_io.load_weights(model, resume_ckpt["state_dict"], config.model)
        optimizer.load_state_dict(resume_ckpt["optimizer"])
        if scheduler is not None and resume_ckpt.get("scheduler"):
            scheduler.load_state_dict(resume_ckpt["scheduler"])
        if resume_ckpt.get("scaler"):
            scaler.load_state_dict(resume_ckpt["scaler"])
        start_epoch = int(resume_ckpt["epoch"]) + 1
        history = [EpochRecord(**r) for r in resume_ckpt.get("history", [])]
        best_acc = float(resume_ckpt.get("best_val_acc", -1.0))
        best_epoch = int(resume_ckpt.get("best_epoch", 0))
        _set_rng_state(resume_ckpt.get("rng"), device)

    train_model: nn.Module = model
    if config.compile:
        train_model = torch.compile(model)
    if distributed:
        from torch.nn.parallel import DistributedDataParallel as DDP

        # DDP broadcasts rank 0's parameters and buffers here: all ranks start identical.
        train_model = DDP(train_model, device_ids=[device.index] if device.type == "cuda" else None)

    run_dir = Path(config.out) if config.out else new_run_dir(config.model)
    writer = None
    if is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
        _write_atomic(run_dir / "config.json", json.dumps(
            {**config.to_dict(), "resolved": {
                "device": str(device), "world_size": world, "per_process_batch": local_batch,
                "amp": precision.amp, "amp_dtype": str(precision.dtype) if precision.dtype else None,
                "channels_last": precision.channels_last, "torch": torch.__version__,
                "input_shape": list(input_shape), "mean": mean, "std": std,
                "class_names": class_names, "train_images": len(train_data),
                "val_images": len(val_data), "steps_per_epoch": steps}}, indent=2) + "\n")
        if config.tensorboard:
            writer = _tensorboard(run_dir, model, train_src, mean, std, size, precision, device)
        info = {"run_dir": str(run_dir), "device": device_why, "world_size": world,
                "model": config.model, "dataset": config.dataset, "train": len(train_data),
                "val": len(val_data), "classes": len(class_names), "steps_per_epoch": steps,
                "amp": str(precision.dtype).replace("torch.", "") if precision.amp else "off",
                "channels_last": precision.channels_last, "start_epoch": start_epoch,
                "config": config}
        log.debug("training %s on %s (%d train / %d val images) on %s", config.model,
                 config.dataset, len(train_data), len(val_data), device_why)
        if callbacks.on_start:
            callbacks.on_start(info)

    last_path, best_path = run_dir / "last.pt", run_dir / "best.pt"
    eval_batch = config.eval_batch_size or default_eval_batch(config.model)
    autocast_dtype = precision.dtype if precision.amp else None
    for epoch in range(start_epoch, config.epochs + 1):
        epoch_start = time.perf_counter()
        train_model.train()
        aug_gen = torch.Generator().manual_seed(config.seed * 1_000_003 + epoch + 7919 * (rank + 1))
        loss_sum = torch.zeros((), dtype=torch.float64, device=device)
        correct = torch.zeros((), dtype=torch.int64, device=device)
        seen = 0
        bar = _progress(steps, f"epoch {epoch}/{config.epochs}", enabled=config.progress and is_main)
        for step, (images, labels) in enumerate(
                train_src.batches(config.seed, epoch, local_batch, rank, world, steps)):
            if config.augment != "none":
                images = crop_flip(images, config.crop_padding, aug_gen,
                                   flip=config.augment == "crop-flip")
            x = prepare_batch(images, mean, std, size)
            if precision.channels_last:
                x = x.contiguous(memory_format=torch.channels_last)
            with torch.autocast(device.type, dtype=autocast_dtype or torch.bfloat16,
                                enabled=autocast_dtype is not None):
                logits = train_model(x)
                loss = F.cross_entropy(logits.float(), labels,
                                       label_smoothing=config.label_smoothing)
            optimizer.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
            scaler.step(optimizer)
            scaler.update()
            if scheduler is not None and per_step:
                scheduler.step()
            # Accumulated on the device: no host sync per step (it would stall a GPU's queue).
            loss_sum += loss.detach().double() * labels.shape[0]
            correct += (logits.detach().argmax(1) == labels).sum()
            seen += labels.shape[0]
            if bar is not None:
                bar.update(1)
                if step % 20 == 0 or step == steps - 1:
                    elapsed = time.perf_counter() - epoch_start
                    bar.set_postfix(loss=f"{loss_sum.item() / seen:.4f}",
                                    acc=f"{100 * correct.item() / seen:.2f}%",
                                    img_s=f"{seen * world / max(elapsed, 1e-9):.0f}")
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        train_s = time.perf_counter() - epoch_start
        if bar is not None:
            bar.close()
        totals = torch.stack([loss_sum, correct.double(),
                              torch.tensor(float(seen), dtype=torch.float64, device=device)])
        if distributed:
            import torch.distributed as dist

            dist.all_reduce(totals)
        lr_now = optimizer.param_groups[0]["lr"]
        if scheduler is not None and not per_step:
            scheduler.step()
        val = evaluate(model, val_src, mean, std, device, eval_batch, size=size,
                       class_names=class_names, channels_last=precision.channels_last,
                       autocast_dtype=autocast_dtype, rank=rank, world=world)
        record = EpochRecord(
            epoch=epoch, train_loss=float(totals[0] / totals[2]),
            train_acc=float(totals[1] / totals[2]), val_loss=val["loss"], val_acc=val["accuracy"],
            lr=lr_now, images_per_s=float(totals[2]) / train_s,
            epoch_s=time.perf_counter() - epoch_start, elapsed_s=time.perf_counter() - started)
        history.append(record)
        improved = record.val_acc > best_acc
        if improved:
            best_acc, best_epoch = record.val_acc, epoch
        if is_main:
            checkpoint = ckpt_io.make_checkpoint(
                model=model, model_name=config.model, num_classes=len(class_names),
                in_channels=input_shape[0], input_shape=input_shape, mean=mean, std=std,
                class_names=class_names, dataset=config.dataset, epoch=epoch,
                metrics=record.to_dict(), config=config.to_dict(),
                optimizer=optimizer.state_dict(),
                scheduler=scheduler.state_dict() if scheduler is not None else None,
                scaler=scaler.state_dict() if precision.grad_scaling else None,
                rng=_rng_state(device),
                extra={"history": [r.to_dict() for r in history], "best_val_acc": best_acc,
                       "best_epoch": best_epoch, "world_size": world})
            ckpt_io.save_checkpoint(checkpoint, last_path)
            if improved:
                ckpt_io.link_or_copy(last_path, best_path)
            _write_metrics(run_dir, history)
            if writer is not None:
                for tag, value in (("loss/train", record.train_loss), ("loss/val", record.val_loss),
                                   ("accuracy/train", record.train_acc),
                                   ("accuracy/val", record.val_acc), ("lr", record.lr),
                                   ("images_per_s", record.images_per_s)):
                    writer.add_scalar(tag, value, epoch)
                writer.flush()
            if callbacks.on_epoch_end:
                callbacks.on_epoch_end(record, model)
    if is_main:
        if writer is not None:
            writer.close()
        if config.plot and history:
            plot_curves(run_dir, history)
    if distributed:
        import torch.distributed as dist

        dist.barrier()
    return RunResult(run_dir=run_dir, best_path=best_path, last_path=last_path,
                     best_epoch=best_epoch, best_val_acc=best_acc, history=history,
                     device=str(device), config=config, model=model)


def _progress(total: int, desc: str, enabled: bool) -> Any:
    if not enabled:
        return None
    from tqdm import tqdm

    return tqdm(total=total, desc=desc, unit="batch", leave=False, dynamic_ncols=True)


def _load_start_weights(model: nn.Module, config: TrainConfig) -> None:
    """--state-dict F: a seed's bare state_dict (or a cnnctl checkpoint) as the starting point."""
    assert config.state_dict is not None
    raw = ckpt_io.import_state_dict(config.state_dict, config.model)
    try:
        ckpt_io.load_weights(model, raw["state_dict"], config.model)
    except CheckpointError as exc:
        raise CheckpointError(f"--state-dict {config.state_dict}: {exc}") from None


def _tensorboard(run_dir: Path, model: nn.Module, source: MemorySource | StreamSource,
                 mean: list[float],
                 std: list[float], size: tuple[int, int], precision: Precision,
                 device: torch.device) -> Any:
    """Scalars every epoch, plus once: a grid of sample inputs and the model graph (seed 004)."""
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError as exc:
        raise UsageError(f"--tensorboard needs the tensorboard package ({exc}); "
                         f"pip install tensorboard") from None
    writer = SummaryWriter(log_dir=str(run_dir))
    images = source.sample(32)
    grid = images.float().div(255)
    if tuple(grid.shape[-2:]) != size:
        grid = F.interpolate(grid, size=size, mode="bilinear", align_corners=False)
    writer.add_images("inputs", grid.cpu(), 0)
    sample = prepare_batch(images[:2], mean, std, size)
    if precision.channels_last:
        sample = sample.contiguous(memory_format=torch.channels_last)
    try:
        import warnings

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


def default_eval_batch(model_name: str) -> int:
    """1024 images of 28×28, scaled down by pixel count (vgg16 at 224×224: 16)."""
    c, h, w = get_spec(model_name).input_shape
    return max(8, min(1024, int(1024 * 28 * 28 / (h * w))))
