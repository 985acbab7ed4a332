"""Issue 21: what a live version swap costs the requests being served, open loop, side by side.

    flock /tmp/cnnctl-bench.lock .venv/bin/python bench/swap_under_load.py [--rate 200] [--rounds 3]

`cnnctl serve --model-control-mode poll --repository-poll-secs 0.2` serves version 1 of a
random-weight model; one client sends batch-1 requests at Poisson-distributed times (--rate per
second, whatever the answers do) for 6 s. In the "swap" run, version 2's directory is copied into
the repository at 2 s: the server loads it in its loader thread (sessions, warm-up, golden check),
swaps it in and drains version 1, all while the requests keep coming. The "steady" run is the same
without the copy. Rounds alternate the two. Reported per run: failed requests, and latency p50 /
p99 / max over the whole run and over the swap window (from the copy until 0.5 s after the first
version-2 answer; the same seconds in the steady run). Writes bench/results/swap_under_load.json.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import shutil
import statistics
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.append(str(ROOT))  # tests.support: the helpers bench/ shares with the tests
RESULTS = ROOT / "bench" / "results" / "swap_under_load.json"
SECONDS, SWAP_AT = 6.0, 2.0


async def open_loop(address: str, rate: float, shape: list[int], on_time: Any) -> list[tuple]:
    """(sent at, latency, ok, version) of each request; ``on_time(t)`` is called each tick."""
    import grpc

    from tests.support.serving import infer_request, stub

    rng = np.random.default_rng(0)
    x = rng.standard_normal(shape, dtype=np.float32)
    records: list[tuple] = []
    async with grpc.aio.insecure_channel(address) as channel:
        s = stub(channel)
        request = infer_request(x, model="model")
        loop = asyncio.get_running_loop()
        start = loop.time()

        async def one(sent: float) -> None:
            try:
                resp = await s.ModelInfer(request, timeout=10)
                records.append((sent - start, loop.time() - sent, True, resp.model_version))
            except grpc.aio.AioRpcError as exc:
                records.append((sent - start, loop.time() - sent, False, exc.code().name))

        tasks = []
        due = start
        while due - start < SECONDS:
            due += rng.exponential(1.0 / rate)
            await asyncio.sleep(max(0.0, due - loop.time()))
            on_time(loop.time() - start)
            tasks.append(asyncio.ensure_future(one(loop.time())))
        await asyncio.gather(*tasks)
    return records


def stats(latencies: list[float]) -> dict[str, float]:
    if not latencies:
        return {}
    q = np.percentile(latencies, [50, 99])
    return {"n": len(latencies), "p50_ms": round(1000 * q[0], 2), "p99_ms": round(1000 * q[1], 2),
            "max_ms": round(1000 * max(latencies), 2)}


def one_run(model: str, staging: Path, swap: bool, rate: float) -> dict[str, Any]:
    from tests.support.serving import CliServer

    with tempfile.TemporaryDirectory() as tmp:
        repo = Path(tmp) / "repo"
        shutil.copytree(staging / "1", repo / "model" / "1")
        copied: list[float] = []

        def on_time(t: float) -> None:
            if swap and not copied and t >= SWAP_AT:
                shutil.copytree(staging / "2", repo / "model" / "2")
                copied.append(t)

        from cnnctl.training.models import get_spec

        shape = [1, *get_spec(model).input_shape]
        with CliServer("--repository", str(repo), "--model-control-mode", "poll",
                       "--repository-poll-secs", "0.2", "--device", "cpu") as server:
            records = asyncio.run(open_loop(server.address, rate, shape, on_time))
    swapped_at = min((r[0] for r in records if r[3] == "2"), default=None)
    end = (swapped_at + 0.5) if swapped_at is not None else SWAP_AT + 1.5
    window = [r[1] for r in records if SWAP_AT <= r[0] <= end and r[2]]
    return {"swap": swap, "failed": sum(not r[2] for r in records),
            "v1_answers": sum(r[3] == "1" for r in records),
            "v2_answers": sum(r[3] == "2" for r in records),
            "first_v2_sent_s": swapped_at, "window_s": [SWAP_AT, round(end, 3)],
            "all": stats([r[1] for r in records if r[2]]), "window": stats(window)}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="cifar-net-v3")
    parser.add_argument("--rate", type=float, default=200.0, help="requests per second")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()

    from tests.support.serving import make_artifact

    runs = []
    with tempfile.TemporaryDirectory() as tmp:
        staging = Path(tmp)
        make_artifact(staging / "1", args.model, name="model", version="1", seed=0)
        make_artifact(staging / "2", args.model, name="model", version="2", seed=1)
        for _ in range(args.rounds):
            for swap in (True, False):
                runs.append(one_run(args.model, staging, swap, args.rate))

    def med(swap: bool, part: str, key: str) -> float:
        return statistics.median(r[part][key] for r in runs if r["swap"] == swap)

    summary = {("swap" if s else "steady"): {
        f"{part}_{key}": med(s, part, key) for part in ("all", "window")
        for key in ("p50_ms", "p99_ms", "max_ms")} | {
        "failed": sum(r["failed"] for r in runs if r["swap"] == s)} for s in (True, False)}
    result = {
        "machine": {"date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
                    "cpu": platform.processor() or platform.machine(), "cores": os.cpu_count(),
                    "loadavg": os.getloadavg(), "python": platform.python_version()},
        "model": args.model, "rate_per_s": args.rate, "seconds": SECONDS, "rounds": args.rounds,
        "summary": summary, "runs": runs,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"{args.model}, open loop {args.rate:.0f} req/s, median of {args.rounds} rounds")
    print("| run | failed | p50 | p99 | max | swap window p50 | p99 | max |\n"
          "|---|---:|---:|---:|---:|---:|---:|---:|")
    for name, s in summary.items():
        print(f"| {name} | {s['failed']} | {s['all_p50_ms']:.2f} ms | {s['all_p99_ms']:.2f} ms | "
              f"{s['all_max_ms']:.1f} ms | {s['window_p50_ms']:.2f} ms | "
              f"{s['window_p99_ms']:.2f} ms | {s['window_max_ms']:.1f} ms |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
