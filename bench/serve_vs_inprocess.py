"""Target 3 of issue 5 on its own: lenet5 batch-64 requests to `cnnctl serve` against in-process
ONNX Runtime at batch 64, with the reference measured right before each server point.

serve_speed.py measures the reference once per round, ~1-2 minutes away from some of the server
points it is compared with; on a VM whose speed drifts by 1.5x within minutes that moment decides
much of a ratio. Here every point (one load generator, one concurrency) gets its own reference,
measured just before it, and the ratio of that pair is kept: the median over the rounds is the
result. Points: our client and perf_analyzer, tensors in the messages and through shared memory,
each request a ModelInfer call or (", streaming") a message on a ModelStreamInfer stream per
client connection (serve_speed.STREAMING says why).

    flock /tmp/cnnctl-bench.lock .venv/bin/python bench/serve_vs_inprocess.py --rounds 7
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))  # bench/ is not a package
sys.path.append(str(Path(__file__).resolve().parents[1]))  # tests.support

import serve_speed as s  # noqa: E402

RESULTS = Path(__file__).parent / "results" / "serve_vs_inprocess.json"
SHAPE = [64, 1, 32, 32]
# --setups short name -> the row's name: load generator, where the tensors go, call or stream
SETUPS = {f"{gen}-{where}{stream}": f"{gen_name}, {where_name}{stream_name}"
          for stream, stream_name in (("", ""), ("-stream", ", streaming"))
          for gen, gen_name in (("ours", "ours"), ("pa", "perf_analyzer"))
          for where, where_name in (("msg", "in the messages"), ("shm", "shared memory"))}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rounds", type=int, default=7)
    p.add_argument("--seconds", type=float, default=2.5, help="measured seconds per point")
    p.add_argument("--levels", default="1,8,64", help="concurrency levels")
    p.add_argument("--setups", default=",".join(SETUPS),
                   help=f"comma-separated subset of: {', '.join(SETUPS)}")
    p.add_argument("--out", type=Path, default=RESULTS)
    args = p.parse_args()
    levels = [int(c) for c in args.levels.split(",")]
    short = [x.strip() for x in args.setups.split(",") if x.strip()]
    unknown = [x for x in short if x not in SETUPS]
    if unknown:
        p.error(f"--setups: unknown setup {unknown[0]!r}; known: {', '.join(SETUPS)}")
    setups = [SETUPS[x] for x in short]
    from tests.support.serving import CliServer, make_artifact

    work = Path(tempfile.mkdtemp(prefix="cnnctl-bench-"))
    art = make_artifact(work / "lenet5", "lenet5")
    pairs: dict[str, list[tuple[float, float]]] = {}
    started = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime())
    code = s._git_revision()  # now: the tree may change while the run goes on
    load_start = os.getloadavg()
    with contextlib.ExitStack() as stack:
        server = stack.enter_context(CliServer(str(art), "--device", "cpu",
                                               "--allow-shared-memory"))
        for r in range(args.rounds):
            print(f"round {r + 1}/{args.rounds}", flush=True)
            for c in levels:
                for setup in setups:
                    ref = s.ort_inprocess(art / "model.onnx", SHAPE, args.seconds)["img_per_s"]
                    shm, stream = "shared memory" in setup, setup.endswith("streaming")
                    if setup.startswith("ours"):
                        res = s.measure(server.address, "lenet5", SHAPE, c, args.seconds,
                                        server_pid=server.proc.pid, shm=shm, stream=stream)
                    else:
                        flags = (*(s.PA_SHM if shm else ()), *(["--streaming"] if stream else []))
                        res = s._perf_analyzer(server.address, "lenet5", 64, c, args.seconds,
                                               tuple(flags))
                    if res is None:  # perf_analyzer found no stable window: no pair this round
                        continue
                    pairs.setdefault(f"{setup}|{c}", []).append((res["img_per_s"], ref))
    rows = []
    for key, got in pairs.items():
        setup, c = key.split("|")
        ratios = [a / b for a, b in got]
        rows.append({"setup": setup, "concurrency": int(c), "pairs": got,
                     "median_ratio": statistics.median(ratios),
                     "median_img_per_s": statistics.median(a for a, _ in got),
                     "median_reference": statistics.median(b for _, b in got)})
    result = {"started": started, "ended": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()),
              "code": code, "machine": f"{platform.processor() or platform.machine()},"
              f" {os.cpu_count()} cores", "load_average_at_start": load_start,
              "load_average_at_end": os.getloadavg(), "seconds_per_point": args.seconds,
              "rounds": args.rounds, "rows": rows}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1))
    print("| load generator, tensors | concurrency | img/s (median) | reference img/s (median) "
          "| ratio, median of the pairs | ratios of the pairs |")
    print("|---|---:|---:|---:|---:|---|")
    for row in rows:
        ratios = ", ".join(f"{a / b:.2f}" for a, b in row["pairs"])
        print(f"| {row['setup']} | {row['concurrency']} | {row['median_img_per_s']:.0f} | "
              f"{row['median_reference']:.0f} | **{row['median_ratio']:.2f}** | {ratios} |")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
