"""Per-model dynamic batching: a bounded queue, merged executions, results split back.

Requests (each an (n, C, H, W) array, n >= 1) wait in a FIFO. Whenever an instance is free, the
queued requests are merged, oldest first, up to ``max_batch_size`` images; if the batch is not full
the oldest request may wait up to ``max_queue_delay`` for company. While the instances are busy the
queue fills by itself, so under load batches form without any added delay. A request is never
split: one larger than ``max_batch_size`` runs alone. Requests whose deadline passed while queued
are answered DEADLINE_EXCEEDED without being computed; cancelled ones are skipped.

Why callbacks and not a dispatcher task: under load the event loop, not the model, is the
bottleneck (a gRPC call costs ~450 µs of the loop thread, a lenet5 image ~70 µs of ORT), so the
batcher must add as few loop steps as it can. Dispatch is a plain ``call_soon`` callback, which
also lets every RPC handler already runnable in this loop iteration enqueue first; the model runs
in its thread pool and its completion is one more callback. A batch whose size has computed in
less than ``inline_below_us`` of CPU (``inline_full_below_us`` for a full batch) runs on the loop
itself (BatchingConfig says why), and a request that finds the model idle and the queue empty with
no queue delay, and is that cheap, is computed at once in ``submit`` without suspending its
caller - unless gathering (BatchingConfig.gather_max_ms) has found that requests keep arriving:
then it waits while new requests keep arriving, and the batch goes when none has come for a
millisecond, when every client of a small closed-loop group is back, when it is full or when
gather_max_ms has passed.
All state is touched only on the loop.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import math
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import Executor
from dataclasses import dataclass
from typing import Protocol

import numpy as np

from cnnctl.errors import DeadlineExceededError, OverloadedError, UnavailableError
from cnnctl.serving.config import BatchingConfig

log = logging.getLogger(__name__)

# Gathering (BatchingConfig.gather_max_ms): the batch goes once no new request has arrived for
# _GATHER_QUIET_S. A timer, not a count of loop iterations: a loop that polls every iteration
# (call_soon) never sleeps, and so waiting "a few idle iterations" lasted a few microseconds and
# found no company (measured 2026-11-29 on the AVX-512 VM: 1.0 images per execution at concurrency
# 8 and 1.2-3.0 at 64, so gathering never turned on); a timer lets the loop wait in its selector,
# where new calls wake it. (While the loop waits there, epoll's 1 ms resolution rounds the wait up
# to 1 ms.) While gathering does not pay, one request that could gather does so now and then (a
# probe), to notice when load returns; a probe that gathers _GATHER_ON_IMAGES turns it on for
# every such request, and it stays on while its batches average (a moving average)
# _GATHER_OFF_IMAGES or more. A probe under light load makes the requests of its moment wait for
# one another (~1-3 ms), so the wait between probes doubles after each one that fails, from
# _GATHER_PROBE_S to _GATHER_PROBE_MAX_S, and starts again from _GATHER_PROBE_S when gathering
# turns off.
# Everyone back: clients that send their next request when the last is answered (a closed loop:
# every load generator, and most services calling a model) come back together after a gathered
# batch, so waiting out the quiet period after the last of them idles the loop for 1 ms each batch.
# That is what made gathering lose at concurrency 8 (-23% to -32% when on there, every client's
# request in one batch). So the server counts the requests gathered batches answered whose clients
# have not sent again (_returning), and while that group is small (_GATHER_ON_IMAGES to
# _GATHER_BACK_MAX requests) a gathering goes the moment the count reaches 0: everyone is back, no
# one else is expected. Bigger groups keep the quiet period, which gathers more of them per batch
# (counting for any group size lost 12-18% at concurrency 64: the clients split into groups of 1-10
# that each went alone). A batch that waited out the quiet period, and every _GATHER_RECHECK-th,
# starts the count again: clients that did not come back are forgotten, new ones counted. Measured
# side by side on lenet5 batch-1 requests (docs/serving.md, 4 rounds): concurrency 8 +9% / +17%
# (perf_analyzer / ours), 16 +35%; 32 -5%, 64 -4% / -3%.
_GATHER_QUIET_S = 0.001
_GATHER_ON_IMAGES = 6
_GATHER_OFF_IMAGES = 5
_GATHER_BACK_MAX = 16
_GATHER_RECHECK = 16
_GATHER_PROBE_S = 0.1
_GATHER_PROBE_MAX_S = 0.8


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


class Batcher:
    def __init__(self, name: str, run: Callable[[np.ndarray], np.ndarray], config: BatchingConfig,
                 executor: Executor | None = None, instances: int = 1,
                 observer: BatchObserver | None = None) -> None:
        """``run`` is blocking (it computes one merged batch); it runs in ``executor``, or on the
        loop thread for the batches cheap enough (BatchingConfig.inline_below_us)."""
        self.name = name
        self._run = run
        self._executor = executor
        self._config = config
        self._max = config.max_batch_size if config.enabled else 1
        self._delay = config.max_queue_delay_ms / 1000.0 if config.enabled else 0.0
        self._instances = max(1, instances)
        self._free = self._instances
        self._observer = observer or _NoObserver()
        self._queue: deque[_Pending] = deque()
        self._queued_images = 0
        self._loop: asyncio.AbstractEventLoop | None = None
        self._scheduled = False  # a _dispatch call_soon is pending
        self._timer: asyncio.TimerHandle | None = None  # a _dispatch at the oldest's delay
        self._idle = asyncio.Event()
        self._idle.set()
        self._closing = False
        self.deadline_dropped = 0
        self._inline_s = config.inline_below_us / 1e6
        self._inline_full_s = config.inline_full_below_us / 1e6
        self._cost: dict[int, float] = {}  # batch size -> moving average of its CPU seconds
        self._gather_s = config.gather_max_ms / 1000.0 if config.enabled else 0.0
        self._gathering = False  # a _gather_timer is waiting for the queue to stop growing
        self._gather_until = 0.0  # loop.time(): gather_max_ms, or an earlier deadline, passes
        self._last_arrival = 0.0  # loop.time() of the newest queued request (for gathering)
        self._gather_avg = 0.0  # moving average of the images per gathered batch
        self._gather_on = False  # the average says gathering pays: every such request gathers
        self._next_probe = 0.0  # loop.time() of the next probe while gathering does not pay
        self._probe_wait = _GATHER_PROBE_S  # from one probe to the next
        self._gather_gen = 0  # which gathering a _gather_timer was set for (a stale one stops)
        # Requests answered by gathered batches whose clients have not sent again (answered
        # minus arrived since; a batch that waited out the quiet period starts the count again).
        self._returning = 0
        self._until_back = False  # this gathering goes as soon as _returning reaches 0
        self._back_batches = 0  # batches sent that way since one last waited

    def start(self) -> None:
        self._loop = asyncio.get_running_loop()

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
        if self._loop is None:
            self.start()
        loop = self._loop
        assert loop is not None
        images = int(inputs.shape[0])
        now = loop.time()
        gather = False
        if (not self._queue and self._free > 0 and self._delay == 0.0
                and self._inline(images) and (deadline is None or deadline > now)):
            if not self._should_gather(images, now):
                # Idle, no queue delay, and cheap: compute now, in this step of the caller's
                # task. Waiting a loop iteration for company costs two more loop steps per
                # request, and grpc starts the handlers about one per loop iteration, so only a
                # wait over many iterations finds company, and only under load (gathering).
                self._observer.queued_for(0.0)
                return self._run_now(inputs, images)
            gather = True
        pending = _Pending(inputs, images, loop.create_future(), now, deadline)
        if gather:
            self._gathering = True
            self._gather_gen += 1
            self._gather_until = now + self._gather_s
            self._until_back = (self._gather_on
                                and _GATHER_ON_IMAGES <= self._returning <= _GATHER_BACK_MAX
                                and self._back_batches < _GATHER_RECHECK)
        if self._returning:
            self._returning -= 1
        self._last_arrival = now
        if self._gathering and deadline is not None:
            # Gathering never spends more than half of a request's time left (a request that
            # joins with a shorter deadline than the first's is answered up to _GATHER_QUIET_S
            # later than that: when the timer next looks).
            self._gather_until = min(self._gather_until,
                                     pending.enqueued + (deadline - pending.enqueued) / 2)
        if gather:
            loop.call_at(min(now + _GATHER_QUIET_S, self._gather_until), self._gather_timer,
                         self._gather_gen)
        self._queue.append(pending)
        self._queued_images += pending.n
        self._idle.clear()
        if self._gathering and self._until_back and self._returning == 0 and self._free > 0:
            # Everyone the last batches answered is back, no one else is expected: send it now.
            self._end_gather(waited=False)
            self._dispatch(gathered=True)
            return await pending.future
        self._schedule()
        if not self._scheduled:  # else the dispatch, later in this loop iteration, reports it
            self._observer.queue_depth(len(self._queue))
        return await pending.future

    def close(self) -> None:
        """Stop accepting requests; everything already queued is still computed."""
        self._closing = True
        if self._loop is not None:
            self._schedule()

    async def drain(self) -> None:
        """close(), then wait until the queue is empty and every execution has finished."""
        self.close()
        await self._idle.wait()

    # -- on the event loop only
    def _should_gather(self, images: int, now: float) -> bool:
        """Whether a cheap request that found the model idle waits for company (gathering)."""
        if self._gather_s == 0.0 or images >= self._max:
            return False
        if self._gather_on:
            return True
        if now >= self._next_probe:
            self._next_probe = math.inf  # set when this probe's batch goes (_end_gather)
            return True
        return False

    def _gather_timer(self, gen: int) -> None:
        """While gathering: send the batch once no request has arrived for _GATHER_QUIET_S, or
        gather_max_ms (or half a deadline) has passed; else wait for the later of the two."""
        if not self._gathering or gen != self._gather_gen:
            return  # its batch went (full, everyone back, or closing); maybe another gathers
        loop = self._loop
        assert loop is not None
        due = min(self._last_arrival + _GATHER_QUIET_S, self._gather_until)
        if loop.time() < due and not self._closing:
            loop.call_at(due, self._gather_timer, gen)
            return
        self._end_gather()
        self._dispatch(gathered=True)

    def _end_gather(self, waited: bool = True) -> None:
        self._gathering = False
        images = min(self._queued_images, self._max)
        if waited:  # those still counted as returning did not come back: forget them
            self._returning = 0
            self._back_batches = 0
        else:
            self._back_batches += 1
        now = self._loop.time()  # type: ignore[union-attr]
        if self._gather_on:  # the moving average decides when to stop
            self._gather_avg = 0.9 * self._gather_avg + 0.1 * images
            if self._gather_avg < _GATHER_OFF_IMAGES:
                self._gather_on = False
                self._probe_wait = _GATHER_PROBE_S
                self._next_probe = now + self._probe_wait
        elif images >= _GATHER_ON_IMAGES:  # a probe decides alone when to start
            self._gather_avg = float(images)
            self._gather_on = True
        else:  # a failed probe: wait longer for the next
            self._next_probe = now + self._probe_wait
            self._probe_wait = min(2 * self._probe_wait, _GATHER_PROBE_MAX_S)

    def _schedule(self) -> None:
        if self._free == 0 or not self._queue:
            return
        if self._gathering:
            if self._queued_images < self._max and not self._closing:
                return  # _gather_timer, or everyone being back, will dispatch
            self._end_gather()
        if self._timer is not None:
            if self._queued_images < self._max and not self._closing:
                return  # the delay timer will dispatch
            self._timer.cancel()
            self._timer = None
        if not self._scheduled:
            self._scheduled = True
            self._loop.call_soon(self._dispatch)  # type: ignore[union-attr]

    def _dispatch(self, gathered: bool = False) -> None:
        """Launch what the free instances can take; ``gathered``: the queue is a gathered batch
        (the full-batch inline rule applies to it, and its clients are counted as returning)."""
        self._scheduled = False
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        loop = self._loop
        assert loop is not None
        while self._free > 0 and self._queue:
            now = loop.time()
            if self._delay > 0 and self._queued_images < self._max and not self._closing:
                due = self._queue[0].enqueued + self._delay
                if due > now:  # not full, an instance idle: the oldest may wait for company
                    self._timer = loop.call_at(due, self._dispatch)
                    break
            batch = self._take(now)
            if batch:
                if gathered:
                    self._returning += len(batch)
                self._launch(batch, gathered)
        self._observer.queue_depth(len(self._queue))
        self._check_idle()

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

    def _execute(self, x: np.ndarray) -> tuple[np.ndarray, float, float]:
        """Run one batch (in the pool, or inline): (output, wall seconds, CPU seconds of this
        thread)."""
        wall, cpu = time.perf_counter(), time.thread_time()
        y = self._run(x)
        return y, time.perf_counter() - wall, time.thread_time() - cpu

    def _inline(self, images: int, gathered: bool = False) -> bool:
        """Whether a batch of this size is cheap enough to compute on the loop: its moving-average
        CPU time under inline_below_us, or under inline_full_below_us for a full batch (nothing
        could join it; see BatchingConfig). A size not seen yet runs in the pool first. "Full" is
        the configured max_batch_size even with batching off, so that both modes treat a request
        alike (with batching off every request would be "full", and costly small requests would
        then block the loop where batching would have let others queue). A gathered batch
        counts as full: it went because nothing more was arriving."""
        full = images >= self._config.max_batch_size or gathered
        limit = self._inline_full_s if full else self._inline_s
        return self._cost.get(images, math.inf) <= limit

    def _run_now(self, x: np.ndarray, images: int) -> np.ndarray:
        """One request's batch, computed on the loop at once (no queue, no future: this is the
        path of every request under light load, where each step counts)."""
        self._free -= 1
        try:
            y, seconds, cpu = self._execute(x)
        finally:
            self._free += 1
        self._account(images, 1, seconds, cpu)
        return y

    def _launch(self, batch: list[_Pending], gathered: bool = False) -> None:
        self._free -= 1
        x = batch[0].inputs if len(batch) == 1 else np.concatenate([p.inputs for p in batch])
        images = int(x.shape[0])
        if self._inline(images, gathered):
            # Cheaper to compute than to hand to a thread and back (see BatchingConfig). Timed
            # as in the pool: by CPU time, which unlike the wall time leaves out the moments
            # another process held the core (they would push the estimate over the threshold).
            try:
                result = self._execute(x)
            except Exception as exc:  # noqa: BLE001 - delivered to this batch's waiters
                self._free += 1
                self._fail(batch, exc)
                return
            self._free += 1
            self._deliver(batch, images, result)
            return  # _dispatch, our caller, goes on with the queue
        future = self._loop.run_in_executor(  # type: ignore[union-attr]
            self._executor, self._execute, x)
        future.add_done_callback(functools.partial(self._finish, batch, images))

    def _finish(self, batch: list[_Pending], images: int,
                future: asyncio.Future[tuple[np.ndarray, float, float]]) -> None:
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
        for p in batch:  # every waiter of this batch gets the failure; the others go on
            if not p.future.done():
                p.future.set_exception(exc)

    def _deliver(self, batch: list[_Pending], images: int,
                 result: tuple[np.ndarray, float, float]) -> None:
        y, seconds, cpu = result
        self._account(images, len(batch), seconds, cpu)
        if len(batch) == 1:
            p = batch[0]
            if not p.future.done():
                p.future.set_result(y)
            return
        offset = 0
        for p in batch:
            if not p.future.done():
                p.future.set_result(y[offset:offset + p.n])
            offset += p.n

    def _account(self, images: int, requests: int, seconds: float, cpu: float) -> None:
        self._observer.executed(images, seconds, requests)
        # The thread's CPU time, not the wall time: it is what running inline would block the
        # loop for, and unlike the wall time it leaves out the wait for the GIL after a pooled run
        # (up to the 5 ms switch interval when the loop is busy).
        cost = self._cost.get(images)
        self._cost[images] = cpu if cost is None else 0.9 * cost + 0.1 * cpu

    def _check_idle(self) -> None:
        if not self._queue and self._free == self._instances:
            self._idle.set()
