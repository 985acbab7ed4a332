"""The dynamic batcher alone, with a fake model that records every batch it is given."""

from __future__ import annotations

import asyncio
import time

import numpy as np
import pytest

from cnnctl.errors import DeadlineExceededError, OverloadedError, UnavailableError
from cnnctl.serving import policies
from cnnctl.serving.batcher import Batcher
from cnnctl.serving.config import BatchingConfig


class FakeModel:
    def __init__(self, delay: float = 0.0, fail_on: float | None = None) -> None:
        self.batches: list[int] = []
        self.delay = delay
        self.fail_on = fail_on

    def __call__(self, x: np.ndarray) -> np.ndarray:  # blocking, like an ORT run
        self.batches.append(int(x.shape[0]))
        if self.delay:
            time.sleep(self.delay)
        if self.fail_on is not None and (x == self.fail_on).any():
            raise RuntimeError("boom")
        return x.reshape(x.shape[0], -1).sum(axis=1, keepdims=True) * 2


def rows(n: int, value: float) -> np.ndarray:
    return np.full((n, 1, 2, 2), value, dtype=np.float32)


def run(coro):  # type: ignore[no-untyped-def]
    return asyncio.run(coro)


def test_merges_queued_requests_and_splits_results_back() -> None:
    async def main() -> None:
        model = FakeModel(delay=0.02)
        b = Batcher("m", model, BatchingConfig(max_batch_size=8, max_queue_delay_ms=0))
        b.start()
        # The first request occupies the single instance; the next five queue up meanwhile.
        first = asyncio.create_task(b.submit(rows(1, 1.0)))
        await asyncio.sleep(0.005)
        sizes = [1, 2, 3, 1, 1]
        tasks = [asyncio.create_task(b.submit(rows(n, float(i + 2)))) for i, n in enumerate(sizes)]
        results = await asyncio.gather(first, *tasks)
        await b.drain()
        assert model.batches == [1, 8]  # 1+2+3+1+1 = 8 images in one execution
        for i, (n, out) in enumerate(zip(sizes, results[1:])):
            assert out.shape == (n, 1)
            np.testing.assert_allclose(out, np.full((n, 1), (i + 2) * 4 * 2))

    run(main())


def test_never_splits_a_request_and_respects_max_batch_size() -> None:
    async def main() -> None:
        model = FakeModel(delay=0.02)
        b = Batcher("m", model, BatchingConfig(max_batch_size=4, max_queue_delay_ms=0))
        b.start()
        first = asyncio.create_task(b.submit(rows(1, 1.0)))
        await asyncio.sleep(0.005)
        tasks = [asyncio.create_task(b.submit(rows(n, 1.0))) for n in (3, 2, 6, 1)]
        await asyncio.gather(first, *tasks)
        await b.drain()
        assert model.batches == [1, 3, 2, 6, 1]  # 3+2 > 4; 6 runs alone; 1 after it

    run(main())


def test_queue_delay_gathers_requests_arriving_while_idle() -> None:
    async def main(enabled: bool) -> list[int]:
        model = FakeModel()
        b = Batcher("m", model, BatchingConfig(enabled=enabled, max_batch_size=8,
                                               max_queue_delay_ms=100))
        b.start()
        tasks = []
        for _ in range(3):
            tasks.append(asyncio.create_task(b.submit(rows(1, 1.0))))
            await asyncio.sleep(0.01)
        await asyncio.gather(*tasks)
        await b.drain()
        return model.batches

    assert run(main(True)) == [3]
    assert run(main(False)) == [1, 1, 1]


def test_full_queue_is_refused() -> None:
    async def main() -> None:
        b = Batcher("lenet5", FakeModel(), BatchingConfig(max_queue_size=2,
                                                          max_queue_delay_ms=200))
        b.start()
        queued = [asyncio.create_task(b.submit(rows(1, 1.0))) for _ in range(2)]
        await asyncio.sleep(0)
        with pytest.raises(OverloadedError) as info:
            await b.submit(rows(1, 1.0))
        assert str(info.value) == ("model 'lenet5' queue is full (2 requests waiting); retry "
                                   "later or raise --max-queue-size")
        await asyncio.gather(*queued)
        await b.drain()

    run(main())


