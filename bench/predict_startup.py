"""Issue 6: how fast ``cnnctl predict`` starts (it never imports torch) and answers, in one run.

    flock /tmp/cnnctl-bench.lock .venv/bin/python bench/predict_startup.py

Wall time of whole processes, each run --repeats times, median kept:
  * ``cnnctl predict --help`` (the CLI and click only);
  * ``cnnctl predict`` of one PNG against a lenet5 ``cnnctl serve`` already up on 127.0.0.1
    (interpreter start, imports of grpc/numpy/PIL, the metadata and infer calls, printing);
  * for scale, ``python -c "import torch"`` — what every command that needs torch pays first —
    and ``python -c pass``.
Writes bench/results/predict_startup.json and prints a markdown table.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.append(str(ROOT))  # tests.support: the helpers bench/ shares with the tests
RESULTS = ROOT / "bench" / "results" / "predict_startup.json"


def wall(cmd: list[str], repeats: int) -> dict[str, float]:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        done = subprocess.run(cmd, capture_output=True, text=True)
        times.append(time.perf_counter() - start)
        if done.returncode != 0:
            raise SystemExit(f"{' '.join(cmd)} failed: {done.stderr.strip()}")
    return {"median_s": round(statistics.median(times), 3), "min_s": round(min(times), 3),
            "max_s": round(max(times), 3)}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()

    import numpy as np
    from PIL import Image

    from tests.support.serving import CliServer, make_artifact

    py = sys.executable
    with tempfile.TemporaryDirectory() as tmp:
        artifact = make_artifact(Path(tmp) / "lenet5", "lenet5")
        png = Path(tmp) / "digit.png"
        Image.fromarray(np.random.default_rng(0).integers(0, 255, (28, 28), np.uint8)).save(png)
        rows: dict[str, dict[str, float]] = {}
        rows["python -c pass"] = wall([py, "-c", "pass"], args.repeats)
        rows["python -c 'import torch'"] = wall([py, "-c", "import torch"], args.repeats)
        rows["cnnctl predict --help"] = wall([py, "-m", "cnnctl", "predict", "--help"],
                                             args.repeats)
        with CliServer(str(artifact), "--intra-op-threads", "1") as server:
            rows["cnnctl predict (1 PNG, lenet5 server up)"] = wall(
                [py, "-m", "cnnctl", "predict", "--server", server.address, "--model", "lenet5",
                 str(png)], args.repeats)
        imports = subprocess.run(
            [py, "-c", "import sys, cnnctl.clients.commands, cnnctl.clients.client; "
                       "print('torch' in sys.modules)"], capture_output=True, text=True)
    result = {
        "machine": {"date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
                    "cpu": platform.processor() or platform.machine(), "cores": os.cpu_count(),
                    "loadavg": os.getloadavg(), "python": platform.python_version()},
        "repeats": args.repeats, "rows": rows,
        "client_imports_torch": imports.stdout.strip() == "True",
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print("| process | median s | min s | max s |\n|---|---:|---:|---:|")
    for name, r in rows.items():
        print(f"| `{name}` | {r['median_s']:.3f} | {r['min_s']:.3f} | {r['max_s']:.3f} |")
    print(f"client imports torch: {result['client_imports_torch']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
