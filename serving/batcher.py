"""Per-model dynamic batching: a bounded queue, merged executions, results split back.

Requests (each an (n, C, H, W) array, n >= 1) wait in a FIFO. Whenever an instance is free, the
queued requests are merged, oldest first, up to ``max_batch_size`` images; a request is never
split (the codec refuses one larger than that). While the instances are busy the queue fills by
itself, so under load batches form without any added delay. A batch not yet full may be held back: for
``max_queue_delay_ms`` after its oldest request, or while gathering (serving/policies.py) waits
for company. Requests whose deadline passed while queued are answered DEADLINE_EXCEEDED without
being computed; cancelled ones are skipped.

Callbacks, not a dispatcher task: under load the event loop, not the model, is the bottleneck (a
gRPC call costs the loop several times what a small model's image costs), so the batcher adds as
few loop steps as it can. Dispatch is a ``call_soon`` callback, which lets every handler already
runnable in this loop iteration enqueue first; a run in the pool completes with one more callback.
Cheap batches run on the loop itself (InlinePolicy), and a cheap request that finds the model idle
is computed at once in ``submit``, without suspending its caller. All state is touched only on the
loop.
"""

from __future__ import annotations

import asyncio
import functools
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import Executor
from dataclasses import dataclass
from typing import Protocol

import numpy as np

from cnnctl.errors import CnnctlError, DeadlineExceededError, OverloadedError, UnavailableError
from cnnctl.serving.config import BatchingConfig
from cnnctl.serving.policies import Gathering, InlinePolicy


class BatchObserver(Protocol):
    def queue_depth(self, depth: int) -> None: ...
    def queued_for(self, seconds: float) -> None: ...
    def executed(self, images: int, seconds: float, requests: int) -> None: ...


class _NoObserver:
    def queue_depth(self, depth: int) -> None:
        pass

    def queued_for(self, seconds: float) -> None:
        pass

    def executed(self, images: int, seconds: float, requests: int) -> None:
        pass


@dataclass(eq=False, slots=True)
class _Pending:
    inputs: np.ndarray
    n: int  # images: inputs.shape[0]
    future: asyncio.Future[np.ndarray]
    enqueued: float  # loop.time()
    deadline: float | None  # loop.time(); None = no deadline


Result = tuple[np.ndarray, float, float]  # output, wall seconds, CPU seconds of the running thread


