"""The load generator behind ``cnnctl bench``: closed-loop clients, one run per level.

At concurrency C, C clients each send a request, wait for its answer, and send the next - the same
closed loop as Triton's ``perf_analyzer --concurrency-range C``, so the two can be compared
(bench/client_vs_perf_analyzer.py). Concurrency 1 runs on a blocking channel in the calling
thread: with one request in flight throughput is 1 / latency, and a blocking call skips the
asyncio hand-offs (measured against one server, interleaved: 10-16% more requests/s and ~25% less
client CPU per call than grpc.aio). Higher levels are C coroutines over one grpc.aio channel,
where one thread keeps many calls in flight. Each level has a channel of its own, runs
``warmup_s`` unmeasured, then ``duration_s`` measured: a request counts when it starts inside the
measured window; throughput is those answers over the window. Every level stops at its time or at
``max_requests``, whichever comes first. With ``streaming`` each client sends its requests over a
ModelStreamInfer stream of its own (as ``perf_analyzer --streaming``), at every level, instead of
one ModelInfer call per request.

``run_in_process`` times a plain ONNX Runtime session on the artifact's ONNX file in this process:
what the model costs with no network, no queue and no protocol - the ceiling the server approaches.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import threading
import time
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from cnnctl.errors import UsageError

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class BenchConfig:
    server: str = "127.0.0.1:8001"
    model: str = ""
    version: str = ""
    levels: tuple[int, ...] = (1, 8, 64)  # requests in flight
    duration_s: float = 5.0  # measured, per level
    warmup_s: float = 1.0  # unmeasured, before each level
    batch: int = 1  # images per request
    images_dir: str | None = None  # None: random FP32 tensors, as perf_analyzer sends
    max_requests: int = 1_000_000  # per level, whatever the time
    progress: bool = True
    timeout_s: float = 30.0  # how long past a level's end an unanswered request may take
    tls: bool = False
    root_certificates: str | None = None
    server_name: str | None = None
    certificate_chain: str | None = None  # a client certificate (PEM file), for mutual TLS
    private_key: str | None = None  # its key (PEM file)
    preprocess: str = "server"  # with images_dir: encoded images or client-side tensors
    seed: int = 0
    streaming: bool = False  # each client sends over a ModelStreamInfer stream of its own


@dataclass(frozen=True)
class BenchRow:
    mode: str  # grpc | grpc-stream | in-process
    concurrency: int
    batch: int
    requests: int  # answered inside the measured window
    errors: int
    duration_s: float
    images_per_s: float
    requests_per_s: float
    p50_ms: float
    p90_ms: float
    p99_ms: float
    mean_ms: float
    error_codes: dict[str, int] = field(default_factory=dict)


def summarize(mode: str, concurrency: int, batch: int, latencies_s: list[float], errors: Counter,
              window_s: float) -> BenchRow:
    lat = np.asarray(latencies_s) * 1e3
    p50, p90, p99 = (np.percentile(lat, [50, 90, 99]) if lat.size else (float("nan"),) * 3)
    return BenchRow(mode=mode, concurrency=concurrency, batch=batch, requests=len(latencies_s),
                    errors=sum(errors.values()), duration_s=round(window_s, 3),
                    images_per_s=len(latencies_s) * batch / window_s,
                    requests_per_s=len(latencies_s) / window_s, p50_ms=float(p50),
                    p90_ms=float(p90), p99_ms=float(p99),
                    mean_ms=float(lat.mean()) if lat.size else float("nan"),
                    error_codes=dict(errors))


def _progress(total_s: float, desc: str, enabled: bool) -> Any:
    from tqdm import tqdm

    return tqdm(total=round(total_s, 1), desc=desc, unit="s", disable=not enabled, leave=False,
                bar_format="{desc}: {bar} {n:.1f}/{total:.1f} s {postfix}")


def _requests(client: Any, info: Any, config: BenchConfig) -> list[Any]:
    """The requests the workers cycle through."""
    from cnnctl.clients import protocol
    from cnnctl.clients.images import expand, list_images, to_encoded
    from cnnctl.export.image import to_tensor

    if config.images_dir is None:
        rng = np.random.default_rng(config.seed)
        shape = (config.batch, *(int(s) for s in info.input_shape[1:]))
        return [protocol.tensor_request(info, rng.standard_normal(shape, dtype=np.float32))]
    files = list_images(config.images_dir)[:4096]
    items = expand(files)
    groups = [items[i:i + config.batch] for i in range(0, len(items), config.batch)]
    groups = [g for g in groups if len(g) == config.batch] or [
        (items * config.batch)[:config.batch]]
    if config.preprocess == "client":
        if info.image is None:
            raise UsageError(f"model '{info.name}' publishes no image preprocessing; use the "
                             f"default preprocess='server'")
        return [protocol.tensor_request(info, to_tensor(g, info.image)) for g in groups]
    return [protocol.bytes_request(info, [to_encoded(x) for x in g]) for g in groups]


async def _level(client: Any, pool: list[Any], concurrency: int, config: BenchConfig) -> BenchRow:
    loop = asyncio.get_running_loop()
    start = loop.time()
    measure_from = start + config.warmup_s
    end = measure_from + config.duration_s
    latencies: list[float] = []
    errors: Counter = Counter()
    sent = 0
    from cnnctl.clients.errors import ClientError

    async def worker(k: int) -> None:
        # No per-request gRPC deadline (perf_analyzer sends none either; measured ~0.1 ms per
        # request on the client at concurrency 1): the whole level has one watchdog below.
        nonlocal sent
        i = k
        stream = client.open_stream() if config.streaming else None
        while sent < config.max_requests:
            began = loop.time()
            if began >= end:
                break
            sent += 1
            try:
                if stream is not None:
                    await stream.send(pool[i % len(pool)])
                else:
                    await client.infer_serialized(pool[i % len(pool)], timeout=None)
                ok = True
            except ClientError as exc:
                errors[exc.code.name] += 1
                ok = False
            except asyncio.CancelledError:  # the level's watchdog gave up on this one
                errors["DEADLINE_EXCEEDED"] += 1
                raise
            if ok and began >= measure_from:
                latencies.append(loop.time() - began)
            i += concurrency
        if stream is not None:
            with contextlib.suppress(ClientError):  # a broken stream: its errors are counted
                await stream.close()

    bar = _progress(config.warmup_s + config.duration_s, f"concurrency {concurrency:>3}",
                    config.progress)

    async def ticker() -> None:
        while True:
            await asyncio.sleep(0.25)
            _show(bar, loop.time(), start, end, measure_from, len(latencies), config.batch)

    tick = asyncio.create_task(ticker())
    try:
        # A request unanswered timeout_s after the level's end counts as DEADLINE_EXCEEDED.
        await asyncio.wait_for(asyncio.gather(*(worker(k) for k in range(concurrency))),
                               timeout=max(0.0, end - loop.time()) + config.timeout_s)
    except asyncio.TimeoutError:
        pass  # counted by the workers
    finally:
        tick.cancel()
        bar.close()
    window = min(config.duration_s, max(1e-9, loop.time() - measure_from))
    return summarize("grpc-stream" if config.streaming else "grpc", concurrency, config.batch,
                     latencies, errors, window)


def _show(bar: Any, now: float, start: float, end: float, measure_from: float, answered: int,
          batch: int) -> None:
    bar.n = round(min(now, end) - start, 1)
    window = max(1e-9, now - measure_from)
    bar.set_postfix_str(f"{answered * batch / window:,.0f} img/s" if now > measure_from
                        else "warm-up")


def _level_blocking(client: Any, pool: list[bytes], config: BenchConfig) -> BenchRow:
    """Concurrency 1: blocking calls in this thread, on a client of its own. No per-request
    deadline, as at the other levels: a watchdog thread closes the client's channel if a request
    is still unanswered ``timeout_s`` after the level's end (counted as DEADLINE_EXCEEDED)."""
    from cnnctl.clients.errors import ClientError

    start = time.monotonic()
    measure_from = start + config.warmup_s
    end = measure_from + config.duration_s
    latencies: list[float] = []
    errors: Counter = Counter()
    gave_up = threading.Event()

    def give_up() -> None:
        gave_up.set()
        client.close()

    watchdog = threading.Timer(end - start + config.timeout_s, give_up)
    watchdog.daemon = True
    watchdog.start()
    bar = _progress(config.warmup_s + config.duration_s, "concurrency   1", config.progress)
    shown = start
    try:
        for sent in range(config.max_requests):
            began = time.monotonic()
            if began >= end:
                break
            try:
                client.infer_serialized(pool[sent % len(pool)], timeout=None)
            except ClientError as exc:
                if gave_up.is_set():
                    errors["DEADLINE_EXCEEDED"] += 1
                    break
                errors[exc.code.name] += 1
            else:
                if began >= measure_from:
                    latencies.append(time.monotonic() - began)
            if began - shown >= 0.25:
                shown = began
                _show(bar, began, start, end, measure_from, len(latencies), config.batch)
    finally:
        watchdog.cancel()
        bar.close()
    window = min(config.duration_s, max(1e-9, time.monotonic() - measure_from))
    return summarize("grpc", 1, config.batch, latencies, errors, window)