def test_tiny_batches_run_inline_when_asked() -> None:
    async def main(inline_below_us: float) -> set[str]:
        import threading

        threads: set[str] = set()

        def model(x: np.ndarray) -> np.ndarray:
            threads.add(threading.current_thread().name)
            return x[:, :1, 0, 0]

        b = Batcher("m", model, BatchingConfig(max_queue_delay_ms=0,
                                               inline_below_us=inline_below_us))
        b.start()
        for _ in range(3):
            await b.submit(rows(1, 1.0))
        await b.drain()
        return threads

    assert len(run(main(1e6))) == 2  # the first batch measures the speed in the pool, then inline
    assert "MainThread" not in run(main(0))


def test_inline_is_decided_per_batch_size_from_its_cpu_time() -> None:
    async def main() -> dict[int, set[str]]:
        import threading

        threads: dict[int, set[str]] = {}

        def model(x: np.ndarray) -> np.ndarray:
            threads.setdefault(int(x.shape[0]), set()).add(threading.current_thread().name)
            if x.shape[0] > 1:  # the big batches burn CPU well past the threshold
                end = time.thread_time() + 0.005
                while time.thread_time() < end:
                    pass
            return x[:, :1, 0, 0]

        b = Batcher("m", model, BatchingConfig(max_queue_delay_ms=0, inline_below_us=1000),
                    executor=None)
        b.start()
        for _ in range(3):
            await b.submit(rows(1, 1.0))
            await b.submit(rows(4, 1.0))
        await b.drain()
        return threads

    threads = run(main())
    assert len(threads[1]) == 2 and "MainThread" in threads[1]  # pool once, then inline
    assert "MainThread" not in threads[4]  # 5 ms of CPU each time: always the pool


def test_full_batches_have_their_own_inline_threshold() -> None:
    """A full batch (nothing could join it) that computes within inline_full_below_us runs on the
    loop; a partial batch of the same cost stays in the pool, where requests queue behind it."""
    async def main(full_us: float, enabled: bool = True) -> dict[int, set[str]]:
        import threading

        threads: dict[int, set[str]] = {}

        def model(x: np.ndarray) -> np.ndarray:
            threads.setdefault(int(x.shape[0]), set()).add(threading.current_thread().name)
            end = time.thread_time() + 0.001  # 1 ms of CPU, whatever the size
            while time.thread_time() < end:
                pass
            return x[:, :1, 0, 0]

        b = Batcher("m", model, BatchingConfig(enabled=enabled, max_queue_delay_ms=0,
                                               max_batch_size=4, inline_below_us=200,
                                               inline_full_below_us=full_us))
        b.start()
        for _ in range(3):
            await b.submit(rows(4, 1.0))
            await b.submit(rows(2, 1.0))
            await b.submit(rows(6, 1.0))  # larger than max_batch_size: full too
        await b.drain()
        return threads

    threads = run(main(20_000))
    assert "MainThread" in threads[4] and "MainThread" in threads[6]  # pool once, then inline
    assert "MainThread" not in threads[2]
    threads = run(main(0))
    assert not any("MainThread" in names for names in threads.values())
    # with batching off "full" is still max_batch_size images, so both modes treat a request alike
    threads = run(main(20_000, enabled=False))
    assert "MainThread" in threads[4] and "MainThread" not in threads[2]


def test_cheap_request_to_an_idle_model_is_computed_without_suspending() -> None:
    async def main() -> list[str]:
        events: list[str] = []
        b = Batcher("m", FakeModel(), BatchingConfig(max_queue_delay_ms=0, inline_below_us=1e6,
                                                     gather_max_ms=0))
        b.start()
        await b.submit(rows(1, 1.0))  # the first of its size is measured in the pool
        loop = asyncio.get_running_loop()
        loop.call_soon(events.append, "loop ran")
        out = await b.submit(rows(1, 3.0))
        events.append("answered")
        np.testing.assert_allclose(out, [[24.0]])
        await asyncio.sleep(0)
        await b.drain()
        return events

    assert run(main()) == ["answered", "loop ran"]


def test_expired_requests_are_dropped_without_computing() -> None:
    async def main() -> None:
        model = FakeModel(delay=0.05)
        b = Batcher("lenet5", model, BatchingConfig(max_queue_delay_ms=0))
        b.start()
        loop = asyncio.get_running_loop()
        busy = asyncio.create_task(b.submit(rows(1, 1.0)))
        await asyncio.sleep(0.005)
        late = asyncio.create_task(b.submit(rows(2, 5.0), deadline=loop.time() + 0.01))
        ok = asyncio.create_task(b.submit(rows(1, 3.0), deadline=loop.time() + 5))
        with pytest.raises(DeadlineExceededError, match=r"^deadline passed after \d+\.\d ms in "
                           r"model 'lenet5' queue; not computed$"):
            await late
        await asyncio.gather(busy, ok)
        await b.drain()
        assert model.batches == [1, 1]  # the expired request's 2 rows never reached the model

    run(main())


