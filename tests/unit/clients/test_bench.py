"""cnnctl bench against a real server: every level measured, bounded in time and count."""

from __future__ import annotations

import json
import time
from pathlib import Path

from click.testing import CliRunner

from cnnctl.clients import bench as b
from cnnctl.clients.commands import bench

from .conftest import ServerThread


def test_levels_are_measured_and_bounded(server: ServerThread) -> None:
    config = b.BenchConfig(server=server.address, model="lenet5", levels=(1, 4), duration_s=0.6,
                           warmup_s=0.1, progress=False)
    start = time.monotonic()
    rows = b.run_grpc(config)
    assert time.monotonic() - start < 4
    assert [(r.mode, r.concurrency, r.errors) for r in rows] == [("grpc", 1, 0), ("grpc", 4, 0)]
    for r in rows:
        assert r.requests > 0 and 0 < r.p50_ms <= r.p90_ms <= r.p99_ms
        assert abs(r.images_per_s - r.requests / r.duration_s) < 1e-6
    capped = b.run_grpc(b.BenchConfig(server=server.address, model="lenet5", levels=(2,),
                                      duration_s=30, warmup_s=0, max_requests=20,
                                      progress=False))
    assert capped[0].requests <= 20


def test_cli_json_images_in_process_and_plot(server: ServerThread, artifact: Path,
                                             tmp_path: Path, digits) -> None:
    from PIL import Image

    for i, d in enumerate(digits[:4]):
        Image.fromarray(d).save(tmp_path / f"{i}.png")
    plot = tmp_path / "bench.png"
    result = CliRunner().invoke(bench, [
        "--server", server.address, "--model", "lenet5", "--concurrency", "1,2",
        "--duration", "0.3", "--warmup", "0", "--batch", "2", "--images", str(tmp_path),
        "--in-process", str(artifact), "--json", "--plot", str(plot)])
    assert result.exit_code == 0, result.output
    doc = json.loads(result.output)
    modes = [(r["mode"], r["concurrency"], r["batch"]) for r in doc["results"]]
    assert modes == [("grpc", 1, 2), ("grpc", 2, 2), ("in-process", 1, 2), ("in-process", 1, 4)]
    assert all(r["errors"] == 0 and r["requests"] > 0 for r in doc["results"])
    assert plot.stat().st_size > 10_000


def test_streaming_levels(server: ServerThread) -> None:
    """--streaming: every level, concurrency 1 included, over streams; the server answered each."""
    result = CliRunner().invoke(bench, [
        "--server", server.address, "--model", "lenet5", "--concurrency", "1,3", "--streaming",
        "--duration", "0.3", "--warmup", "0", "--batch", "2", "--json"])
    assert result.exit_code == 0, result.output
    rows = json.loads(result.output)["results"]
    assert [(r["mode"], r["concurrency"], r["errors"]) for r in rows] == [
        ("grpc-stream", 1, 0), ("grpc-stream", 3, 0)]
    assert all(r["requests"] > 0 for r in rows)


def test_bad_concurrency_names_the_value() -> None:
    for value, message in (("1,x", "'x' is not a valid integer range"),
                           ("8,2000", "2000 is not in the range 1<=x<=1024"),
                           (",", "',' names no level; e.g. 1,8,64")):
        result = CliRunner().invoke(bench, ["--model", "m", "--concurrency", value])
        assert result.exit_code == 2
        assert f"Invalid value for '--concurrency': {message}" in result.output


def test_images_preprocessed_on_the_client(server: ServerThread, tmp_path: Path, digits) -> None:
    from PIL import Image

    for i, d in enumerate(digits[:3]):
        Image.fromarray(d).save(tmp_path / f"{i}.png")
    config = b.BenchConfig(server=server.address, model="lenet5", levels=(2,), duration_s=0.3,
                           warmup_s=0, batch=2, images_dir=str(tmp_path), preprocess="client",
                           progress=False)
    [row] = b.run_grpc(config)
    assert row.errors == 0 and row.requests > 0 and row.batch == 2


def test_an_unanswered_request_is_counted_when_the_level_gives_up() -> None:
    """The timed loop sends no per-request deadline; one watchdog per level counts what is still
    unanswered ``timeout_s`` after the level's end as DEADLINE_EXCEEDED, and the level ends."""
    import asyncio

    class Hanging:
        calls = 0

        async def infer_serialized(self, payload: bytes, timeout: float | None = None) -> bytes:
            assert timeout is None
            Hanging.calls += 1
            if Hanging.calls > 3:
                await asyncio.sleep(60)
            return b""

    config = b.BenchConfig(levels=(2,), duration_s=0.2, warmup_s=0.0, timeout_s=0.3,
                           progress=False)
    start = time.monotonic()
    row = asyncio.run(b._level(Hanging(), [b"x"], 2, config))
    assert time.monotonic() - start < 2
    assert row.errors == 2 and row.requests == 3


def test_blocking_level_gives_up_on_an_unanswered_request() -> None:
    """Concurrency 1 runs blocking calls with no deadline; the watchdog closes the level's client
    ``timeout_s`` after the level's end, and the request it cut off counts as DEADLINE_EXCEEDED."""
    import threading

    import grpc

    from cnnctl.clients.errors import Cancelled

    class Hanging:
        def __init__(self) -> None:
            self.calls = 0
            self.closed = threading.Event()

        def infer_serialized(self, payload: bytes, timeout: float | None = None) -> bytes:
            assert timeout is None
            self.calls += 1
            if self.calls > 3:
                assert self.closed.wait(10), "the watchdog never closed the client"
                raise Cancelled(grpc.StatusCode.CANCELLED, "Channel closed!")
            return b""

        def close(self) -> None:
            self.closed.set()

    config = b.BenchConfig(levels=(1,), duration_s=0.2, warmup_s=0.0, timeout_s=0.3,
                           progress=False)
    client = Hanging()
    start = time.monotonic()
    row = b._level_blocking(client, [b"x"], config)
    assert time.monotonic() - start < 2
    assert client.calls == 4
    assert row.errors == 1 and row.error_codes == {"DEADLINE_EXCEEDED": 1} and row.requests == 3