class Batcher:
    def __init__(self, name: str, run: Callable[[np.ndarray], np.ndarray], config: BatchingConfig,
                 executor: Executor | None = None, instances: int = 1,
                 observer: BatchObserver | None = None) -> None:
        """``run`` is blocking (it computes one merged batch); it runs in ``executor``, or on the
        loop thread when InlinePolicy finds the batch cheap enough."""
        self.name = name
        self._run = run
        self._executor = executor
        self._max_queue = config.max_queue_size
        self._max = config.max_batch_size if config.enabled else 1
        self._delay = config.max_queue_delay_ms / 1000.0 if config.enabled else 0.0
        self._instances = max(1, instances)
        self._free = self._instances
        self._observer = observer or _NoObserver()
        self._inline = InlinePolicy(config.inline_below_us / 1e6,
                                    config.inline_full_below_us / 1e6, config.max_batch_size)
        self._gathering = Gathering(config.gather_max_ms / 1000.0 if config.enabled else 0.0,
                                    self._max)
        self._queue: deque[_Pending] = deque()
        self._queued_images = 0
        self._reserved = 0  # places held for requests still being prepared (reserve())
        self._loop: asyncio.AbstractEventLoop | None = None
        self._scheduled = False  # a _dispatch call_soon is pending
        self._timer: asyncio.TimerHandle | None = None  # a _dispatch when a held batch is due
        self._idle = asyncio.Event()
        self._idle.set()
        self._closing = False
        self._closed_because = "the server is shutting down"
        # Set while another version of the model finishes what it took in (hold_until): requests
        # queue, none is computed, so answers switch from the old version to this one at once.
        self._held: asyncio.Future[object] | None = None

    def start(self) -> None:
        self._loop = asyncio.get_running_loop()

    @property
    def depth(self) -> int:
        return len(self._queue)

    def reserve(self) -> None:
        """Hold a place in the queue for a request that needs preparing first (encoded images
        to decode): it counts toward the queue bound from now on. Pass ``reserved=True`` to its
        ``submit``, or call ``release`` if it never comes."""
        self._admit()
        self._reserved += 1
        self._idle.clear()

    def release(self) -> None:
        self._reserved -= 1
        self._check_idle()

    def hold_until(self, done: asyncio.Future[object]) -> None:
        """Queue requests but compute none until ``done`` completes (a swap: the version being
        replaced drains first)."""
        self._held = done
        done.add_done_callback(self._release_hold)

    def _release_hold(self, done: asyncio.Future[object]) -> None:
        if self._held is done:
            self._held = None
            if self._loop is not None:
                self._schedule()

    def _admit(self) -> None:
        if self._closing:
            raise UnavailableError(f"{self._closed_because}; not accepting new requests")
        if len(self._queue) + self._reserved >= self._max_queue:
            raise OverloadedError(
                f"model '{self.name}' queue is full ({self._max_queue} requests waiting); retry "
                f"later or raise --max-queue-size")

    async def submit(self, inputs: np.ndarray, deadline: float | None = None,
                     reserved: bool = False) -> np.ndarray:
        """Queue one request and wait for its rows of the batch output. ``reserved``: its place
        was held by ``reserve`` (and is given back now, whatever happens)."""
        if reserved:  # admitted already: computed even if the batcher closed since
            self._reserved -= 1
        else:
            self._admit()
        if self._loop is None:
            self.start()
        loop = self._loop
        assert loop is not None
        images = int(inputs.shape[0])
        now = loop.time()
        gathering = self._gathering
        begun = False
        if (not self._queue and self._free > 0 and self._delay == 0.0 and self._held is None
                and self._inline.cheap(images) and (deadline is None or deadline > now)):
            begun = gathering.begin(images, now)
            if not begun:  # nothing to wait for: compute it now, in the caller's loop step
                self._observer.queued_for(0.0)
                return self._run_now(inputs, images)
        pending = _Pending(inputs, images, loop.create_future(), now, deadline)
        self._queue.append(pending)
        self._queued_images += images
        self._idle.clear()
        if gathering.active:
            gathering.arrived(now, deadline)
            if begun:
                self._timer = loop.call_at(gathering.due(), self._dispatch)
        self._schedule()
        if not self._scheduled:  # else the dispatch, later in this loop iteration, reports it
            self._observer.queue_depth(len(self._queue))
        return await pending.future

    def close(self, reason: str = "") -> None:
        """Stop accepting requests; everything already queued (or reserved) is still computed.
        ``reason``: what a refused request is told."""
        self._closing = True
        if reason:
            self._closed_because = reason
        if self._loop is not None:
            self._schedule()
        self._check_idle()

    async def drain(self, reason: str = "") -> None:
        """close(), then wait until the queue is empty, every execution has finished and every
        reserved request has come and gone."""
        self.close(reason)
        await self._idle.wait()

    # -- on the event loop only
    def _schedule(self) -> None:
        if self._free == 0 or not self._queue or self._held is not None:
            return
        if self._timer is not None:
            if self._queued_images < self._max and not self._closing:
                return  # a held batch: the timer dispatches it
            self._timer.cancel()
            self._timer = None
        if not self._scheduled:
            self._scheduled = True
            self._loop.call_soon(self._dispatch)  # type: ignore[union-attr]

    def _held_until(self, now: float) -> float:
        """When the batch at the head of the queue, not full, an instance free, may go."""
        if self._gathering.active:
            return self._gathering.due()
        if self._delay > 0:
            return self._queue[0].enqueued + self._delay
        return now

    def _dispatch(self) -> None:
        """Launch what the free instances can take (a call_soon, or a held batch's timer)."""
        self._scheduled = False
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        loop = self._loop
        assert loop is not None
        while self._free > 0 and self._queue and self._held is None:
            now = loop.time()
            if self._queued_images < self._max and not self._closing:
                due = self._held_until(now)
                if due > now:
                    self._timer = loop.call_at(due, self._dispatch)
                    break
            gathered = self._gathering.active
            if gathered:
                self._gathering.end(min(self._queued_images, self._max), now)
            batch, images = self._take(now)
            if batch:  # a gathered batch counts as full: it went because nothing more came
                self._launch(batch, images, full=gathered)
        self._observer.queue_depth(len(self._queue))
        self._check_idle()

    def _take(self, now: float) -> tuple[list[_Pending], int]:
        batch: list[_Pending] = []
        images = 0
        while self._queue:
            p = self._queue[0]
            if p.future.done():  # cancelled by its caller while queued
                self._pop()
                continue
            if p.deadline is not None and p.deadline <= now:
                self._pop()
                p.future.set_exception(DeadlineExceededError(
                    f"deadline passed after {1000 * (now - p.enqueued):.1f} ms in model "
                    f"'{self.name}' queue; not computed"))
                continue
            if batch and images + p.n > self._max:
                break
            self._pop()
            batch.append(p)
            images += p.n
            self._observer.queued_for(now - p.enqueued)
            if images >= self._max:
                break
        return batch, images

    def _pop(self) -> None:
        p = self._queue.popleft()
        self._queued_images -= p.n

    def _execute(self, x: np.ndarray) -> Result:
        wall, cpu = time.perf_counter(), time.thread_time()
        y = self._run(x)
        return y, time.perf_counter() - wall, time.thread_time() - cpu

    def _run_now(self, x: np.ndarray, images: int) -> np.ndarray:
        """One request computed on the loop at once: no queue entry and no future, since this is
        every request's path under light load."""
        self._free -= 1
        try:
            y, seconds, cpu = self._execute(x)
        finally:
            self._free += 1
            if self._reserved == 0 and self._closing:
                self._check_idle()  # a reserved request computed at once (drain waits for it)
        self._check_rows(y, images)
        self._account(images, 1, seconds, cpu)
        return y

    def _launch(self, batch: list[_Pending], images: int, full: bool) -> None:
        """Merge and run one batch, in the pool or inline; a failure (the merge's included) goes
        to this batch's waiters only."""
        self._free -= 1
        try:
            x = batch[0].inputs if len(batch) == 1 else np.concatenate([p.inputs for p in batch])
            if not self._inline.cheap(images, full):
                future = self._loop.run_in_executor(  # type: ignore[union-attr]
                    self._executor, self._execute, x)
                future.add_done_callback(functools.partial(self._finish, batch, images))
                return
            result = self._execute(x)
        except Exception as exc:  # noqa: BLE001 - delivered to this batch's waiters
            self._free += 1
            self._fail(batch, exc)
            return
        self._free += 1
        self._deliver(batch, images, result)  # _dispatch, our caller, goes on with the queue

    def _finish(self, batch: list[_Pending], images: int, future: asyncio.Future[Result]) -> None:
        self._free += 1
        exc = future.exception() if not future.cancelled() else asyncio.CancelledError()
        if exc is not None:
            self._fail(batch, exc)
        else:
            self._deliver(batch, images, future.result())
        self._schedule()
        self._check_idle()

    @staticmethod
    def _fail(batch: list[_Pending], exc: BaseException) -> None:
        for p in batch:
            if not p.future.done():
                p.future.set_exception(exc)

    def _deliver(self, batch: list[_Pending], images: int, result: Result) -> None:
        """Each request its rows; a failure here too goes to this batch's waiters only."""
        y, seconds, cpu = result
        try:
            self._check_rows(y, images)
            self._account(images, len(batch), seconds, cpu)
            offset = 0
            for p in batch:
                if not p.future.done():
                    p.future.set_result(y if len(batch) == 1 else y[offset:offset + p.n])
                offset += p.n
        except Exception as exc:  # noqa: BLE001 - delivered to this batch's waiters
            self._fail(batch, exc)

    def _check_rows(self, y: np.ndarray, images: int) -> None:
        if y.shape[:1] != (images,):  # split back, it would give requests the wrong rows
            raise CnnctlError(f"model '{self.name}' returned output of shape {list(y.shape)} "
                              f"for a batch of {images} images")

    def _account(self, images: int, requests: int, seconds: float, cpu: float) -> None:
        self._observer.executed(images, seconds, requests)
        self._inline.ran(images, cpu)

    def _check_idle(self) -> None:
        if not self._queue and self._free == self._instances and self._reserved == 0:
            self._idle.set()
