"""The batcher's two policies; serving/batcher.py holds the core that consults them.

- ``InlinePolicy``: which batches run on the event-loop thread instead of the model's thread pool.
- ``Gathering``: whether a cheap request that finds the model idle waits for company, and how long.

Both take the time from their caller (``loop.time()``) and touch no event loop, so their tests
drive them with made-up times.
"""

from __future__ import annotations

import math

# Gathering ends once no request has arrived for QUIET_S: a timer, so that the loop sleeps in its
# selector, where gRPC's new calls (handed over from its own thread) wake it; epoll rounds the
# wait up to 1 ms anyway.
QUIET_S = 0.001
# Gathering turns on when a probe gathers ON_IMAGES and stays on while its batches average
# OFF_IMAGES: every gathered batch idles the loop for one quiet period, which only a batch of
# this size pays back (a closed loop of 8 clients, all in every batch, loses when it gathers).
ON_IMAGES = 16
OFF_IMAGES = 16
# While gathering is off, a probe now and then notices load returning. A probe under light load
# makes the requests of its moment wait for one another, so the wait between probes doubles after
# each that fails, up to PROBE_MAX_S.
PROBE_S = 0.1
PROBE_MAX_S = 0.8


class InlinePolicy:
    """A batch runs on the loop thread when its size has cost less CPU time than a threshold (a
    moving average per batch size; a size not seen yet runs in the pool first, which measures
    it). BatchingConfig.inline_below_us says why; thresholds of 0 mean always the pool."""

    def __init__(self, below_s: float, full_below_s: float, full_images: int) -> None:
        self._below_s = below_s
        self._full_below_s = full_below_s
        self._full_images = full_images
        self._cost: dict[int, float] = {}  # images -> moving average of CPU seconds

    def cheap(self, images: int, full: bool = False) -> bool:
        """``full``: nothing else could join this batch. A batch of ``full_images`` or more is
        full whether batching is on or off, so that both modes treat a request alike."""
        full = full or images >= self._full_images
        return self._cost.get(images, math.inf) < (self._full_below_s if full else self._below_s)

    def ran(self, images: int, cpu_s: float) -> None:
        """A batch of ``images`` took ``cpu_s`` of its thread's CPU time: CPU, not wall time, is
        what an inline run blocks the loop for, and it leaves out waits for the GIL or a core."""
        cost = self._cost.get(images)
        self._cost[images] = cpu_s if cost is None else 0.9 * cost + 0.1 * cpu_s


class Gathering:
    """While on, a cheap request that finds the model idle waits for company instead of running
    alone; its batch goes after QUIET_S without a new arrival, after ``max_s``, or at half the
    time left to the earliest deadline in it (the batcher also sends it when full). It pays when
    the event loop is the bottleneck (many clients, or traffic near what the server can take);
    under lighter open-loop traffic the waits add latency (docs/benchmarks.md)."""

    def __init__(self, max_s: float, max_images: int) -> None:
        # 0: never gather. Nor with a batch cap under ON_IMAGES: no batch could turn it on, and
        # its probes would only make requests wait.
        self._max_s = max_s if max_images >= ON_IMAGES else 0.0
        self._max_images = max_images
        self.active = False  # a batch is being gathered
        self._until = 0.0  # when it goes at the latest
        self._last = 0.0  # the newest arrival in it
        self._on = False
        self._avg = 0.0  # moving average of the images per gathered batch, while on
        self._next_probe = 0.0
        self._probe_wait = PROBE_S

    def begin(self, images: int, now: float) -> bool:
        """Whether a request of ``images`` that found the model idle and the queue empty waits
        for company; if so, a gathering starts (the caller then reports it with ``arrived``)."""
        if self._max_s == 0.0 or images >= self._max_images:
            return False
        if not self._on:
            if now < self._next_probe:
                return False
            self._next_probe = math.inf  # a probe: set again when its batch goes
        self.active = True
        self._until = now + self._max_s
        return True

    def arrived(self, now: float, deadline: float | None) -> None:
        """A request joined the batch being gathered. Gathering never spends more than half of a
        request's time left (a timer already set is not moved: a request that joins with a
        shorter deadline than the first's may go up to QUIET_S later than that)."""
        self._last = now
        if deadline is not None:
            self._until = min(self._until, now + (deadline - now) / 2)

    def due(self) -> float:
        return min(self._last + QUIET_S, self._until)

    def end(self, images: int, now: float) -> None:
        """The gathered batch of ``images`` goes: turn on after a probe that gathered enough, off
        when the average drops."""
        self.active = False
        if self._on:
            self._avg = 0.9 * self._avg + 0.1 * images
            if self._avg < OFF_IMAGES:
                self._on = False
                self._probe_wait = PROBE_S
                self._next_probe = now + self._probe_wait
        elif images >= ON_IMAGES:
            self._on = True
            self._avg = float(images)
        else:
            self._next_probe = now + self._probe_wait
            self._probe_wait = min(2 * self._probe_wait, PROBE_MAX_S)
