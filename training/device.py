"""Where a run executes and at what precision: the device, torchrun's ranks, autocast, memory
format.

Under torchrun (WORLD_SIZE > 1) every process calls ``place`` and joins one process group; sums
across ranks go through ``sum_across_ranks`` so that a single process never touches
torch.distributed.
"""

from __future__ import annotations

import logging
import os
from contextlib import AbstractContextManager
from dataclasses import dataclass
from typing import Any

import torch

from cnnctl import malloc
from cnnctl.errors import UsageError
from cnnctl.training.config import TrainConfig

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Placement:
    """This process's device and its place among torchrun's processes."""

    device: torch.device
    description: str  # the device and why it was chosen, for the user
    rank: int
    world: int  # number of processes

    @property
    def is_main(self) -> bool:
        """Rank 0: the only process that writes files or prints."""
        return self.rank == 0


def place(config: TrainConfig) -> Placement:
    """Pick the device, size the CPU thread pool, and join torchrun's process group if there is
    one."""
    rank, world = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    device, description = select_device(config.device, int(os.environ.get("LOCAL_RANK", 0)))
    if device.type == "cpu":
        # One process per core group: torchrun on a 2-core machine gives each rank one thread.
        torch.set_num_threads(max(1, cpu_count() // int(os.environ.get("LOCAL_WORLD_SIZE", 1))))
        keep_freed_memory()
    else:
        torch.backends.cudnn.benchmark = True  # fixed input shapes: pick the fastest conv once
    if world > 1:
        import torch.distributed as dist

        if not dist.is_initialized():
            _join_process_group(dist, "nccl" if device.type == "cuda" else "gloo")
        if device.type == "cuda":
            torch.cuda.set_device(device)
    return Placement(device, description, rank, world)


def keep_freed_memory() -> bool:
    """Keep freed blocks of up to 32 MiB in the heap (cnnctl/malloc.py): a training step frees and
    re-allocates the same activation buffers (MBs each), and with glibc's defaults every step maps
    them afresh and page-faults on each 4 KiB page (resnet-mini at batch 256: 2.4 M page faults, a
    fifth of the CPU time, in two MNIST epochs). False where the C library is not glibc."""
    return malloc.keep_freed_memory(32 << 20, 1 << 30)


def _join_process_group(dist: Any, backend: str) -> None:
    """``init_process_group`` from torchrun's environment, with the store's keys kept apart per
    restart: after ``--max-restarts`` brought a worker group back, the restarted ranks otherwise
    read the previous group's addresses from torchrun's store (connection refused, or a hang),
    and the restart never trains."""
    restart = os.environ.get("TORCHELASTIC_RESTART_COUNT")
    if restart is None:
        dist.init_process_group(backend=backend)
        return
    store, rank, world = next(dist.rendezvous("env://"))
    dist.init_process_group(backend=backend, store=dist.PrefixStore(f"cnnctl/restart-{restart}",
                                                                    store),
                            rank=rank, world_size=world)


def select_device(requested: str = "auto", local_rank: int = 0) -> tuple[torch.device, str]:
    """The device to use and a sentence saying why."""
    has_cuda = torch.cuda.is_available()
    if requested == "cuda" and not has_cuda:
        raise UsageError("--device cuda: no CUDA device is available here; use --device cpu or auto")
    if requested in ("cuda", "auto") and has_cuda:
        device = torch.device("cuda", local_rank % torch.cuda.device_count())
        return device, f"{device} ({torch.cuda.get_device_name(device)})"
    why = "no CUDA device found" if requested == "auto" else "as requested"
    return torch.device("cpu"), f"cpu ({cpu_count()} cores, {why})"


def cpu_count() -> int:
    """Cores this process may run on (a container's or taskset's limit, not the machine's)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def sum_across_ranks(tensor: torch.Tensor, world: int) -> torch.Tensor:
    """``tensor`` summed over all processes, in place; unchanged in a single process."""
    if world > 1:
        import torch.distributed as dist

        dist.all_reduce(tensor)
    return tensor


def wait_for_all_ranks(world: int) -> None:
    if world > 1:
        import torch.distributed as dist

        dist.barrier()


# --- precision -------------------------------------------------------------------------------


def cpu_bf16_native() -> bool:
    """oneDNN has bf16 kernels for this CPU (native with AVX-512 BF16 / AMX, emulated with plain
    AVX-512); without them bf16 autocast falls back to slow reference code."""
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
    dtype: torch.dtype | None  # the autocast dtype; None when amp is off
    grad_scaling: bool  # fp16 needs loss scaling; bf16 has fp32's range and does not
    channels_last: bool


def resolve_precision(config: TrainConfig, device: torch.device) -> Precision:
    cuda = device.type == "cuda"
    # bf16 autocast made resnet-mini training slower on this project's CPU (docs/training.md),
    # so CPU autocast is opt-in (--amp).
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
    # channels_last: faster for resnet-mini on the CPU (docs/training.md), and the layout cuDNN's
    # tensor-core kernels want.
    channels_last = config.channels_last if config.channels_last is not None else True
    return Precision(amp, dtype, bool(amp and dtype == torch.float16), channels_last)


def autocast(device: torch.device, dtype: torch.dtype | None) -> AbstractContextManager[None]:
    """Autocast to ``dtype`` on ``device``; a no-op when ``dtype`` is None."""
    return torch.autocast(device.type, dtype=dtype or torch.bfloat16, enabled=dtype is not None)
