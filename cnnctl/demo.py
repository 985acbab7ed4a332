"""``cnnctl demo``: the whole job in one command, offline, on the embedded MNIST sample.

train (cnnctl.training.loop) → export + verify (cnnctl.export.api) → serve on a free local port
(cnnctl.serving.server, in this process on its own event-loop thread) → classify the held-out test
split through the gRPC client, one image per request, PNG-encoded as a user's app would send it →
print the accuracy over the wire next to the checkpoint's and the export's, and the latency.

It goes through the stages' public Python APIs (the same code the CLI commands run), so it shows
the pieces fit, and it fails (exit 2) when the accuracy over the wire does not match the
checkpoint's: a broken preprocessing path anywhere would show up here.
"""

from __future__ import annotations

import asyncio
import json
import logging
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import click

from cnnctl.errors import CnnctlError, VerificationError

if TYPE_CHECKING:
    import numpy as np

DATASET = "mnist-sample"
# Over-the-wire accuracy may differ from the checkpoint's only by float rounding flipping a tie:
# more than this (percentage points) means the served path computes something else.
MAX_ACCURACY_GAP_PP = 0.5


@dataclass(frozen=True)
class DemoConfig:
    model: str = "resnet-mini"
    epochs: int = 1  # one already reaches ~94% on the sample's test split; two gain nothing
    out: str | None = None  # None: a temporary directory, removed at the end unless keep
    keep: bool = False
    images: int = 2000  # held-out test images to classify over the wire (the sample has 2000)
    concurrency: int = 8  # requests in flight while classifying
    max_steps_per_epoch: int | None = None  # cap for smoke tests
    seed: int = 0
    progress: bool = True


def _checkpoint_accuracy(checkpoint: Path, images: Any) -> float:
    """The trained checkpoint in eager PyTorch on the same held-out images."""
    from cnnctl.training.checkpoint import load_checkpoint, model_from_checkpoint
    from cnnctl.training.evaluate import evaluate

    ckpt = load_checkpoint(checkpoint)
    net = model_from_checkpoint(ckpt, device="cpu")
    shape = tuple(int(s) for s in ckpt["input_shape"])
    norm = ckpt["normalization"]
    result = evaluate(net, images, norm["mean"], norm["std"], "cpu", 1000,
                      size=(shape[1], shape[2]), class_names=ckpt["class_names"])
    return float(result["accuracy"])


async def _classify(address: str, model: str, pixels: np.ndarray, concurrency: int,
                    progress: bool) -> tuple[list[str], list[float]]:
    """One image per request, ``concurrency`` in flight; (labels, latencies in s) in order."""
    from tqdm import tqdm

    from cnnctl.clients.client import AsyncClient

    labels: list[str] = [""] * len(pixels)
    latencies: list[float] = [0.0] * len(pixels)
    bar = tqdm(total=len(pixels), desc="classify over gRPC", unit="img", disable=not progress,
               leave=False)
    async with AsyncClient(address, timeout=30) as client:
        await client.wait_until_ready(timeout=10)
        await client.model_info(model)
        next_index = 0

        async def worker() -> None:
            nonlocal next_index
            while next_index < len(pixels):
                i, next_index = next_index, next_index + 1
                start = time.perf_counter()
                [p] = await client.predict(model, pixels[i], top_k=1)
                latencies[i] = time.perf_counter() - start
                labels[i] = p.label
                bar.update()

        await asyncio.gather(*(worker() for _ in range(concurrency)))
    bar.close()
    return labels, latencies


