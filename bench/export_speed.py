"""ONNX Runtime (fp32 and int8) vs eager PyTorch on CPU: images/s and accuracy, one run.

For lenet5 and resnet-mini: train briefly on the embedded mnist-sample (so accuracy numbers mean
something), export with ``export_checkpoint`` (fp32 + int8, verified), then time eager PyTorch and
onnxruntime's CPU provider at batch 1, 64 and 256 on the same inputs, and measure accuracy on the
MNIST test split (full 10k from --data-dir if present, else mnist-sample's 2k).

    flock /tmp/cnnctl-bench.lock .venv/bin/python bench/export_speed.py --out bench/results/export_speed.json

Each timing: warm-up, then --repeats rounds in which eager, ORT fp32 and ORT int8 take turns, each
running for at least --min-seconds; the median per runtime is kept.
Both runtimes get the same thread count (--threads, default: all cores).
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
from typing import Any, Callable

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
MODELS = ("lenet5", "resnet-mini")
BATCHES = (1, 64, 256)


def train_checkpoint(name: str, epochs: int, seed: int = 0) -> dict[str, Any]:
    from cnnctl.training.checkpoint import make_checkpoint
    from cnnctl.training.data import load_split
    from cnnctl.training.models import build_model, get_spec
    from cnnctl.training.transforms import prepare_batch

    torch.manual_seed(seed)
    c, h, w = get_spec(name).input_shape
    mean, std = [0.1307], [0.3081]
    data = load_split("mnist-sample", "train")
    model = build_model(name, check_inputs=False)
    steps = epochs * (len(data) // 128)
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, weight_decay=5e-4)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=0.05, total_steps=steps)
    g = torch.Generator().manual_seed(seed)
    model.train()
    for epoch in range(epochs):
        order = torch.randperm(len(data), generator=g)
        for i in range(0, len(data) - 127, 128):
            idx = order[i:i + 128]
            loss = torch.nn.functional.cross_entropy(
                model(prepare_batch(data.images[idx], mean, std, (h, w))), data.labels[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
    return make_checkpoint(model=model.eval(), model_name=name, num_classes=10, in_channels=c,
                           input_shape=(c, h, w), mean=mean, std=std,
                           class_names=[str(i) for i in range(10)], dataset="mnist-sample",
                           epoch=epochs)


def time_round_robin(fns: dict[str, Callable[[], Any]], min_seconds: float, repeats: int
                     ) -> dict[str, float]:
    """Median seconds per call of each function. The repeats take turns (eager, ORT fp32, ORT
    int8, eager, ...) so that load from anything else on the shared cores hits all of them alike."""
    for fn in fns.values():
        for _ in range(3):
            fn()
    per_call: dict[str, list[float]] = {k: [] for k in fns}
    for _ in range(repeats):
        for key, fn in fns.items():
            n, start = 0, time.perf_counter()
            while True:
                fn()
                n += 1
                elapsed = time.perf_counter() - start
                if elapsed >= min_seconds:
                    break
            per_call[key].append(elapsed / n)
    return {k: statistics.median(v) for k, v in per_call.items()}


def ort_session(path: Path, threads: int) -> Any:
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def test_set(data_dir: str | None, shape: tuple[int, int, int]) -> tuple[np.ndarray, np.ndarray, str]:
    from cnnctl.errors import DataError
    from cnnctl.training.data import load_split
    from cnnctl.training.transforms import prepare_batch

    try:
        data = load_split("mnist", "test", data_dir, download=False)
    except DataError:
        data = load_split("mnist-sample", "test")
    x = prepare_batch(data.images, [0.1307], [0.3081], shape[1:]).numpy()
    return x, data.labels.numpy(), f"{data.name}/test ({len(data)} images)"


def bench_model(name: str, args: argparse.Namespace, workdir: Path) -> dict[str, Any]:
    from cnnctl.export.api import export_checkpoint
    from cnnctl.training.checkpoint import model_from_checkpoint

    t0 = time.perf_counter()
    ckpt = train_checkpoint(name, args.epochs)
    train_s = time.perf_counter() - t0
    out = workdir / name
    manifest = export_checkpoint(ckpt, out, "onnx", precision="int8",
                                 calibration_dataset="mnist-sample", verify_images=2000)
    shape = tuple(ckpt["input_shape"])
    model = model_from_checkpoint(ckpt, "cpu", check_inputs=False)
    sessions = {p: ort_session(out / f.path, args.threads)
                for p, f in ((f.precision, f) for f in manifest.files)}

    x_test, y_test, test_name = test_set(args.data_dir, shape)

    def accuracy(run: Callable[[np.ndarray], np.ndarray]) -> float:
        preds = np.concatenate([run(x_test[i:i + 256]).argmax(1) for i in range(0, len(x_test), 256)])
        return float(np.mean(preds == y_test))

    def eager(x: np.ndarray) -> np.ndarray:
        with torch.inference_mode():
            return model(torch.from_numpy(x)).numpy()

    def ort_run(precision: str) -> Callable[[np.ndarray], np.ndarray]:
        sess = sessions[precision]
        return lambda x: sess.run(["logits"], {"input": x})[0]

    runners = {"eager": eager, "ort_fp32": ort_run("fp32"), "ort_int8": ort_run("int8")}
    result: dict[str, Any] = {
        "train_seconds": round(train_s, 1), "test_set": test_name,
        "accuracy": {k: accuracy(r) for k, r in runners.items()}, "images_per_s": {},
        "verification": {a["path"]: {"passed": a["passed"], "max_abs_real": a["real"].get("max_abs"),
                                     "argmax_agreement": a["real"].get("argmax_agreement")}
                         for a in manifest.verification["artifacts"]},
    }
    for batch in BATCHES:
        x = np.ascontiguousarray(x_test[:batch])
        seconds = time_round_robin({k: (lambda r=r: r(x)) for k, r in runners.items()},
                                   args.min_seconds, args.repeats)
        result["images_per_s"][str(batch)] = {k: round(batch / s, 1) for k, s in seconds.items()}
        print(f"{name} batch {batch}: {result['images_per_s'][str(batch)]}", file=sys.stderr)
    return result


def machine() -> dict[str, Any]:
    lscpu = subprocess.run(["lscpu"], capture_output=True, text=True).stdout.splitlines()
    pick = ("Model name", "CPU(s):", "Thread(s) per core", "Flags")
    info = {l.split(":", 1)[0].strip(): l.split(":", 1)[1].strip() for l in lscpu
            if l.startswith(pick[:3])}
    import onnxruntime

    # The 2 cores are shared: the load average says how much else was running during the bench.
    return {"cpu": info, "load_average_1_5_15": [round(v, 2) for v in os.getloadavg()],
            "python": platform.python_version(), "torch": torch.__version__,
            "onnxruntime": onnxruntime.__version__, "date": datetime.now(timezone.utc).isoformat(
                timespec="seconds")}


def markdown(results: dict[str, Any]) -> str:
    lines = ["| model | batch | eager img/s | ORT fp32 img/s | ORT int8 img/s | ORT/eager | int8/fp32 |",
             "|---|---:|---:|---:|---:|---:|---:|"]
    for name, r in results["models"].items():
        for batch, v in r["images_per_s"].items():
            lines.append(f"| {name} | {batch} | {v['eager']:,.0f} | {v['ort_fp32']:,.0f} | "
                         f"{v['ort_int8']:,.0f} | {v['ort_fp32'] / v['eager']:.2f}× | "
                         f"{v['ort_int8'] / v['ort_fp32']:.2f}× |")
    lines += ["", "| model | test set | eager acc | ORT fp32 acc | ORT int8 acc | int8 Δ |",
              "|---|---|---:|---:|---:|---:|"]
    for name, r in results["models"].items():
        a = r["accuracy"]
        lines.append(f"| {name} | {r['test_set']} | {a['eager']:.4f} | {a['ort_fp32']:.4f} | "
                     f"{a['ort_int8']:.4f} | {100 * (a['ort_int8'] - a['eager']):+.2f} pt |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=REPO / "bench" / "results" / "export_speed.json")
    parser.add_argument("--models", nargs="+", default=list(MODELS))
    parser.add_argument("--epochs", type=int, default=2, help="training epochs on mnist-sample")
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--min-seconds", type=float, default=0.5)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--data-dir", default=str(REPO.parent / "shared" / "data"))
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    results: dict[str, Any] = {"machine": machine(), "threads": args.threads,
                               "settings": {"min_seconds": args.min_seconds,
                                            "repeats": args.repeats, "epochs": args.epochs},
                               "models": {}}
    with tempfile.TemporaryDirectory(prefix="cnnctl-bench-") as tmp:
        for name in args.models:
            results["models"][name] = bench_model(name, args, Path(tmp))
    results["load_average_after"] = [round(v, 2) for v in os.getloadavg()]
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2) + "\n")
    print(markdown(results))
    print(f"\nwrote {args.out}", file=sys.stderr)


if __name__ == "__main__":
    main()