def run_grpc(config: BenchConfig) -> list[BenchRow]:
    from cnnctl.clients import protocol
    from cnnctl.clients.client import AsyncClient, Client

    options: dict[str, Any] = dict(timeout=config.timeout_s, retries=0, tls=config.tls,
                                   root_certificates=config.root_certificates,
                                   server_name=config.server_name,
                                   certificate_chain=config.certificate_chain,
                                   private_key=config.private_key, preprocess=config.preprocess)
    with Client(config.server, **options) as client:
        client.wait_until_ready(timeout=10)
        info = client.model_info(config.model, config.version)
        requests = _requests(client, info, config)
        # Checked once, parsed in full; the timed loop then sends the same requests pre-serialised
        # and leaves the answers unparsed (as perf_analyzer does), so the client's own CPU per
        # request stays low: errors still come back as gRPC status codes.
        first = client.infer_request(requests[0], timeout=config.timeout_s)
        protocol.answered_logits(first, requests[0], info)  # a broken model fails here, once
    pool = [r.SerializeToString() for r in requests]

    async def level_async(level: int) -> BenchRow:
        async with AsyncClient(config.server, **options) as aclient:
            await aclient.server_live()  # connected before the level's clock starts
            return await _level(aclient, pool, level, config)

    rows = []
    for level in config.levels:
        if level == 1 and not config.streaming:
            with Client(config.server, **options) as one:
                one.server_live()
                rows.append(_level_blocking(one, pool, config))
        else:
            rows.append(asyncio.run(level_async(level)))
        log.info("concurrency %d: %.0f img/s, p50 %.2f ms", level, rows[-1].images_per_s,
                 rows[-1].p50_ms)
    return rows


