"""`cnnctl bench` vs Triton's `perf_analyzer` against the same `cnnctl serve`, same concurrency.

Both are closed-loop load generators (C requests in flight, each sent when the previous answer
arrives) sending batch-1 random FP32 tensors, so their throughput and latency percentiles should
agree; this script runs them interleaved (bench, perf_analyzer, bench, ... per level, so drift in
the machine's load hits both) and writes bench/results/client_vs_perf_analyzer.json.

    flock /tmp/cnnctl-bench.lock .venv/bin/python bench/client_vs_perf_analyzer.py ARTIFACT_DIR

perf_analyzer ships in the tritonclient wheel; it needs libb64 (apt-get install libb64-0d) and
libcudart.so.12 (pip install nvidia-cuda-runtime-cu12), found here through LD_LIBRARY_PATH.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
from datetime import datetime, timezone
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.append(str(ROOT))  # tests.support: the helpers bench/ shares with the tests

from tests.support.serving import CliServer  # noqa: E402
PA = "perf_analyzer"


def perf_analyzer_env() -> dict[str, str]:
    import perf_analyzer  # bench/perf_analyzer.py: which binary, and its libraries

    return perf_analyzer.env()


def run_perf_analyzer(address: str, model: str, concurrency: int, window_ms: int,
                      batch: int = 1, extra: tuple[str, ...] = (),
                      rate: float | None = None) -> dict | None:
    """One perf_analyzer measurement; ``extra``: more flags (e.g. --shared-memory system).
    ``rate``: open loop, Poisson arrivals at this many requests/s, instead of ``concurrency``."""
    import perf_analyzer

    exe = perf_analyzer.find()
    load = (["--request-rate-range", f"{rate}:{rate}", "--request-distribution", "poisson"]
            if rate else ["--concurrency-range", f"{concurrency}:{concurrency}"])
    cmd = [exe, "-m", model, "-u", address, "-i", "grpc", "-b", str(batch), *load,
           "--measurement-interval", str(window_ms), "--max-trials", "6",
           "--stability-percentage", "50", *extra]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=perf_analyzer_env())
    out = r.stdout
    if "Failed to obtain stable measurement" in out + r.stderr:
        if window_ms < 8000:  # longer windows
            return run_perf_analyzer(address, model, concurrency, window_ms * 2, batch, extra,
                                     rate)
        return None  # no stable measurement even at 8 s windows: this run is left out
    # perf_analyzer aborts *after* printing its client-side results when the server's per-stage
    # statistics counts differ ("compute counts must be the same"); the client numbers stand.
    found = re.search(r"Throughput: ([\d.]+) infer/sec", out)
    if not found:
        raise RuntimeError(f"perf_analyzer gave no result (rc {r.returncode}):\n{out}\n{r.stderr}")

    def usec(name: str) -> float:
        m = re.search(rf"{name} latency: (\d+) usec", out)
        return int(m.group(1)) / 1e3 if m else float("nan")

    return {"images_per_s": float(found.group(1)), "p50_ms": usec("p50"), "p90_ms": usec("p90"),
            "p99_ms": usec("p99"), "rc": r.returncode,
            "aborted_after_results": "compute counts must be the same" in r.stderr}


def run_bench(address: str, model: str, concurrency: int, duration: float) -> dict:
    r = subprocess.run([sys.executable, "-m", "cnnctl", "-q", "bench", "--server", address,
                        "--model", model, "--concurrency", str(concurrency), "--duration",
                        str(duration), "--warmup", "0.5", "--json"],
                       capture_output=True, text=True, timeout=300, check=True)
    row = json.loads(r.stdout)["results"][0]
    return {k: row[k] for k in ("images_per_s", "p50_ms", "p90_ms", "p99_ms", "requests",
                                "errors")}


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("artifact")
    parser.add_argument("--model", default=None, help="served name (default: the manifest's)")
    parser.add_argument("--levels", default="1,8,64")
    parser.add_argument("--repeats", type=int, default=6)
    parser.add_argument("--duration", type=float, default=2.0, help="cnnctl bench seconds")
    parser.add_argument("--window-ms", type=int, default=2000, help="perf_analyzer window")
    parser.add_argument("--out", default=str(ROOT / "bench/results/client_vs_perf_analyzer.json"))
    args = parser.parse_args()
    from cnnctl.export.manifest import load_manifest

    model = args.model or load_manifest(args.artifact).name
    levels = [int(c) for c in args.levels.split(",")]
    tools = ["cnnctl_bench", PA]
    results = []
    with CliServer(args.artifact) as server:
        for c in levels:
            runs = []
            for i in range(args.repeats):
                # Back to back, rotating which goes first, so a neighbour's burst of CPU use lands
                # on every tool about equally.
                order = tools[i % len(tools):] + tools[:i % len(tools)]
                run: dict = {}
                for tool in order:
                    run[tool] = (run_perf_analyzer(server.address, model, c, args.window_ms)
                                 if tool == PA else
                                 run_bench(server.address, model, c, args.duration))
                if run[PA] is None:
                    print(f"concurrency {c}: perf_analyzer found no stable measurement; run left "
                          f"out", flush=True)
                    continue
                runs.append(run)
            # Medians: on a shared 2-core machine a run can lose half its CPU to a neighbour's
            # job; the median over interleaved runs is what each tool measures when it doesn't.
            med = {t: statistics.median(r[t]["images_per_s"] for r in runs) for t in tools}
            p50 = {t: statistics.median(r[t]["p50_ms"] for r in runs) for t in tools}
            ratio = {t: med[t] / med[PA] for t in tools if t != PA}
            pair = {t: statistics.median(r[t]["images_per_s"] / r[PA]["images_per_s"]
                                         for r in runs) for t in tools if t != PA}
            results.append({"concurrency": c, "runs": runs, "median_images_per_s": med,
                            "median_p50_ms": p50, "ratio_of_medians": ratio,
                            "median_pair_ratio": pair})
            print(f"concurrency {c:>3}: " + " | ".join(
                f"{t} {med[t]:6.0f} img/s p50 {p50[t]:6.2f} ms"
                + (f" (x{ratio[t]:.3f}, pairs x{pair[t]:.3f})" if t != PA else "")
                for t in tools), flush=True)
    doc = {"date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
           "cpu_count": os.cpu_count(), "load_average": os.getloadavg(), "model": model,
           "artifact": str(args.artifact), "server": "cnnctl serve (defaults)",
           "settings": vars(args), "results": results}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(doc, indent=2) + "\n")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