def test_a_failed_execution_fails_only_its_batch() -> None:
    async def main() -> None:
        model = FakeModel(fail_on=7.0)
        b = Batcher("m", model, BatchingConfig(enabled=False))
        b.start()
        bad = asyncio.create_task(b.submit(rows(1, 7.0)))
        good = asyncio.create_task(b.submit(rows(1, 1.0)))
        with pytest.raises(RuntimeError, match="^boom$"):
            await bad
        np.testing.assert_allclose(await good, [[8.0]])
        await b.drain()

    run(main())


@pytest.mark.parametrize("failure", ["mismatched shapes", "MemoryError"])
def test_a_failed_merge_fails_only_its_batch_and_the_batcher_goes_on(
        failure: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """Merging (np.concatenate) can raise too: that batch's requests get the error, the instance
    is free again and later requests are answered."""
    concatenate = np.concatenate

    def out_of_memory_once(arrays: list[np.ndarray]) -> np.ndarray:
        monkeypatch.setattr(np, "concatenate", concatenate)
        raise MemoryError("no room for the batch")

    async def main() -> None:
        model = FakeModel(delay=0.02)
        b = Batcher("m", model, BatchingConfig(max_batch_size=8, max_queue_delay_ms=0))
        b.start()
        busy = asyncio.create_task(b.submit(rows(1, 1.0)))
        await asyncio.sleep(0.005)  # the next two queue behind it and are merged together
        odd = np.zeros((1, 1, 3, 3), np.float32) if failure == "mismatched shapes" else rows(1, 2.0)
        if failure == "MemoryError":
            monkeypatch.setattr(np, "concatenate", out_of_memory_once)
        merged = [asyncio.create_task(b.submit(x)) for x in (rows(1, 2.0), odd)]
        results = await asyncio.wait_for(asyncio.gather(*merged, return_exceptions=True), 5)
        expected = ValueError if failure == "mismatched shapes" else MemoryError
        assert [type(r) for r in results] == [expected, expected], results
        await busy
        after = [b.submit(rows(2, 3.0)), b.submit(rows(1, 4.0))]
        out = await asyncio.wait_for(asyncio.gather(*after), 5)
        np.testing.assert_allclose(out[0], [[24.0], [24.0]])
        np.testing.assert_allclose(out[1], [[32.0]])
        await asyncio.wait_for(b.drain(), 5)
        assert model.batches == [1, 3]  # the failed merge never reached the model

    run(main())


@pytest.mark.parametrize("where", ["pool", "idle"])
@pytest.mark.parametrize("failure", ["too few rows", "observer raises"])
def test_a_failed_split_fails_only_its_batch_and_the_batcher_goes_on(where: str,
                                                                     failure: str) -> None:
    """Splitting the output back (or accounting for it) can fail too: a model that returns the
    wrong number of rows must not hand requests each other's rows, and the batcher goes on."""

    armed = False

    class Broken(FakeModel):
        def __call__(self, x: np.ndarray) -> np.ndarray:
            y = super().__call__(x)
            return y[:-1] if failure == "too few rows" and armed and len(x) == 3 else y

    class Observer:
        def queue_depth(self, depth: int) -> None:
            pass

        def queued_for(self, seconds: float) -> None:
            pass

        def executed(self, images: int, seconds: float, requests: int) -> None:
            if failure == "observer raises" and armed and images == 3:
                raise RuntimeError("observer broke")

    async def main() -> None:
        model = Broken(delay=0.02 if where == "pool" else 0.0)
        inline = 0.0 if where == "pool" else 1e9
        config = BatchingConfig(max_batch_size=8, max_queue_delay_ms=0, gather_max_ms=0,
                                inline_below_us=inline, inline_full_below_us=inline)
        b = Batcher("m", model, config, observer=Observer())
        b.start()
        nonlocal armed
        for n in (1, 3):  # sizes measured: "idle" computes the request at once, in submit
            await b.submit(rows(n, 9.0))
        armed = True
        if where == "idle":  # the request computed at once, in submit
            x = rows(3, 2.0)
            with pytest.raises(Exception) as info:
                await b.submit(x)
        else:
            busy = asyncio.create_task(b.submit(rows(1, 1.0)))
            await asyncio.sleep(0.005 if where == "pool" else 0)
            merged = [asyncio.create_task(b.submit(x)) for x in (rows(1, 2.0), rows(2, 2.0))]
            results = await asyncio.wait_for(asyncio.gather(*merged, return_exceptions=True), 5)
            await busy
            assert len({type(r) for r in results}) == 1
            info = pytest.ExceptionInfo.from_exc_info((type(results[0]), results[0], None))
        expected = ("^model 'm' returned output of shape \\[2, 1\\] for a batch of 3 images$"
                    if failure == "too few rows" else "^observer broke$")
        assert info.match(expected)
        out = await asyncio.wait_for(b.submit(rows(1, 4.0)), 5)
        np.testing.assert_allclose(out, [[32.0]])
        await asyncio.wait_for(b.drain(), 5)

    run(main())


def test_drain_answers_everything_queued_then_refuses() -> None:
    async def main() -> None:
        model = FakeModel(delay=0.01)
        b = Batcher("m", model, BatchingConfig(max_batch_size=2, max_queue_delay_ms=0))
        b.start()
        tasks = [asyncio.create_task(b.submit(rows(1, 1.0))) for _ in range(7)]
        await asyncio.sleep(0)
        await b.drain()
        assert all(t.done() and t.exception() is None for t in tasks)
        assert sum(model.batches) == 7
        with pytest.raises(UnavailableError, match="^the server is shutting down; not accepting "
                           "new requests$"):
            await b.submit(rows(1, 1.0))

    run(main())


def test_cancelled_request_is_skipped() -> None:
    async def main() -> None:
        model = FakeModel(delay=0.03)
        b = Batcher("m", model, BatchingConfig(max_queue_delay_ms=0))
        b.start()
        busy = asyncio.create_task(b.submit(rows(1, 1.0)))
        await asyncio.sleep(0.005)
        gone = asyncio.create_task(b.submit(rows(4, 1.0)))
        await asyncio.sleep(0.001)
        gone.cancel()
        await asyncio.gather(busy, b.submit(rows(1, 1.0)))
        await b.drain()
        assert model.batches == [1, 1]

    run(main())


def test_gathering_batches_cheap_requests_that_keep_arriving_under_load() -> None:
    """A cheap request to an idle model waits while the loop keeps bringing new ones (a probe,
    then on for all once the probe gathered 16+), instead of running alone on the loop."""
    async def main() -> None:
        model = FakeModel()
        b = Batcher("m", model, BatchingConfig(max_queue_delay_ms=0, inline_below_us=1e6,
                                               gather_max_ms=1000))
        b.start()
        await b.submit(rows(1, 1.0))  # measures batch 1 in the pool: now it is "cheap"

        async def client(i: int) -> np.ndarray:
            for _ in range(i):  # arrivals spread over 40 loop iterations
                await asyncio.sleep(0)
            return await b.submit(rows(1, float(i)))

        results = await asyncio.gather(*(client(i) for i in range(40)))
        for i, out in enumerate(results):
            np.testing.assert_allclose(out, [[i * 4 * 2]])
        assert model.batches == [1, 40]  # one gathered batch, not 40 runs of one image
        # Gathering is now on: the next burst gathers too, without waiting for a probe.
        await asyncio.gather(*(client(i) for i in range(20)))
        assert model.batches[2:] == [20]
        await b.drain()

    run(main())


def test_gathering_stays_off_for_a_lone_client() -> None:
    """A closed-loop client alone: the first request probes (it gathers only itself), and the
    next ones are computed at once, without suspending, until the next probe 100 ms later."""
    async def main() -> list[str]:
        model = FakeModel()
        b = Batcher("m", model, BatchingConfig(max_queue_delay_ms=0, inline_below_us=1e6))
        b.start()
        for _ in range(5):
            await b.submit(rows(1, 1.0))  # the pool once, then the probe, then inline
        events: list[str] = []
        asyncio.get_running_loop().call_soon(events.append, "loop ran")
        await b.submit(rows(1, 3.0))
        events.append("answered")
        await asyncio.sleep(0)
        await b.drain()
        assert model.batches == [1] * 6
        return events

    assert run(main()) == ["answered", "loop ran"]


def test_gathering_stops_at_gather_max_ms_and_half_a_deadline(
        monkeypatch: pytest.MonkeyPatch) -> None:
    # No quiet period ends it (the probe would otherwise go 1 ms after its arrival, alone):
    # only time does.
    monkeypatch.setattr(policies, "QUIET_S", 10.0)

    async def main(deadline_s: float | None) -> float:
        b = Batcher("m", FakeModel(), BatchingConfig(max_queue_delay_ms=0, inline_below_us=1e6,
                                                     gather_max_ms=60))
        b.start()
        await b.submit(rows(1, 1.0))
        loop = asyncio.get_running_loop()
        start = loop.time()
        deadline = None if deadline_s is None else start + deadline_s
        out = await b.submit(rows(1, 2.0), deadline=deadline)  # the first probe: it gathers
        waited = loop.time() - start
        np.testing.assert_allclose(out, [[16.0]])
        await b.drain()
        return waited

    assert 0.055 <= run(main(None)) < 0.5  # gather_max_ms
    assert 0.015 <= run(main(0.04)) < 0.035  # half of the 40 ms left, answered in time


def test_gathering_waits_in_the_selector_for_calls_from_another_thread(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """gRPC hands new calls to the loop from its own thread, while the loop sleeps in its
    selector: requests arriving 0.2 ms apart that way are gathered (a loop polling for idle
    iterations instead found none of them: batches of one). The quiet period (and the longest
    wait) are raised here so that a busy test machine, which may hold either thread back for
    over a millisecond, does not end the batch early."""
    monkeypatch.setattr(policies, "QUIET_S", 0.05)

    async def main() -> list[int]:
        model = FakeModel()
        b = Batcher("m", model, BatchingConfig(max_queue_delay_ms=0, inline_below_us=1e6,
                                               gather_max_ms=1000))
        b.start()
        await b.submit(rows(1, 1.0))  # measures batch 1 in the pool: now it is "cheap"
        loop = asyncio.get_running_loop()
        futures: list[asyncio.Future[np.ndarray]] = []

        def arrive(i: int) -> None:
            futures.append(asyncio.ensure_future(b.submit(rows(1, float(i)))))

        def grpc_thread() -> None:
            for i in range(30):
                loop.call_soon_threadsafe(arrive, i)
                time.sleep(0.0002)

        await loop.run_in_executor(None, grpc_thread)
        while len(futures) < 30:
            await asyncio.sleep(0)
        for i, out in enumerate(await asyncio.gather(*futures)):
            np.testing.assert_allclose(out, [[i * 4 * 2]])
        await b.drain()
        return model.batches[1:]

    batches = run(main())
    assert sum(batches) == 30 and max(batches) >= 15, batches


def test_gathering_is_off_with_gather_max_ms_0_and_without_batching() -> None:
    async def main(config: BatchingConfig) -> list[int]:
        model = FakeModel()
        b = Batcher("m", model, config)
        b.start()
        await b.submit(rows(1, 1.0))

        async def client(i: int) -> np.ndarray:
            for _ in range(i):
                await asyncio.sleep(0)
            return await b.submit(rows(1, float(i)))

        await asyncio.gather(*(client(i) for i in range(20)))
        await b.drain()
        return model.batches

    assert run(main(BatchingConfig(max_queue_delay_ms=0, inline_below_us=1e6,
                                   gather_max_ms=0))) == [1] * 21
    assert run(main(BatchingConfig(enabled=False, inline_below_us=1e6))) == [1] * 21


def test_gathering_probes_ever_more_rarely_while_they_find_no_company() -> None:
    """A lone client: each probe gathers only itself, and the wait to the next one doubles (0.1,
    0.2, 0.4 s, ...), so over 0.8 s there are ~4 probes, not 8."""
    class Waits:
        def __init__(self) -> None:
            self.queued: list[float] = []

        def queue_depth(self, depth: int) -> None:
            pass

        def queued_for(self, seconds: float) -> None:
            self.queued.append(seconds)

        def executed(self, images: int, seconds: float, requests: int) -> None:
            pass

    async def main() -> int:
        waits = Waits()
        b = Batcher("m", FakeModel(), BatchingConfig(max_queue_delay_ms=0, inline_below_us=1e6),
                    observer=waits)
        b.start()
        await b.submit(rows(1, 1.0))  # measures batch 1 in the pool
        loop = asyncio.get_running_loop()
        waits.queued.clear()
        end = loop.time() + 0.8
        while loop.time() < end:
            await b.submit(rows(1, 1.0))
            await asyncio.sleep(0.001)
        await b.drain()
        assert len(waits.queued) > 100
        return sum(1 for w in waits.queued if w > 0)  # the probes: they waited a few loop ticks

    assert 3 <= run(main()) <= 5