def run_in_process(artifact_dir: str | os.PathLike[str], config: BenchConfig) -> list[BenchRow]:
    """ONNX Runtime on the artifact's fp32 ONNX file: at ``batch``, and at the largest batch the
    server could form from the highest concurrency level (its batching ceiling)."""
    import onnxruntime as ort

    from cnnctl.export.manifest import load_manifest

    manifest = load_manifest(artifact_dir)
    entry = manifest.file("onnx", "fp32") or manifest.file("onnx")
    if entry is None:
        raise UsageError(f"artifact {str(artifact_dir)!r} has no ONNX file; export one with "
                         f"`cnnctl export --format onnx`")
    session = ort.InferenceSession(str(Path(artifact_dir) / entry.path),
                                   providers=["CPUExecutionProvider"])
    rng = np.random.default_rng(config.seed)
    batches = sorted({config.batch, min(64, max(config.levels) * config.batch)})
    rows = []
    for batch in batches:
        x = rng.standard_normal((batch, *manifest.input.shape[1:]), dtype=np.float32)
        feed = {manifest.input.name: x}
        bar = _progress(config.warmup_s + config.duration_s, f"in-process batch {batch:>3}",
                        config.progress)
        start = time.monotonic()
        measure_from, end = start + config.warmup_s, start + config.warmup_s + config.duration_s
        latencies: list[float] = []
        runs, shown = 0, start
        while runs < config.max_requests:
            began = time.monotonic()
            if began >= end:
                break
            session.run(None, feed)
            runs += 1
            if began >= measure_from:
                latencies.append(time.monotonic() - began)
            if began - shown >= 0.25:
                shown = began
                bar.n = round(min(began, end) - start, 1)
                bar.refresh()
        bar.close()
        window = min(config.duration_s, max(1e-9, time.monotonic() - measure_from))
        rows.append(summarize("in-process", 1, batch, latencies, Counter(), window))
    return rows


def to_json(config: BenchConfig, rows: list[BenchRow]) -> dict[str, Any]:
    return {"config": {k: v for k, v in asdict(config).items() if k != "progress"},
            "cpu_count": os.cpu_count(), "results": [asdict(r) for r in rows]}


def table(rows: list[BenchRow]) -> str:
    head = (f"{'MODE':<11} {'CONC':>5} {'BATCH':>5} {'REQS':>7} {'ERR':>4} {'IMG/S':>10} "
            f"{'P50 MS':>8} {'P90 MS':>8} {'P99 MS':>8}")
    lines = [head]
    for r in rows:
        lines.append(f"{r.mode:<11} {r.concurrency:>5} {r.batch:>5} {r.requests:>7} {r.errors:>4} "
                     f"{r.images_per_s:>10,.0f} {r.p50_ms:>8.2f} {r.p90_ms:>8.2f} "
                     f"{r.p99_ms:>8.2f}")
    return "\n".join(lines)


def plot(rows: list[BenchRow], path: str | os.PathLike[str], title: str = "") -> Path:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise UsageError("--plot needs matplotlib: pip install matplotlib") from None
    grpc_rows = [r for r in rows if r.mode.startswith("grpc")]
    local = [r for r in rows if r.mode == "in-process"]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 4))
    if grpc_rows:
        c = [r.concurrency for r in grpc_rows]
        ax1.plot(c, [r.images_per_s for r in grpc_rows], "o-", label="gRPC server")
        for q, style in (("p50_ms", "o-"), ("p90_ms", "s--"), ("p99_ms", "^:")):
            ax2.plot(c, [getattr(r, q) for r in grpc_rows], style, label=q[:3])
    for r in local:
        ax1.axhline(r.images_per_s, linestyle="--", color="gray")
        ax1.annotate(f"ONNX Runtime in-process, batch {r.batch}", (1, r.images_per_s),
                     fontsize=8, va="bottom")
    if local:
        ax1.set_yscale("log")  # the in-process ceiling can be 10-20× the served rate
    for ax, ylabel in ((ax1, "images / s"), (ax2, "latency (ms)")):
        ax.set_xscale("log", base=2)
        ax.set_xlabel("concurrency (requests in flight)")
        ax.set_ylabel(ylabel)
        ax.grid(True, alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=8)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