def run_demo(config: DemoConfig, echo: Any = print) -> dict[str, Any]:
    """Every stage, in order; returns the summary (what --json prints)."""
    import numpy as np
    import torch

    from cnnctl.export.api import export_checkpoint
    from cnnctl.serving.config import ServerConfig
    from cnnctl.serving.server import ServerThread
    from cnnctl.training.config import from_flags
    from cnnctl.training.data import load_split
    from cnnctl.training.loop import train

    started = time.monotonic()
    root = Path(config.out) if config.out else Path(tempfile.mkdtemp(prefix="cnnctl-demo-"))
    root.mkdir(parents=True, exist_ok=True)
    timings: dict[str, float] = {}
    try:
        t = time.monotonic()
        echo(f"[1/4] train {config.model} on {DATASET} for {config.epochs} epoch(s) → {root / 'run'}")
        train_config = from_flags(
            config.model, dataset=DATASET, epochs=config.epochs, out=str(root / "run"),
            seed=config.seed, progress=config.progress, plot=False, device="cpu",
            max_steps_per_epoch=config.max_steps_per_epoch)
        run = train(train_config)
        timings["train_s"] = time.monotonic() - t
        echo(f"      best validation accuracy {100 * run.best_val_acc:.2f}% "
             f"(epoch {run.best_epoch}), {timings['train_s']:.1f} s")

        t = time.monotonic()
        artifact = root / "artifact"
        echo(f"[2/4] export ONNX + TorchScript, verify both → {artifact}")
        manifest = export_checkpoint(run.best_path, artifact, formats="all", name=config.model,
                                     force=True)
        checks = manifest.verification.get("artifacts", [])
        # The served file: fp32 ONNX (the server's default), not the TorchScript check.
        real = next((c.get("real", {}) for c in checks if c.get("format") == "onnx"), {})
        export_acc = real.get("accuracy")
        if not manifest.verification.get("passed") or export_acc is None:
            raise VerificationError(f"export of {run.best_path} has no passing verification on "
                                    f"real images: {json.dumps(manifest.verification)[:300]}")
        timings["export_s"] = time.monotonic() - t
        echo(f"      verified {', '.join(f.path for f in manifest.files)} against PyTorch on "
             f"{real.get('images')} real images (ONNX argmax agreement "
             f"{100 * real.get('argmax_agreement', 0):.2f}%), {timings['export_s']:.1f} s")

        test = load_split(DATASET, "test")
        n = min(config.images, len(test))
        pixels = test.images[:n, 0].numpy()  # uint8 N×28×28, exactly the sample's bytes
        truth = [test.class_names[int(y)] for y in test.labels[:n]]
        ckpt_acc = _checkpoint_accuracy(run.best_path, test if n == len(test) else test.subset(
            torch.arange(n)))

        echo("[3/4] serve on a free local port")
        # One ORT thread: the client shares the cores, and 28×28 models gain nothing from two.
        server = ServerThread(ServerConfig(artifact_dirs=(str(artifact),), host="127.0.0.1",
                                           port=0, http_port=None, device="cpu",
                                           intra_op_threads=1, grace_s=5.0))
        try:
            address = server.address
            echo(f"      listening on grpc://{address} (model '{config.model}')")
            echo(f"[4/4] classify {n} held-out {DATASET} test images over gRPC "
                 f"(1 PNG per request, {config.concurrency} in flight)")
            t = time.monotonic()
            labels, latencies = asyncio.run(_classify(address, config.model, pixels,
                                                      config.concurrency, config.progress))
            timings["classify_s"] = time.monotonic() - t
        finally:
            server.stop()
        wire_acc = float(np.mean([a == b for a, b in zip(labels, truth)]))
        lat_ms = np.asarray(latencies) * 1e3
        summary = {
            "model": config.model, "dataset": DATASET, "epochs": config.epochs, "images": n,
            "accuracy": {"checkpoint": ckpt_acc, "export": export_acc, "over_the_wire": wire_acc},
            "export_images": real.get("images"),
            "latency_ms": {"p50": float(np.percentile(lat_ms, 50)),
                           "p99": float(np.percentile(lat_ms, 99)),
                           "mean": float(lat_ms.mean())},
            "images_per_s": n / timings["classify_s"], "concurrency": config.concurrency,
            "seconds": {**{k: round(v, 2) for k, v in timings.items()},
                        "total": round(time.monotonic() - started, 2)},
            "out": str(root) if (config.keep or config.out) else None,
        }
        gap = 100 * abs(wire_acc - ckpt_acc)
        if gap > MAX_ACCURACY_GAP_PP:
            raise CnnctlError(f"accuracy over the wire {100 * wire_acc:.2f}% differs from the "
                              f"checkpoint's {100 * ckpt_acc:.2f}% by {gap:.2f} points (allowed: "
                              f"{MAX_ACCURACY_GAP_PP}); the served path computes something else")
        return summary
    finally:
        if not (config.keep or config.out):
            shutil.rmtree(root, ignore_errors=True)


