"""Issue 21: what the golden check costs at start-up (and at every load), side by side in one run.

    flock /tmp/cnnctl-bench.lock .venv/bin/python bench/startup.py

For each model (random weights; a 64-image golden set, as `cnnctl export` stores):
  * ``cnnctl serve ARTIFACT --port 0`` with ``--golden-check`` (the default) and with
    ``--no-golden-check``, alternated, --repeats times each: wall time from process start to the
    "listening" line (interpreter, imports, load, warm-up, check, bind);
  * in the same process, the parts of one load (serving/readiness.py): the ORT sessions built
    from the checked bytes, the warm-up, and the golden check alone.
Writes bench/results/startup.json and prints a markdown table.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.append(str(ROOT))  # tests.support: the helpers bench/ shares with the tests
RESULTS = ROOT / "bench" / "results" / "startup.json"
MODELS = ("lenet5", "resnet-mini", "cifar-net-v3")


def serve_start(artifact: Path, *flags: str) -> float:
    from tests.support.serving import CliServer

    start = time.perf_counter()
    with CliServer(str(artifact), "--device", "cpu", *flags, timeout=120):
        return time.perf_counter() - start


def load_parts(artifact: Path) -> dict[str, float]:
    from cnnctl.export.manifest import load_manifest
    from cnnctl.serving.readiness import check_golden, warm_up
    from cnnctl.serving.runtime import OrtModel

    manifest = load_manifest(artifact, verify_files=False)
    t0 = time.perf_counter()
    runtime = OrtModel(artifact, manifest, device="cpu")
    t1 = time.perf_counter()
    warm_up(runtime, manifest, 64)
    t2 = time.perf_counter()
    check_golden(runtime, artifact, manifest, 64)
    t3 = time.perf_counter()
    runtime.close()
    return {"sessions_s": t1 - t0, "warm_up_s": t2 - t1, "golden_s": t3 - t2}


def median(values: list[float]) -> float:
    return round(statistics.median(values), 4)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()

    from tests.support.serving import make_artifact

    rows = {}
    with tempfile.TemporaryDirectory() as tmp:
        for model in MODELS:
            artifact = make_artifact(Path(tmp) / model, model)
            on, off, parts = [], [], []
            for _ in range(args.repeats):  # alternated: drifts in machine load hit both
                on.append(serve_start(artifact))
                off.append(serve_start(artifact, "--no-golden-check"))
                parts.append(load_parts(artifact))
            rows[model] = {
                "serve_start_golden_s": median(on), "serve_start_no_golden_s": median(off),
                "ratio": round(statistics.median(on) / statistics.median(off), 3),
                "sessions_s": median([p["sessions_s"] for p in parts]),
                "warm_up_s": median([p["warm_up_s"] for p in parts]),
                "golden_check_s": median([p["golden_s"] for p in parts]),
                "model_bytes": (artifact / "model.onnx").stat().st_size,
                "golden_bytes": (artifact / "golden.npz").stat().st_size,
            }
    result = {
        "machine": {"date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
                    "cpu": platform.processor() or platform.machine(), "cores": os.cpu_count(),
                    "loadavg": os.getloadavg(), "python": platform.python_version()},
        "repeats": args.repeats, "golden_images": 64, "device": "cpu", "rows": rows,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print("| model | serve start, golden check | without | ratio | sessions | warm-up | "
          "golden check |\n|---|---:|---:|---:|---:|---:|---:|")
    for name, r in rows.items():
        print(f"| {name} | {r['serve_start_golden_s']:.2f} s | "
              f"{r['serve_start_no_golden_s']:.2f} s | {r['ratio']:.2f} | "
              f"{1000 * r['sessions_s']:.0f} ms | {1000 * r['warm_up_s']:.0f} ms | "
              f"{1000 * r['golden_check_s']:.0f} ms |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
