"""``cnnctl demo``: train → export → serve → classify over gRPC, in one subprocess."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest


def run_demo(*args: str, timeout: float) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "cnnctl", "-q", "demo", "--no-progress", *args],
                          capture_output=True, text=True, timeout=timeout)


def test_demo_quick_run_agrees_over_the_wire(tmp_path: Path) -> None:
    out = tmp_path / "demo"
    r = run_demo("--json", "--max-steps-per-epoch", "15", "--images", "300", "--out", str(out),
                 timeout=150)
    assert r.returncode == 0, r.stderr[-3000:]
    s = json.loads(r.stdout)
    acc = s["accuracy"]
    assert s["images"] == 300
    # The same 300 images, PNG over gRPC vs the checkpoint in PyTorch: the same answers.
    assert abs(acc["over_the_wire"] - acc["checkpoint"]) <= 0.005
    assert acc["over_the_wire"] > 0.5  # 15 steps already learn most digits; chance is 0.1
    assert 0 < s["latency_ms"]["p50"] <= s["latency_ms"]["p99"]
    assert (out / "artifact" / "manifest.json").is_file() and (out / "run" / "best.pt").is_file()
    assert (out / "artifact" / "model.onnx").is_file() and (out / "artifact" / "model.pt").is_file()


@pytest.mark.slow
@pytest.mark.skipif(os.environ.get("CNNCTL_SLOW") != "1" and os.environ.get("CI") != "true",
                    reason="the README's full demo (~50 s on 2 cores); CI=true or CNNCTL_SLOW=1 "
                           "runs it")
def test_demo_default_prints_the_over_the_wire_accuracy() -> None:
    r = run_demo(timeout=240)
    assert r.returncode == 0, r.stderr[-3000:]
    line = next(ln for ln in r.stdout.splitlines() if "over the wire" in ln)
    assert float(line.split()[-1].rstrip("%")) > 90.0
    assert "checkpoint (PyTorch, in-process)" in r.stdout and "p99" in r.stdout