def format_summary(s: dict[str, Any]) -> str:
    acc = s["accuracy"]
    lines = [
        "",
        f"{s['model']} on {s['dataset']}, {s['images']} held-out test images:",
        f"  {'checkpoint (PyTorch, in-process)':<36} {100 * acc['checkpoint']:6.2f}%",
        f"  {'export (ONNX Runtime, verification)':<36} {100 * acc['export']:6.2f}%"
        + (f"   ({s['export_images']} images)" if s.get("export_images") != s["images"] else ""),
        f"  {'over the wire (gRPC client → server)':<36} {100 * acc['over_the_wire']:6.2f}%",
        f"  latency per request: p50 {s['latency_ms']['p50']:.2f} ms, p99 "
        f"{s['latency_ms']['p99']:.2f} ms ({s['concurrency']} in flight); "
        f"{s['images_per_s']:,.0f} images/s",
        f"  total {s['seconds']['total']:.1f} s (train {s['seconds']['train_s']:.1f}, export "
        f"{s['seconds']['export_s']:.1f}, classify {s['seconds']['classify_s']:.1f})",
    ]
    if s.get("out"):
        lines.append(f"  kept: {s['out']}  (serve it again: cnnctl serve {s['out']}/artifact)")
    return "\n".join(lines)


@click.command()
@click.option("--model", default="resnet-mini", show_default=True,
              help="Architecture to train (see `cnnctl models`).")
@click.option("--epochs", type=click.IntRange(1, 50), default=1, show_default=True)
@click.option("--out", type=click.Path(file_okay=False), default=None,
              help="Keep the run, artifact and logs here (default: a temporary directory).")
@click.option("--keep", is_flag=True, help="Keep the temporary directory and print its path.")
@click.option("--images", type=click.IntRange(1, 2000), default=2000, show_default=True,
              help="Held-out test images to classify over the wire.")
@click.option("--concurrency", type=click.IntRange(1, 256), default=8, show_default=True,
              help="Requests in flight while classifying.")
@click.option("--max-steps-per-epoch", type=click.IntRange(min=1), default=None,
              help="Cap training steps (quick smoke runs).")
@click.option("--json", "as_json", is_flag=True, help="The summary as JSON on stdout.")
@click.option("--progress/--no-progress", default=True, show_default=True)
def demo(model: str, epochs: int, out: str | None, keep: bool, images: int, concurrency: int,
         max_steps_per_epoch: int | None, as_json: bool, progress: bool) -> None:
    """Train, export, serve and query a model end to end, offline, on the embedded MNIST sample."""
    # A first-run walkthrough: the ONNX exporter's pass-by-pass INFO lines would bury the story.
    for noisy in ("onnxscript", "onnx_ir", "torch.onnx"):
        logging.getLogger(noisy).setLevel(max(logging.WARNING, logging.getLogger().level))
    config = DemoConfig(model=model, epochs=epochs, out=out, keep=keep, images=images,
                        concurrency=concurrency, max_steps_per_epoch=max_steps_per_epoch,
                        progress=progress and not as_json)
    echo = (lambda msg: click.echo(msg, err=True)) if as_json else click.echo
    summary = run_demo(config, echo)
    if as_json:
        click.echo(json.dumps(summary, indent=2))
    else:
        click.echo(format_summary(summary))
