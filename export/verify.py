"""Check every exported file against the eager PyTorch model it came from.

Two kinds of input, each run through eager PyTorch and through the artifact (TorchScript via torch,
ONNX via onnxruntime's CPU provider):

* random images (uniform uint8 pixels, preprocessed like real ones) at several batch sizes, 1 and an
  odd one included, which catches a batch dimension baked in at export time;
* real held-out images (the test split of the checkpoint's dataset), which catches what random
  inputs do not excite (quantization ranges, saturated activations) and gives an accuracy for each
  artifact next to the eager model's on the very same images.

Errors are measured per batch as ``max|artifact - eager|`` (absolute) and that divided by
``max|eager|`` (relative to the logit magnitude, which is stable where per-element relative error
is not: a logit near 0 makes it explode). A batch passes when ``abs <= atol + rtol * max|eager|``.
fp32 uses atol = rtol = 1e-5: float32's epsilon is 1.2e-7 and a length-K dot product summed in a
different order (oneDNN vs MLAS kernels) differs by about sqrt(K)·eps relative, ~1e-5 for
K = 4096 (VGG16's classifier); the rtol term keeps that honest for large logits.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from cnnctl.errors import DataError, ShapeError, VerificationError
from cnnctl.export.golden import GOLDEN_IMAGES
# The training loop's own batch preparation: the verifier must feed the exact inputs the model was
# trained on (uint8 → /255 → bilinear resize if the size differs → (x - mean) / std).
from cnnctl.training.transforms import prepare_batch

log = logging.getLogger(__name__)

Runner = Callable[[np.ndarray], np.ndarray]


@dataclass(frozen=True)
class Tolerance:
    atol: float  # absolute logit error allowed
    rtol: float  # allowed on top, as a fraction of max |eager logit| in the batch
    min_argmax_agreement: float  # fraction of real images where argmax matches eager
    max_accuracy_drop: float  # accuracy points (0..1) the artifact may lose on real images


# fp16: 10 mantissa bits (eps 9.8e-4) per stored weight and activation, errors compound through
# the layers: 1e-2 relative to the logit scale is what several ulps per layer adds up to.
# int8: 256 levels per tensor; on real images the QDQ model's logits move by a few percent of
# their range, and on random pixels (outside the calibration distribution) clipped activations
# move them by up to ~30 %. Hence int8 is judged chiefly on real images: argmax agreement and
# accuracy drop, with a loose error bound that only catches a wrecked model.
TOLERANCES: dict[str, Tolerance] = {
    "fp32": Tolerance(atol=1e-5, rtol=1e-5, min_argmax_agreement=0.999, max_accuracy_drop=0.001),
    "fp16": Tolerance(atol=1e-2, rtol=1e-2, min_argmax_agreement=0.99, max_accuracy_drop=0.005),
    "int8": Tolerance(atol=0.05, rtol=0.5, min_argmax_agreement=0.95, max_accuracy_drop=0.01),
}

DEFAULT_BATCH_SIZES = (1, 7, 64)
DEFAULT_MAX_IMAGES = 2000
REAL_BATCH = 64


@dataclass(frozen=True)
class RealImages:
    """Held-out images to verify on, already preprocessed, or why there are none."""

    inputs: np.ndarray | None  # float32 N×C×H×W
    labels: np.ndarray | None
    dataset: str  # what they are, e.g. "mnist/test"
    note: str  # how they were chosen (fallbacks are said here, and printed)
    # The first few as uint8 N×C×H×W at the model's size: the artifact's golden set.
    pixels: np.ndarray | None = None


def load_real_images(
    dataset: str, data_dir: str | None, input_shape: tuple[int, int, int],
    mean: Sequence[float], std: Sequence[float], max_images: int = DEFAULT_MAX_IMAGES,
    explicit: bool = False,
) -> RealImages:
    """The test split of ``dataset`` (never downloaded here). If it is unavailable and was not asked
    for explicitly, fall back to the embedded mnist-sample when the model takes 1 channel; else say
    that only random inputs were checked. An explicitly requested dataset that fails is an error."""
    from cnnctl.training.data import load_split

    c, h, w = input_shape
    reason = ""
    if dataset:
        try:
            data = load_split(dataset, "test", data_dir, download=False, shape=input_shape)
            if data.shape[0] != c:
                raise ShapeError(
                    f"dataset {dataset} has {data.shape[0]} channels; the model takes {c}"
                )
            return _take(data, dataset, mean, std, (h, w), max_images, "the checkpoint's dataset"
                         if not explicit else "requested with --verify-dataset")
        except (DataError, ShapeError) as exc:
            if explicit:
                raise
            # the loader's message lists every path it tried: the first clause is enough here
            reason = f"{dataset} unavailable ({str(exc).split(' (looked')[0].split(';')[0]})"
    else:
        reason = "the checkpoint names no dataset"
    if c == 1:
        data = load_split("mnist-sample", "test")
        return _take(data, "mnist-sample", mean, std, (h, w), max_images,
                     f"{reason}; fell back to the embedded mnist-sample")
    note = (f"{reason}; no real images with {c} channels offline: verified on random inputs only "
            f"(pass --verify-dataset/--data-dir)")
    log.warning(note)
    return RealImages(None, None, "", note)


def _take(data: Any, name: str, mean: Sequence[float], std: Sequence[float], size: tuple[int, int],
          max_images: int, note: str) -> RealImages:
    n = min(len(data), max_images)
    # A fixed, spread-out subset rather than the first n (test splits are sometimes sorted).
    index = torch.randperm(len(data), generator=torch.Generator().manual_seed(0))[:n]
    images = data.images[index]
    inputs = torch.cat([prepare_batch(images[i:i + 512], mean, std, size)
                        for i in range(0, n, 512)]).numpy()
    return RealImages(inputs, data.labels[index].numpy(), f"{name}/test", f"{n} images; {note}",
                      images[:GOLDEN_IMAGES].numpy())


def random_inputs(batch_size: int, input_shape: tuple[int, int, int], mean: Sequence[float],
                  std: Sequence[float], seed: int) -> np.ndarray:
    """Uniform random pixels through the same preprocessing: in-domain for a served model."""
    g = torch.Generator().manual_seed(seed)
    pixels = torch.randint(0, 256, (batch_size, *input_shape), generator=g, dtype=torch.uint8)
    return prepare_batch(pixels, mean, std, input_shape[1:]).numpy()


# --- runners ---------------------------------------------------------------------------------


def eager_runner(model: nn.Module) -> Runner:
    model = model.eval()

    def run(x: np.ndarray) -> np.ndarray:
        with torch.inference_mode():
            return model(torch.from_numpy(x)).float().numpy()

    return run


def onnx_runner(path: str | Path) -> Runner:
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.log_severity_level = 3
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    input_name = session.get_inputs()[0].name
    output_name = session.get_outputs()[0].name

    def run(x: np.ndarray) -> np.ndarray:
        return np.asarray(session.run([output_name], {input_name: x})[0], dtype=np.float32)

    return run


def torchscript_runner(path: str | Path) -> Runner:
    from cnnctl.export.torchscript import load_torchscript

    module, _ = load_torchscript(path)

    def run(x: np.ndarray) -> np.ndarray:
        with torch.inference_mode():
            return module(torch.from_numpy(x)).float().numpy()

    return run


def runner_for(path: str | Path, format: str) -> Runner:
    return onnx_runner(path) if format == "onnx" else torchscript_runner(path)


# --- the check -------------------------------------------------------------------------------


@dataclass
class _Errors:
    max_abs: float = 0.0
    max_rel: float = 0.0
    worst_excess: float = -math.inf  # max over batches of abs - limit (> 0: failed)
    limit_abs: float = 0.0  # the limit of the worst batch

    def add(self, got: np.ndarray, ref: np.ndarray, tol: Tolerance) -> None:
        if got.shape != ref.shape:
            raise VerificationError(f"output shape {got.shape} != eager {ref.shape}")
        if not np.all(np.isfinite(got)):
            self.max_abs = self.max_rel = self.worst_excess = math.inf
            return
        abs_err = float(np.max(np.abs(got - ref)))
        scale = float(np.max(np.abs(ref)))
        limit = tol.atol + tol.rtol * scale
        self.max_abs = max(self.max_abs, abs_err)
        self.max_rel = max(self.max_rel, abs_err / max(scale, 1e-12))
        if abs_err - limit > self.worst_excess:
            self.worst_excess, self.limit_abs = abs_err - limit, limit


@dataclass(frozen=True)
class ArtifactCheck:
    path: str
    format: str
    precision: str
    passed: bool
    failures: list[str]
    tolerance: dict[str, float]
    random: dict[str, Any]
    real: dict[str, Any]
    seconds: float

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class Report:
    passed: bool
    batch_sizes: list[int]
    real_images: dict[str, Any]  # dataset, note, eager accuracy
    artifacts: list[ArtifactCheck] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        return {"passed": self.passed, "batch_sizes": self.batch_sizes,
                "real_images": self.real_images, "artifacts": [a.to_json() for a in self.artifacts]}


def check_artifact(
    run: Runner, eager: Runner, *, path: str, format: str, precision: str,
    input_shape: tuple[int, int, int], mean: Sequence[float], std: Sequence[float],
    real: RealImages, eager_real: np.ndarray | None, batch_sizes: Sequence[int] = DEFAULT_BATCH_SIZES,
) -> ArtifactCheck:
    tol = TOLERANCES[precision]
    start = time.monotonic()
    failures: list[str] = []

    rnd = _Errors()
    for i, b in enumerate(batch_sizes):
        x = random_inputs(b, input_shape, mean, std, seed=1000 + i)
        rnd.add(run(x), eager(x), tol)
    random_result = {"batch_sizes": list(batch_sizes), "max_abs": rnd.max_abs,
                     "max_rel": rnd.max_rel, "limit_abs": rnd.limit_abs}
    if rnd.worst_excess > 0:
        failures.append(f"random inputs: max abs error {rnd.max_abs:.3g} > limit "
                        f"{rnd.limit_abs:.3g} (atol {tol.atol:g} + rtol {tol.rtol:g}·max|logit|)")

    real_result: dict[str, Any] = {"dataset": real.dataset or None}
    if real.inputs is not None and eager_real is not None and real.labels is not None:
        err = _Errors()
        outs = []
        for s in range(0, len(real.inputs), REAL_BATCH):
            got = run(real.inputs[s:s + REAL_BATCH])
            err.add(got, eager_real[s:s + REAL_BATCH], tol)
            outs.append(got)
        logits = np.concatenate(outs)
        agree = float(np.mean(logits.argmax(1) == eager_real.argmax(1)))
        acc = float(np.mean(logits.argmax(1) == real.labels))
        eager_acc = float(np.mean(eager_real.argmax(1) == real.labels))
        real_result.update(images=int(len(real.inputs)), max_abs=err.max_abs, max_rel=err.max_rel,
                           limit_abs=err.limit_abs, argmax_agreement=agree, accuracy=acc,
                           eager_accuracy=eager_acc)
        if err.worst_excess > 0:
            failures.append(f"real images: max abs error {err.max_abs:.3g} > limit "
                            f"{err.limit_abs:.3g}")
        if agree < tol.min_argmax_agreement:
            failures.append(f"real images: argmax agreement {agree:.4%} < "
                            f"{tol.min_argmax_agreement:.1%}")
        if eager_acc - acc > tol.max_accuracy_drop:
            failures.append(f"real images: accuracy {acc:.4f} vs eager {eager_acc:.4f} "
                            f"(drop > {tol.max_accuracy_drop:g})")
    else:
        real_result["skipped"] = real.note
    return ArtifactCheck(path, format, precision, not failures, failures, asdict(tol),
                         random_result, real_result, round(time.monotonic() - start, 3))


def verify_files(
    model: nn.Module, artifact_dir: str | Path, files: Sequence[tuple[str, str, str]], *,
    input_shape: tuple[int, int, int], mean: Sequence[float], std: Sequence[float],
    real: RealImages, batch_sizes: Sequence[int] = DEFAULT_BATCH_SIZES,
) -> Report:
    """Check each ``(relpath, format, precision)`` in ``artifact_dir`` against ``model``. Returns the
    report; raise_on_failure() turns a failed one into a VerificationError."""
    eager = eager_runner(model)
    eager_real = None
    eager_acc = None
    if real.inputs is not None and real.labels is not None:
        eager_real = np.concatenate([eager(real.inputs[s:s + REAL_BATCH])
                                     for s in range(0, len(real.inputs), REAL_BATCH)])
        eager_acc = float(np.mean(eager_real.argmax(1) == real.labels))
    checks = []
    for relpath, format, precision in files:
        log.info("verifying %s (%s %s)", relpath, format, precision)
        run = runner_for(Path(artifact_dir) / relpath, format)
        checks.append(check_artifact(
            run, eager, path=relpath, format=format, precision=precision, input_shape=input_shape,
            mean=mean, std=std, real=real, eager_real=eager_real, batch_sizes=batch_sizes))
    real_info = {"dataset": real.dataset or None, "note": real.note, "eager_accuracy": eager_acc}
    return Report(all(c.passed for c in checks), list(batch_sizes), real_info, checks)


def raise_on_failure(report: Report) -> None:
    """One line naming the first failing artifact and metric."""
    for check in report.artifacts:
        if not check.passed:
            more = f" (+{len(check.failures) - 1} more)" if len(check.failures) > 1 else ""
            raise VerificationError(
                f"verification failed for {check.path} ({check.format} {check.precision}): "
                f"{check.failures[0]}{more}"
            )


def format_table(report: dict[str, Any]) -> str:
    """The verification section of a manifest as a plain-text table."""
    rows = [("file", "prec", "rand max abs", "rand rel", "real max abs", "argmax agree",
             "acc", "eager acc", "ok")]
    for a in report.get("artifacts", []):
        r, q = a["random"], a["real"]
        has_real = "argmax_agreement" in q
        rows.append((
            a["path"], a["precision"], f"{r['max_abs']:.2e}", f"{r['max_rel']:.2e}",
            f"{q['max_abs']:.2e}" if has_real else "-",
            f"{q['argmax_agreement']:.2%}" if has_real else "-",
            f"{q['accuracy']:.4f}" if has_real else "-",
            f"{q['eager_accuracy']:.4f}" if has_real else "-",
            "PASS" if a["passed"] else "FAIL",
        ))
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip() for row in rows]
    real = report.get("real_images", {})
    lines.append(f"batch sizes {report.get('batch_sizes')}; real images: "
                 f"{real.get('dataset') or 'none'} ({real.get('note', '')})")
    return "\n".join(lines)
