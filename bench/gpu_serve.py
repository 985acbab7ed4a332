"""The serving half of bench/gpu_check.sh: `cnnctl serve` on ONNX Runtime's CUDA execution provider.

For lenet5 and cifar-net-v3 (each trained a few steps on the CPU and exported with an fp16 ONNX file
beside the fp32 one), with dynamic batching on and off:
  * the provider and precision the server says it loaded (on CUDA: the fp16 file; serving/runtime.py
    runs every CUDA batch through IO binding: input bound from host memory, output allocated on the
    GPU and copied back; there is no flag to turn IO binding off, so there is no on/off pair);
  * the served logits against in-process ONNX Runtime on the CPU with the fp32 file (max |diff|);
  * `cnnctl bench` at batch 1 and batch 64 per request (throughput, p50/p99 latency).

    python bench/gpu_serve.py --device cuda --out bench/results/gpu.json   # on a GPU
    python bench/gpu_serve.py --device cpu --duration 0.3 --out /tmp/x.json # the same steps on CPU

Exits non-zero when a check fails (on --device cuda: a model not on CUDAExecutionProvider/fp16, or
logits off by more than the fp16 tolerance). Merges its results into --out under "serving".
"""

from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.append(str(ROOT))  # tests.support: the helpers bench/ shares with the tests
MODELS = ("lenet5", "cifar-net-v3")
BATCHES = (1, 64)
# fp16 logits of these small nets stay within this of the fp32 CPU run (relative to the logits'
# range); export's own verification uses the same kind of bound.
FP16_TOLERANCE = 0.02


def cnnctl(*args: str, timeout: float = 300) -> str:
    done = subprocess.run([sys.executable, "-m", "cnnctl", "-q", *args], capture_output=True,
                          text=True, timeout=timeout)
    if done.returncode != 0:
        raise RuntimeError(f"cnnctl {' '.join(args)} failed ({done.returncode}):\n"
                           f"{done.stderr[-3000:]}")
    return done.stdout


def color_folder(root: Path) -> Path:
    """Two classes of 32×32 RGB images (red-ish, green-ish), enough to train and verify on."""
    from PIL import Image

    rng = np.random.default_rng(0)
    for split, n in (("train", 16), ("val", 8)):
        for c, name in enumerate(("red", "green")):
            folder = root / split / name
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(n):
                img = np.zeros((32, 32, 3), np.float32)
                img[..., c] = 200
                img = np.clip(img + rng.normal(0, 30, img.shape), 0, 255).astype(np.uint8)
                Image.fromarray(img).save(folder / f"{i}.png")
    return root


def artifact(model: str, work: Path) -> Path:
    """Train ``model`` a few steps on the CPU (the serving check needs real artifacts, not good
    weights) and export ONNX fp32 + fp16, verified by the exporter."""
    dataset = ("mnist-sample" if model == "lenet5"
               else f"folder:{color_folder(work / 'images')}")
    run = work / f"run-{model}"
    cnnctl("train", "--model", model, "--dataset", dataset, "--device", "cpu", "--epochs", "1",
           "--max-steps", "20", "--batch-size", "8", "--out", str(run), "--no-progress",
           "--no-plot")
    out = work / f"art-{model}"
    cnnctl("export", str(run / "best.pt"), "--format", "onnx", "--precision", "fp16", "--out",
           str(out), "--verify-images", "64", "--force")
    return out


def served_logits_check(address: str, model: str, art: Path) -> float:
    """Max |served − CPU fp32| over 64 random inputs, relative to the CPU logits' range."""
    import onnxruntime as ort

    from cnnctl.clients.client import Client

    manifest = json.loads((art / "manifest.json").read_text())
    shape = [64, *manifest["input"]["shape"][1:]]
    x = np.random.default_rng(1).standard_normal(shape).astype(np.float32)
    fp32 = next(f for f in manifest["files"] if f["format"] == "onnx" and
                f.get("precision") == "fp32")
    session = ort.InferenceSession(str(art / fp32["path"]), providers=["CPUExecutionProvider"])
    want = session.run(None, {session.get_inputs()[0].name: x})[0]
    with Client(address) as client:
        got = client.infer(model, x)
    return float(np.abs(got - want).max() / max(float(np.ptp(want)), 1e-6))


