"""Per-model dynamic batching: a bounded queue, merged executions, results split back.

Requests (each an (n, C, H, W) array, n >= 1) wait in a FIFO. Whenever an instance slot is free,
the queued requests are merged, oldest first, up to ``max_batch_size`` images; if the batch is not
full the oldest request may wait up to ``max_queue_delay`` for company. While the instances are
busy the queue fills by itself, so under load batches form without any added delay. A request is
never split: one larger than ``max_batch_size`` runs alone. Requests whose deadline passed while
queued are answered DEADLINE_EXCEEDED without being computed; cancelled ones are skipped.

All state is touched only from the event loop; the model itself runs in its thread pool.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Protocol

import numpy as np

from cnnctl.errors import DeadlineExceededError, OverloadedError, UnavailableError
from cnnctl.serving.config import BatchingConfig

log = logging.getLogger(__name__)


class BatchObserver(Protocol):
    def queue_depth(self, depth: int) -> None: ...
    def queued_for(self, seconds: float) -> None: ...
    def executed(self, images: int, seconds: float) -> None: ...


class _NoObserver:
    def queue_depth(self, depth: int) -> None:
        pass

    def queued_for(self, seconds: float) -> None:
        pass

    def executed(self, images: int, seconds: float) -> None:
        pass


@dataclass(eq=False)
class _Pending:
    inputs: np.ndarray
    future: asyncio.Future[np.ndarray]
    enqueued: float  # loop.time()
    deadline: float | None  # loop.time(); None = no deadline
    n: int = field(init=False)

    def __post_init__(self) -> None:
        self.n = int(self.inputs.shape[0])


class Batcher:
    def __init__(self, name: str, run: Callable[[np.ndarray], Awaitable[np.ndarray]],
                 config: BatchingConfig, instances: int = 1,
                 observer: BatchObserver | None = None) -> None:
        self.name = name
        self._run = run
        self._config = config
        self._max = config.max_batch_size if config.enabled else 1
        self._delay = config.max_queue_delay_ms / 1000.0 if config.enabled else 0.0
        self._instances = max(1, instances)
        self._observer = observer or _NoObserver()
        self._queue: deque[_Pending] = deque()
        self._queued_images = 0
        self._wakeup = asyncio.Event()
        self._slots = asyncio.Semaphore(self._instances)
        self._running: set[asyncio.Task[None]] = set()
        self._loop_task: asyncio.Task[None] | None = None
        self._closing = False
        self.deadline_dropped = 0

    def start(self) -> None:
        if self._loop_task is None:
            self._loop_task = asyncio.get_running_loop().create_task(
                self._dispatch_loop(), name=f"batcher-{self.name}")

    @property
    def depth(self) -> int:
        return len(self._queue)

    async def submit(self, inputs: np.ndarray, deadline: float | None = None) -> np.ndarray:
        """Queue one request and wait for its rows of the batch output."""
        if self._closing:
            raise UnavailableError("the server is shutting down; not accepting new requests")
        if len(self._queue) >= self._config.max_queue_size:
            raise OverloadedError(
                f"model '{self.name}' queue is full ({self._config.max_queue_size} requests "
                f"waiting); retry later or raise --max-queue-size")
        loop = asyncio.get_running_loop()
        pending = _Pending(inputs, loop.create_future(), loop.time(), deadline)
        self._queue.append(pending)
        self._queued_images += pending.n
        self._observer.queue_depth(len(self._queue))
        self._wakeup.set()
        return await pending.future

    def close(self) -> None:
        """Stop accepting requests; everything already queued is still computed."""
        self._closing = True
        self._wakeup.set()

    async def drain(self) -> None:
        """close(), then wait until the queue is empty and every execution has finished."""
        self.close()
        if self._loop_task is not None:
            await self._loop_task
        while self._running:
            await asyncio.gather(*self._running, return_exceptions=True)

    async def _dispatch_loop(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            await self._slots.acquire()
            while not self._queue:
                if self._closing:
                    self._slots.release()
                    return
                self._wakeup.clear()
                await self._wakeup.wait()
            # Not full yet and an instance is free: let the oldest wait up to the delay for company.
            while self._delay > 0 and self._queued_images < self._max and not self._closing:
                remaining = self._queue[0].enqueued + self._delay - loop.time()
                if remaining <= 0:
                    break
                self._wakeup.clear()
                try:
                    await asyncio.wait_for(self._wakeup.wait(), remaining)
                except TimeoutError:
                    break
            batch = self._take(loop.time())
            self._observer.queue_depth(len(self._queue))
            if not batch:
                self._slots.release()
                continue
            task = loop.create_task(self._execute(batch))
            self._running.add(task)
            task.add_done_callback(self._running.discard)

    def _take(self, now: float) -> list[_Pending]:
        batch: list[_Pending] = []
        images = 0
        while self._queue:
            p = self._queue[0]
            if p.future.done():  # cancelled by its caller while queued
                self._pop()
                continue
            if p.deadline is not None and p.deadline <= now:
                self._pop()
                self.deadline_dropped += 1
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
        return batch

    def _pop(self) -> None:
        p = self._queue.popleft()
        self._queued_images -= p.n

    async def _execute(self, batch: list[_Pending]) -> None:
        try:
            x = batch[0].inputs if len(batch) == 1 else np.concatenate([p.inputs for p in batch])
            start = time.perf_counter()
            y = await self._run(x)
            self._observer.executed(int(x.shape[0]), time.perf_counter() - start)
            offset = 0
            for p in batch:
                if not p.future.done():
                    p.future.set_result(y[offset:offset + p.n])
                offset += p.n
        except Exception as exc:  # noqa: BLE001 - every waiter gets the failure, the loop goes on
            for p in batch:
                if not p.future.done():
                    p.future.set_exception(exc)
        finally:
            self._slots.release()
