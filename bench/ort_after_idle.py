"""Why lenet5 batch-1 requests cost a server more than in-process ONNX Runtime suggests.

In a tight loop ORT runs lenet5 at batch 1 in ~25 µs. Inside `cnnctl serve` the same call takes
more than twice that many µs of the calling thread's own CPU time, and so the bare ORT server in
serve_speed.py (which adds nothing but that call to the do-nothing server) reaches only
0.76-0.84 of the do-nothing server's throughput. This script measures the call, with the 1-thread
session `cnnctl serve` uses for small batches, under five conditions, interleaved over rounds:

- back to back (a hot loop: the usual in-process number);
- after the same Python work the server does per request (parse and serialise a ModelInferRequest,
  some dict work): code and data caches partly evicted, the thread never sleeps;
- after a busy wait of ``--gap`` µs (time passes, the thread keeps its core);
- after sleeping ``--gap`` µs (the thread gives its core up, as a server's event loop does while it
  waits in epoll for the next request);
- inside `cnnctl serve` itself (in this process; the load generator of serve_speed.py in another)
  at each ``--levels`` concurrency: the thread CPU time of each ORT call, taken by wrapping
  OrtModel.run.

Wall and thread CPU time per call are printed (median over the rounds) and saved as JSON.

    flock /tmp/cnnctl-bench.lock .venv/bin/python bench/ort_after_idle.py --rounds 5
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).parent))  # bench/ is not a package
sys.path.append(str(Path(__file__).resolve().parents[1]))  # tests.support

import serve_speed as s  # noqa: E402

RESULTS = Path(__file__).parent / "results" / "ort_after_idle.json"


def _timed(session: Any, x: np.ndarray, between: Callable[[], None],
           calls: int) -> tuple[float, float]:
    """Mean wall and thread-CPU µs of one session.run, with ``between`` before each."""
    inp, out = session.get_inputs()[0].name, session.get_outputs()[0].name
    wall = cpu = 0.0
    for _ in range(calls):
        between()
        w, c = time.perf_counter(), time.thread_time()
        session.run([out], {inp: x})
        cpu += time.thread_time() - c
        wall += time.perf_counter() - w
    return 1e6 * wall / calls, 1e6 * cpu / calls


def _server_work() -> Callable[[], None]:
    from cnnctl.protos import grpc_service_pb2 as pb

    req = pb.ModelInferRequest(model_name="lenet5", id="1")
    req.inputs.add(name="input", datatype="FP32", shape=[1, 1, 32, 32])
    req.raw_input_contents.append(bytes(4 * 32 * 32))
    blob = req.SerializeToString()
    d = {str(i): [i, str(i)] for i in range(200)}

    def work() -> None:
        for _ in range(3):
            r = pb.ModelInferRequest()
            r.ParseFromString(blob)
            r.SerializeToString()
            json.dumps(d)
    return work


def _sleep(seconds: float) -> Callable[[], None]:
    def sleep() -> None:
        time.sleep(seconds)
    return sleep


def _spin(seconds: float) -> Callable[[], None]:
    def spin() -> None:
        end = time.perf_counter() + seconds
        while time.perf_counter() < end:
            pass
    return spin


async def _in_server(art: Path, levels: list[int],
                     seconds: float) -> dict[int, tuple[float, float]]:
    """Thread CPU and wall µs per ORT call inside `cnnctl serve` under load, per concurrency."""
    from cnnctl.serving import runtime
    from cnnctl.serving.server import create_server
    from tests.support.serving import config_for

    acc = {"n": 0, "wall": 0.0, "cpu": 0.0}
    run = runtime.OrtModel.run

    def timed_run(self: Any, x: np.ndarray) -> np.ndarray:
        w, c = time.perf_counter(), time.thread_time()
        y = run(self, x)
        acc["cpu"] += time.thread_time() - c
        acc["wall"] += time.perf_counter() - w
        acc["n"] += 1
        return y

    runtime.OrtModel.run = timed_run  # type: ignore[method-assign]
    try:
        # Batching off: every call is one batch-1 request (with it on, concurrency 64 gathers).
        server, port = await create_server(config_for(art, enabled=False))
        await server.start()
        loop = asyncio.get_running_loop()
        out: dict[int, tuple[float, float]] = {}
        try:
            for c in levels:
                acc.update(n=0, wall=0.0, cpu=0.0)
                await loop.run_in_executor(None, s.measure, f"127.0.0.1:{port}", "lenet5",
                                           [1, 1, 32, 32], c, seconds)
                n = max(1, int(acc["n"]))
                out[c] = (1e6 * acc["wall"] / n, 1e6 * acc["cpu"] / n)
        finally:
            await server.stop(0)
        return out
    finally:
        runtime.OrtModel.run = run  # type: ignore[method-assign]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--calls", type=int, default=2000, help="ORT calls per in-process condition")
    p.add_argument("--gaps", default="200,500,2000", help="µs of busy wait / sleep before a call")
    p.add_argument("--levels", default="1,8", help="concurrency levels inside the server")
    p.add_argument("--seconds", type=float, default=2.5, help="load per server level")
    p.add_argument("--out", type=Path, default=RESULTS)
    args = p.parse_args()
    gaps = [int(g) for g in args.gaps.split(",")]
    levels = [int(c) for c in args.levels.split(",")]
    from cnnctl.serving.runtime import CPU, new_session
    from tests.support.serving import make_artifact

    art = make_artifact(Path(tempfile.mkdtemp(prefix="cnnctl-bench-")) / "lenet5", "lenet5")
    session = new_session(art / "model.onnx", [CPU], 1)  # the small-batch session of serve
    x = np.random.default_rng(0).random((1, 1, 32, 32), dtype=np.float32)
    conditions: dict[str, Callable[[], None]] = {"back to back": lambda: None,
                                                  "after server-like Python work": _server_work()}
    for g in gaps:
        conditions[f"after a {g} µs busy wait"] = _spin(g / 1e6)
    for g in gaps:
        conditions[f"after a {g} µs sleep"] = _sleep(g / 1e6)
    _timed(session, x, lambda: None, 500)  # warm-up
    rounds: dict[str, list[tuple[float, float]]] = {}
    started = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime())
    for r in range(args.rounds):
        for name, between in conditions.items():
            rounds.setdefault(name, []).append(_timed(session, x, between, args.calls))
        for c, v in asyncio.run(_in_server(art, levels, args.seconds)).items():
            rounds.setdefault(f"inside cnnctl serve, concurrency {c}", []).append(v)
        print(f"round {r + 1}/{args.rounds} done", file=sys.stderr, flush=True)
    print("| lenet5 batch 1, 1-thread session | wall µs | thread CPU µs "
          "| CPU µs of the rounds |")
    print("|---|---:|---:|---|")
    table = {}
    for name, vals in rounds.items():
        wall = statistics.median(v[0] for v in vals)
        cpu = statistics.median(v[1] for v in vals)
        table[name] = {"wall_us": wall, "cpu_us": cpu, "rounds": vals}
        print(f"| {name} | {wall:.1f} | {cpu:.1f} | {', '.join(f'{v[1]:.0f}' for v in vals)} |")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({
        "started": started, "code": s._git_revision(),
        "machine": {"cpus": os.cpu_count(), "processor": platform.processor() or platform.machine(),
                    "python": platform.python_version()},
        "rounds": args.rounds, "calls": args.calls, "seconds_per_level": args.seconds,
        "results": table}, indent=1) + "\n")


if __name__ == "__main__":
    main()
