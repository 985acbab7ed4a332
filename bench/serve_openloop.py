"""Closed-loop and open-loop load side by side, on `cnnctl serve` variants (lenet5; closed loops
batch-1, or --batch N).

    flock /tmp/cnnctl-bench.lock .venv/bin/python bench/serve_openloop.py \\
        --server "main=/path/to/main/.venv/bin/python" --server "new=.venv/bin/python" \\
        --server "no-gathering=.venv/bin/python --gather-max-ms 0" [--rounds 3]

A server is NAME=PYTHON [SERVE FLAGS...]: ``PYTHON -m cnnctl serve`` with those flags, so that
variants differ by one policy switch or by the checkout that PYTHON's cnnctl comes from (A/B of
code). Every variant serves the same random-weight lenet5 artifact.
- Closed loop (``--levels``): C requests in flight from bench/serve_speed.py's load generator,
  each sent when the last is answered: what a load generator, or a few busy callers, look like.
- Open loop (``--rates``): Triton's perf_analyzer sends requests at Poisson-distributed times at
  a fixed rate, whatever the answers do: what many independent users look like. The rates are
  fractions of the first server's closed-loop throughput at the highest level, measured once
  first (or of ``--rate-base`` req/s). At a fixed rate the throughput only says whether a server
  keeps up; latency and the server's CPU per request tell the variants apart.
Each round measures every point on every server, a point's servers back to back and their order
rotated from round to round, so that drifting load from other processes hits every variant
alike; the median of the rounds is kept. Writes bench/results/serve_openloop.json and prints a
markdown table with each server against the first.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import json
import os
import re
import shlex
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

BENCH = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH))  # bench/ is not a package

from client_vs_perf_analyzer import run_perf_analyzer  # noqa: E402
from serve_speed import cpu_seconds, git_revision, measure  # noqa: E402

RESULTS = BENCH / "results" / "serve_openloop.json"
SHAPE = [1, 1, 32, 32]
BATCH = 1  # images per closed-loop request (--batch); open loops send batch-1 requests


class Server:
    """``PYTHON -m cnnctl serve ARTIFACT --port 0 FLAGS`` in a process of its own."""

    def __init__(self, name: str, python: str, flags: list[str], artifact: Path) -> None:
        self.name, self.python, self.flags = name, python, flags
        # Run from the artifact's folder: from a checkout, `python -m` would import that
        # checkout's cnnctl/ package instead of the one PYTHON has installed.
        self.cwd = artifact.parent
        self.proc = subprocess.Popen(
            [python, "-m", "cnnctl", "-q", "serve", str(artifact), "--device", "cpu", "--host",
             "127.0.0.1", "--port", "0", *flags], stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT, text=True, cwd=self.cwd)
        lines = []
        for line in self.proc.stdout:  # type: ignore[union-attr]
            lines.append(line)
            found = re.search(r"listening on grpc://127\.0\.0\.1:(\d+)", line)
            if found:
                self.address = f"127.0.0.1:{found.group(1)}"
                return
        raise RuntimeError(f"server {name} did not start:\n{''.join(lines)}")

    def code(self) -> str:
        """The commit of the checkout whose cnnctl this server runs."""
        where = subprocess.run(
            [self.python, "-c", "import cnnctl.serving.batcher as m; print(m.__file__)"],
            capture_output=True, text=True, check=True, cwd=self.cwd).stdout.strip()
        return git_revision(Path(where).parent.parent)

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(30)


def closed_loop(server: Server, concurrency: int, seconds: float) -> dict[str, float]:
    return measure(server.address, "lenet5", [BATCH, *SHAPE[1:]], concurrency, seconds,
                   server_pid=server.proc.pid)


def open_loop(server: Server, rate: float, seconds: float) -> dict[str, float] | None:
    """perf_analyzer at ``rate`` req/s; the server's CPU per request from its CPU time over the
    whole run (perf_analyzer's warm-up and trials all run at that rate). None: no stable
    measurement, or requests failed (a server that does not keep up fills its queue)."""
    start, cpu = time.monotonic(), cpu_seconds(server.proc.pid)
    try:
        # --async: a request goes at its time even while earlier ones are unanswered (in sync
        # mode each of perf_analyzer's few threads would wait for its answer: a closed loop)
        res = run_perf_analyzer(server.address, "lenet5", 1, int(seconds * 1000), 1, ("--async",),
                                rate=rate)
    except RuntimeError as exc:
        print(f"  {server.name}: perf_analyzer failed: {str(exc)[-300:]}", flush=True)
        return None
    cores = (cpu_seconds(server.proc.pid) - cpu) / (time.monotonic() - start)
    if res is None:
        return None
    return {"req_per_s": res["images_per_s"], "p50_ms": res["p50_ms"], "p90_ms": res["p90_ms"],
            "p99_ms": res["p99_ms"], "server_cpu_us_per_req": cores / rate * 1e6}


def run_all(specs: list[tuple[str, str, list[str]]], levels: list[int], rates: list[float],
            rate_base: float | None, seconds: float, rounds: int) -> dict[str, Any]:
    from tests.support.serving import make_artifact

    started = dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")
    load_at_start = os.getloadavg()
    artifact = make_artifact(Path(tempfile.mkdtemp(prefix="serve-openloop-")) / "lenet5")
    with contextlib.ExitStack() as stack:
        servers = []
        for name, python, flags in specs:
            server = Server(name, python, flags, artifact)
            stack.callback(server.stop)
            servers.append(server)
        if rate_base is None:
            rate_base = closed_loop(servers[0], max(levels), seconds)["req_per_s"]
            print(f"rate base: {servers[0].name} closed loop c{max(levels)}: {rate_base:.0f} "
                  f"req/s", flush=True)
        points = ([("closed", c) for c in levels]
                  + [("open", round(f * rate_base)) for f in rates])
        samples: dict[tuple[str, str, float], list[dict[str, float]]] = {}
        failed: dict[tuple[str, str, float], int] = {}  # rounds without a result
        for r in range(rounds):
            print(f"round {r + 1}/{rounds}", flush=True)
            for mode, level in points:
                shift = r % len(servers)
                for server in servers[shift:] + servers[:shift]:
                    res = (closed_loop(server, int(level), seconds) if mode == "closed"
                           else open_loop(server, level, seconds))
                    if res is None:
                        print(f"  {server.name} {mode} {level}: no result; left out", flush=True)
                        failed[(server.name, mode, level)] = failed.get(
                            (server.name, mode, level), 0) + 1
                        continue
                    samples.setdefault((server.name, mode, level), []).append(res)
                    print(f"  {server.name:16s} {mode:6s} {level:>6}: {res['req_per_s']:6.0f} "
                          f"req/s  p50 {res['p50_ms']:6.2f}  p99 {res['p99_ms']:6.2f} ms  server "
                          f"CPU {res['server_cpu_us_per_req']:5.0f} µs/req", flush=True)
        codes = {s.name: s.code() for s in servers}
    rows = []
    for mode, level in points:
        for server in servers:
            runs = samples.get((server.name, mode, level), [])
            lost = failed.get((server.name, mode, level), 0)
            if not runs:
                rows.append({"server": server.name, "mode": mode, "rate": level,
                             "rounds_failed": lost})
                continue
            # the median round by req/s, or in the open loop (every variant was sent the same
            # rate) by p50 latency
            key = "req_per_s" if mode == "closed" else "p50_ms"
            median = dict(sorted(runs, key=lambda res: res[key])[len(runs) // 2])
            rows.append({"server": server.name, "mode": mode,
                         "concurrency" if mode == "closed" else "rate": level, **median,
                         "rounds_req_per_s": [round(res["req_per_s"]) for res in runs],
                         "rounds_p50_ms": [round(res["p50_ms"], 2) for res in runs],
                         "rounds_p99_ms": [round(res["p99_ms"], 2) for res in runs],
                         "rounds_failed": lost})
    return {"command": " ".join(shlex.quote(a) for a in sys.argv), "started": started,
            "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
            "servers": [{"name": n, "python": p, "flags": f, "code": codes[n]}
                        for n, p, f in specs],
            "machine": {"cpus": os.cpu_count(), "load_average_at_start": load_at_start,
                        "load_average_at_end": os.getloadavg()},
            "model": "lenet5 (random weights), batch-1 requests", "seconds_per_point": seconds,
            "rounds": rounds, "rate_base_req_per_s": rate_base, "rate_fractions": rates,
            "rows": rows}


def table(result: dict[str, Any]) -> str:
    """Each row beside the first server's at the same point: req/s (closed loop) or p50 (open
    loop, where every server was sent the same rate) as a ratio."""
    first = result["servers"][0]["name"]
    lines = ["| load | server | req/s | p50 ms | p90 ms | p99 ms | server CPU µs/req | "
             f"vs {first} |", "|---|---|---:|---:|---:|---:|---:|---:|"]
    base = {(r["mode"], r.get("concurrency", r.get("rate"))): r
            for r in result["rows"] if r["server"] == first}
    for r in result["rows"]:
        level = r.get("concurrency", r.get("rate"))
        if "req_per_s" not in r:
            lines.append(f"| {r['mode']} {level} | {r['server']} | no result in "
                         f"{r['rounds_failed']} rounds | | | | | |")
            continue
        ref = base.get((r["mode"], level))
        ref = ref if ref and "req_per_s" in ref else None
        if r["mode"] == "closed":
            load = f"closed c{level}"
            ratio = f"{r['req_per_s'] / ref['req_per_s']:.2f}× req/s" if ref else "-"
        else:
            load = f"open {level} req/s"
            ratio = f"{r['p50_ms'] / ref['p50_ms']:.2f}× p50" if ref else "-"
        p90 = f"{r['p90_ms']:.2f}" if "p90_ms" in r else "-"
        lines.append(f"| {load} | {r['server']} | {r['req_per_s']:.0f} | {r['p50_ms']:.2f} | "
                     f"{p90} | {r['p99_ms']:.2f} | {r['server_cpu_us_per_req']:.0f} | {ratio} |")
    return "\n".join(lines)


def parse_server(text: str) -> tuple[str, str, list[str]]:
    name, sep, rest = text.partition("=")
    words = shlex.split(rest)
    if not sep or not name or not words:
        raise argparse.ArgumentTypeError(f"{text!r}: expected NAME=PYTHON [SERVE FLAGS...]")
    return name, os.path.abspath(words[0]), words[1:]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--server", type=parse_server, action="append", required=True,
                   metavar="NAME=PYTHON [FLAGS]", help="a server variant (repeat; the first is "
                   "the reference)")
    p.add_argument("--levels", default="1,8,64", help="closed-loop concurrency levels")
    p.add_argument("--rates", default="0.3,0.6,0.9",
                   help="open-loop rates, as fractions of the rate base")
    p.add_argument("--rate-base", type=float, default=None, metavar="REQ_PER_S",
                   help="default: the first server's closed-loop req/s at the highest level")
    p.add_argument("--seconds", type=float, default=2.5,
                   help="closed loop: measured seconds per point; open loop: perf_analyzer's "
                   "measurement window")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--batch", type=int, default=1,
                   help="images per closed-loop request (open loops: always 1)")
    p.add_argument("--out", type=Path, default=RESULTS)
    p.add_argument("--replot", type=Path, metavar="JSON",
                   help="measure nothing: print JSON's table")
    args = p.parse_args()
    if args.replot:
        print(table(json.loads(args.replot.read_text())))
        return
    global BATCH
    BATCH = args.batch
    names = [name for name, _, _ in args.server]
    if len(set(names)) != len(names):
        p.error(f"--server names must differ: {', '.join(names)}")
    result = run_all(args.server, [int(c) for c in args.levels.split(",") if c],
                     [float(f) for f in args.rates.split(",") if f], args.rate_base,
                     args.seconds, args.rounds)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    tmp = args.out.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(result, indent=2) + "\n")
    os.replace(tmp, args.out)
    print()
    print(table(result))
    print(f"\nwrote {args.out}")


if __name__ == "__main__":
    main()
