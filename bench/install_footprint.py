"""Install size and start-up time of the base install and the [train] install, side by side.

    python bench/install_footprint.py [--runs 5] [--out bench/results/install_footprint.json]

Makes two fresh venvs from this checkout (`pip install .` and `pip install '.[train]'`, from the
package index as a user would), then for each: the venv's size on disk, the seconds `pip install`
took, and the median wall time of `cnnctl --help`, of `cnnctl serve` of lenet5 from start to its
"listening" line, and of `cnnctl predict` of one PNG against that server (each a new process).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import venv
from datetime import datetime, timezone
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.append(str(ROOT))

from tests.support.serving import make_artifact  # noqa: E402

INSTALLS = {"base": ".", "train": ".[train]"}


def _size_mb(path: Path) -> float:
    total = 0
    for p in path.rglob("*"):
        if p.is_file() and not p.is_symlink():
            total += p.stat().st_size
    return total / 1e6


def _timed(cmd: list[str], cwd: Path) -> float:
    start = time.perf_counter()
    subprocess.run(cmd, cwd=cwd, check=True, capture_output=True, timeout=300)
    return time.perf_counter() - start


def _serve_start(cnnctl: Path, artifact: Path, cwd: Path) -> tuple[float, subprocess.Popen[str],
                                                                    int]:
    start = time.perf_counter()
    proc = subprocess.Popen([str(cnnctl), "serve", str(artifact), "--host", "127.0.0.1", "--port",
                             "0"], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            cwd=cwd, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    assert proc.stdout is not None
    for line in proc.stdout:
        found = re.search(r"listening on grpc://[^:]+:(\d+)", line)
        if found:
            return time.perf_counter() - start, proc, int(found.group(1))
    raise RuntimeError("cnnctl serve did not start")


def measure(name: str, spec: str, work: Path, artifact: Path, png: Path, runs: int) -> dict:
    env_dir = work / name
    venv.create(env_dir, with_pip=True)
    python, cnnctl = env_dir / "bin" / "python", env_dir / "bin" / "cnnctl"
    start = time.perf_counter()
    subprocess.run([str(python), "-m", "pip", "install", "-q", "--disable-pip-version-check",
                    "--no-cache-dir", spec], cwd=ROOT, check=True, timeout=1800)
    install_s = time.perf_counter() - start
    help_s, serve_s, predict_s = [], [], []
    for _ in range(runs):
        help_s.append(_timed([str(cnnctl), "--help"], work))
        seconds, proc, port = _serve_start(cnnctl, artifact, work)
        serve_s.append(seconds)
        try:
            predict_s.append(_timed([str(cnnctl), "predict", "--server", f"127.0.0.1:{port}",
                                     "--model", "lenet5", str(png)], work))
        finally:
            proc.terminate()
            proc.wait(30)
    has_torch = subprocess.run([str(python), "-c", "import torch"], cwd=work,
                               capture_output=True).returncode == 0
    row = {"install": name, "pip_install": f"pip install '{spec}'", "size_mb": _size_mb(env_dir),
           "install_s": install_s, "torch": has_torch,
           "help_s": statistics.median(help_s), "serve_start_s": statistics.median(serve_s),
           "predict_s": statistics.median(predict_s)}
    print(json.dumps(row), flush=True)
    shutil.rmtree(env_dir)
    return row


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--out", type=Path, default=ROOT / "bench/results/install_footprint.json")
    args = parser.parse_args()
    import numpy as np
    from PIL import Image

    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        artifact = make_artifact(work / "lenet5")
        png = work / "digit.png"
        Image.fromarray(np.zeros((28, 28), dtype=np.uint8)).save(png)
        rows = [measure(name, spec, work, artifact, png, args.runs)
                for name, spec in INSTALLS.items()]
    result = {"bench": "install_footprint", "date": datetime.now(timezone.utc).isoformat(),
              "command": " ".join(["bench/install_footprint.py", *sys.argv[1:]]),
              "machine": {"cpus": os.cpu_count(), "python": platform.python_version()},
              "runs": args.runs, "rows": rows}
    args.out.write_text(json.dumps(result, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