def bench(address: str, model: str, batch: int, concurrency: str, duration: float,
          warmup: float) -> list[dict[str, Any]]:
    out = cnnctl("bench", "--server", address, "--model", model, "--batch", str(batch),
                 "--concurrency", concurrency, "--duration", str(duration), "--warmup",
                 str(warmup), "--json", "--no-progress", timeout=600)
    return json.loads(out)["results"]


def serve_model(model: str, art: Path, device: str, batching: bool, args: argparse.Namespace
                ) -> dict[str, Any]:
    from tests.support.serving import CliServer

    flags = ["--device", device] + ([] if batching else ["--no-dynamic-batching"])
    with CliServer(str(art), *flags, timeout=120) as server:
        said = next((line for line in server.lines if line.startswith("serving model")), "")
        found = re.search(r" on (\w+) \((\w+),", said)
        provider, precision = (found.group(1), found.group(2)) if found else ("?", "?")
        point: dict[str, Any] = {"model": model, "dynamic_batching": batching,
                                 "provider": provider, "precision": precision,
                                 "io_binding": provider == "CUDAExecutionProvider",
                                 "logits_max_rel_diff_vs_cpu_fp32":
                                     served_logits_check(server.address, model, art),
                                 "bench": {}}
        for batch in BATCHES:
            point["bench"][str(batch)] = bench(server.address, model, batch, args.concurrency,
                                               args.duration, args.warmup)
            best = max(point["bench"][str(batch)], key=lambda r: r["images_per_s"])
            print(f"  {model} batching {'on ' if batching else 'off'} batch {batch:>2}: "
                  f"{best['images_per_s']:,.0f} img/s at concurrency {best['concurrency']} "
                  f"(p50 {best['p50_ms']:.2f} ms) on {provider} {precision}", flush=True)
    return point


def checks(points: list[dict[str, Any]], device: str) -> list[str]:
    failed = []
    for p in points:
        name = f"{p['model']} batching {'on' if p['dynamic_batching'] else 'off'}"
        if device == "cuda" and (p["provider"], p["precision"]) != ("CUDAExecutionProvider",
                                                                     "fp16"):
            failed.append(f"{name}: served on {p['provider']} {p['precision']}, not CUDA fp16")
        tolerance = FP16_TOLERANCE if p["precision"] == "fp16" else 1e-4
        if p["logits_max_rel_diff_vs_cpu_fp32"] > tolerance:
            failed.append(f"{name}: logits off by {p['logits_max_rel_diff_vs_cpu_fp32']:.4f} "
                          f"(relative) from the CPU fp32 run; allowed {tolerance}")
        for batch, rows in p["bench"].items():
            if any(r["errors"] for r in rows):
                failed.append(f"{name} batch {batch}: {[r['error_codes'] for r in rows]}")
    return failed


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", choices=("cuda", "cpu"), default="cuda")
    parser.add_argument("--models", default=",".join(MODELS))
    parser.add_argument("--concurrency", default="1,16", help="levels per point (cnnctl bench)")
    parser.add_argument("--duration", type=float, default=4.0, help="measured seconds per level")
    parser.add_argument("--warmup", type=float, default=1.0)
    parser.add_argument("--work", type=Path, default=None, help="scratch dir (default: a temp)")
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "gpu.json")
    args = parser.parse_args()

    import tempfile

    started = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        work = args.work or Path(tmp)
        points = []
        for model in args.models.split(","):
            print(f"== {model}: train 20 steps on the CPU, export fp32 + fp16", flush=True)
            art = artifact(model, work)
            for batching in (True, False):
                points.append(serve_model(model, art, args.device, batching, args))
    failed = checks(points, args.device)
    results = json.loads(args.out.read_text()) if args.out.exists() else {}
    results["serving"] = {"device": args.device, "points": points, "failed_checks": failed,
                          "seconds": round(time.perf_counter() - started, 1)}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2) + "\n")
    for line in failed:
        print(f"FAILED: {line}", flush=True)
    print(f"serving check: {len(points)} servers, {len(failed)} failed checks, "
          f"{time.perf_counter() - started:.0f} s; results in {args.out}", flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
