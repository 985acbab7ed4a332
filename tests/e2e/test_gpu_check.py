"""Issue 23: bench/gpu_check.sh runs anywhere with --dry-run: it says what it would run on a GPU and
runs its CPU-side parts (train and export lenet5 and cifar-net-v3, serve each with dynamic batching
on and off, check the served logits, `cnnctl bench` at batch 1 and 64)."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_dry_run_says_what_it_would_run_and_runs_the_cpu_parts() -> None:
    env = {**os.environ, "PYTHON": sys.executable,
           "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"}
    done = subprocess.run(["bash", "bench/gpu_check.sh", "--dry-run"], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=600)
    out = done.stdout
    assert done.returncode == 0, out[-3000:] + done.stderr[-3000:]
    assert "would run (timeout 240s):" in out and "tests/unit/training/test_gpu.py" in out
    assert ("-m cnnctl train --model resnet-mini --dataset mnist "
            in out and "--device cuda" in out)
    assert "bench/gpu_serve.py --device cuda --out bench/results/gpu.json" in out
    for model in ("lenet5", "cifar-net-v3"):
        for batching in ("on ", "off"):
            for batch in (" 1", "64"):
                assert f"{model} batching {batching} batch {batch}:" in out, out
    assert "on CPUExecutionProvider fp32" in out
    assert "serving check: 4 servers, 0 failed checks" in out
    assert not (ROOT / "bench" / "results" / "gpu" / "log.txt").is_file() or \
        "dry run" not in (ROOT / "bench" / "results" / "gpu" / "log.txt").read_text()


def _gpu_serve():  # type: ignore[no-untyped-def]
    spec = importlib.util.spec_from_file_location("gpu_serve", ROOT / "bench" / "gpu_serve.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_checks_fail_when_cuda_was_not_used_or_logits_are_off() -> None:
    checks = _gpu_serve().checks
    ok_rows = {"1": [{"errors": 0, "error_codes": {}}]}
    good = {"model": "lenet5", "dynamic_batching": True, "provider": "CUDAExecutionProvider",
            "precision": "fp16", "logits_max_rel_diff_vs_cpu_fp32": 0.001, "bench": ok_rows}
    assert checks([good], "cuda") == []
    fell_back = {**good, "provider": "CPUExecutionProvider", "precision": "fp32",
                 "logits_max_rel_diff_vs_cpu_fp32": 1e-6}
    assert "not CUDA fp16" in checks([fell_back], "cuda")[0]
    assert checks([fell_back], "cpu") == []
    assert "logits off by" in checks([{**good, "logits_max_rel_diff_vs_cpu_fp32": 0.5}], "cuda")[0]
    errors = {**good, "bench": {"64": [{"errors": 3, "error_codes": {"INTERNAL": 3}}]}}
    assert "INTERNAL" in checks([errors], "cuda")[0]
