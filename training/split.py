"""Each CPU training step's batch split across the cores: one slice per thread, gradients summed.

With a small network the convolutions of one step are too small for oneDNN's intra-op threads to
share well: resnet-mini at batch 64 on this project's 2-core EPYC trains at 4,150 img/s on one
thread and only 5,270 on two (1.27×). Cut in two, the batch runs as two single-threaded halves at
the same time, one per core, each backpropagating its own slice with ``torch.autograd.grad``;
their gradients are summed in slice order and the optimizer takes one step on the sum
(docs/training.md has the measurements).

The step computes what the whole batch computes: the loss is the batch mean (each slice's sum
divided by the whole batch's size), so the summed gradients are the whole batch's, up to float
rounding (the sums run in another order). That holds only for a model whose slices do not see
each other: BatchNorm's batch statistics would be per slice and its running statistics updated
from two threads at once, and dropout would draw its masks from one generator in whichever order
the threads came; such models train unsplit (``plan_split`` says why). Fixed slices, a fixed
order of summing, and a fixed thread count per slice keep a run reproducible: resumed on the same
machine, a run ends where an uninterrupted one does. (On another core count the slices, like the
intra-op threads of an unsplit run, sum in another order; ``--no-cpu-split`` and ``--cpu-split``
may be given again on resume: how a run computes, not what.)
"""

from __future__ import annotations

import concurrent.futures
import contextlib
from dataclasses import dataclass
from typing import Callable, Iterator

import torch
import torch.nn.functional as F
from torch import nn

from cnnctl.errors import UsageError

# A slice smaller than this costs more in per-op overhead than its core gains.
MIN_SLICE = 16

_SLICE_UNSAFE = (nn.modules.batchnorm._BatchNorm, nn.modules.dropout._DropoutNd,
                 nn.modules.dropout.AlphaDropout, nn.modules.dropout.FeatureAlphaDropout)


@dataclass(frozen=True)
class SplitPlan:
    """How a step's batch is split: ``slices`` (1: not split) with ``threads_per_slice`` intra-op
    threads each, and why when it is not split."""

    slices: int
    threads_per_slice: int
    reason: str = ""


def plan_split(requested: bool | None, *, device: torch.device, world: int, threads: int,
               batch: int, model: nn.Module, amp: bool, compiled: bool) -> SplitPlan:
    """Whether, and how many ways, to split: ``requested`` None decides by itself (split where it
    is exact and there are cores to use), True insists (a UsageError saying why it cannot), False
    keeps the batch whole."""
    if requested is False:
        return SplitPlan(1, threads, "--no-cpu-split")
    why = _why_not(device, world, threads, batch, model, amp, compiled)
    if why:
        if requested:
            raise UsageError(f"--cpu-split: {why}")
        return SplitPlan(1, threads, why)
    slices = _slices(threads, batch)
    return SplitPlan(slices, threads // slices)  # slices divides threads


def _slices(threads: int, batch: int) -> int:
    """As many slices as the batch allows that divide the cores evenly (6 cores, batch 64: 3
    slices of 2 threads, not 4 of 1 with 2 cores idle)."""
    most = max(1, min(threads, batch // MIN_SLICE))
    return max(k for k in range(1, most + 1) if threads % k == 0)


def _why_not(device: torch.device, world: int, threads: int, batch: int, model: nn.Module,
             amp: bool, compiled: bool) -> str:
    if device.type != "cpu":
        return f"splits CPU steps only (the device is {device.type})"
    if world > 1:
        return f"{world} processes already share the cores"
    if threads < 2:
        return "one core: nothing to split across"
    if batch < 2 * MIN_SLICE:
        return f"batch {batch} is under {2 * MIN_SLICE} ({MIN_SLICE} images per slice at least)"
    if _slices(threads, batch) == 1:
        return (f"batch {batch} does not cut into slices of {MIN_SLICE}+ images that share the "
                f"{threads} cores evenly")
    unsafe = sorted({type(m).__name__ for m in model.modules() if isinstance(m, _SLICE_UNSAFE)})
    if unsafe:
        return (f"{', '.join(unsafe)} would see per-slice batches or draw masks out of order; "
                "this model trains unsplit")
    if any(True for _ in model.buffers()):
        return "the model has buffers, which slices running at once could both update"
    if amp:
        return "autocast is per thread and --amp is on"
    if compiled:
        return "--compile traces one whole-batch graph"
    return ""


class BatchSplit:
    """Runs one step's forward and backward as ``plan.slices`` slices at once; the main thread
    takes the first. Use as a context manager (it owns worker threads)."""

    def __init__(self, model: nn.Module, plan: SplitPlan) -> None:
        self.model = model
        self.plan = plan
        self.params = [p for p in model.parameters() if p.requires_grad]
        self._pool = concurrent.futures.ThreadPoolExecutor(
            plan.slices - 1, thread_name_prefix="cnnctl-slice",
            # Each thread has its own OpenMP thread count; a new one starts at all the cores.
            initializer=torch.set_num_threads, initargs=(plan.threads_per_slice,))

    def __enter__(self) -> "BatchSplit":
        return self

    def __exit__(self, *exc: object) -> None:
        self._pool.shutdown(wait=True)

    @contextlib.contextmanager
    def stepping(self) -> Iterator[None]:
        """While training steps run: the main thread, which runs the first slice, on its share
        of the cores (evaluation between epochs has them all again)."""
        before = torch.get_num_threads()
        torch.set_num_threads(self.plan.threads_per_slice)
        try:
            yield
        finally:
            torch.set_num_threads(before)

    def backward(self, x: torch.Tensor, labels: torch.Tensor, label_smoothing: float,
                 prepare: Callable[[torch.Tensor], torch.Tensor] | None = None
                 ) -> tuple[torch.Tensor, torch.Tensor]:
        """Set each parameter's ``.grad`` to the whole batch's mean-loss gradient; return the
        batch's logits and mean loss (detached), as one unsplit step would have them.
        ``prepare`` (per-element, e.g. uint8 images to the model's normalised input) runs on each
        slice in its own thread."""
        n = labels.shape[0]
        xs, ys = x.tensor_split(self.plan.slices), labels.tensor_split(self.plan.slices)
        parts = [(xi, yi) for xi, yi in zip(xs, ys) if yi.shape[0]]
        futures = [self._pool.submit(self._slice, xi, yi, n, label_smoothing, prepare)
                   for xi, yi in parts[1:]]
        results = [self._slice(*parts[0], n, label_smoothing, prepare)]
        results += [f.result() for f in futures]
        grads = list(results[0][2])
        for _, _, more in results[1:]:  # in slice order: the same sums every run
            for i, g in enumerate(more):
                if g is not None:
                    grads[i] = g if grads[i] is None else grads[i] + g
        for p, g in zip(self.params, grads):
            p.grad = g
        logits = torch.cat([r[0] for r in results]) if len(results) > 1 else results[0][0]
        return logits, sum((r[1] for r in results[1:]), results[0][1])

    def _slice(self, x: torch.Tensor, labels: torch.Tensor, n: int, label_smoothing: float,
               prepare: Callable[[torch.Tensor], torch.Tensor] | None
               ) -> tuple[torch.Tensor, torch.Tensor, tuple[torch.Tensor | None, ...]]:
        logits = self.model(prepare(x) if prepare is not None else x)
        loss = F.cross_entropy(logits.float(), labels, reduction="sum",
                               label_smoothing=label_smoothing) / n
        grads = torch.autograd.grad(loss, self.params, allow_unused=True)
        return logits.detach(), loss.detach(), grads
