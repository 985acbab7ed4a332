"""The golden set: a few real held-out images, the eager model's logits on them and their labels.

``cnnctl export`` writes it into the artifact (``golden.npz``, listed in the manifest's ``golden``
section with its sha256, and the tolerance for each precision of the artifact's files). Whoever
serves the artifact runs the same check: the server at every load, on the execution provider and
precision it will serve with (serving/readiness.py), and ``cnnctl verify --server`` against any
KServe v2 server (clients/verify.py). A model whose answers do not match is not ready.

The images are stored as uint8 pixels at the model's size and go through the artifact's own image
spec (export/image.py) on the checking side: a manifest whose preprocessing spec was changed after
export fails the check just as changed weights do.

Imports numpy only (the server and the client read it without torch).
"""

from __future__ import annotations

import io
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from cnnctl.errors import ArtifactError
from cnnctl.export.image import to_tensor
from cnnctl.export.manifest import FileEntry, Manifest, read_file, sha256_file

GOLDEN_FILE = "golden.npz"
GOLDEN_IMAGES = 64  # enough to exercise every class of a 10-class model; a few ms to run
GOLDEN_MAX_BYTES = 64 << 20  # 64 images of 224x224x3 are 9.6 MB; a bigger file is not ours
# fp32 on a GPU is judged like fp16 (the "fp32-cuda" entry export writes): cuDNN and cuBLAS may
# run fp32 convolutions and GEMMs in TF32 (fp16's 10-bit mantissa) on Ampere and later GPUs,
# and pick other summation orders than the CPU; fp32's 1e-5 would refuse a correct model there.
GPU_FP32 = "fp32-cuda"


@dataclass(frozen=True)
class GoldenTolerance:
    atol: float  # absolute logit error allowed
    rtol: float  # on top, as a fraction of max |golden logit|
    min_argmax_agreement: float  # fraction of images whose top class must match the golden one

    def limit(self, scale: float) -> float:
        return self.atol + self.rtol * scale


@dataclass(frozen=True)
class Golden:
    pixels: np.ndarray  # uint8 (n, H, W, C) at the model's size
    logits: np.ndarray  # float32 (n, classes): the eager model's, on to_tensor(pixels)
    labels: np.ndarray | None  # int64 (n,): the images' true classes; None for random pixels
    dataset: str  # where the images come from, e.g. "mnist/test"

    def head(self, n: int) -> Golden:
        return Golden(self.pixels[:n], self.logits[:n],
                      None if self.labels is None else self.labels[:n], self.dataset)

    def inputs(self, manifest: Manifest) -> np.ndarray:
        """The model's input tensor for these pixels, by the manifest's image spec."""
        return to_tensor(list(self.pixels), manifest.image, "golden image")


@dataclass(frozen=True)
class GoldenResult:
    passed: bool
    failures: list[str]
    images: int
    max_abs: float
    limit_abs: float
    argmax_agreement: float
    accuracy: float | None  # on the labels, when the set has them
    golden_accuracy: float | None  # the eager model's on the same images
    extra: dict[str, Any] = field(default_factory=dict)

    def summary(self) -> str:
        acc = "" if self.accuracy is None else f", accuracy {self.accuracy:.4f}"
        return (f"{self.images} golden images: max abs error {self.max_abs:.3g} (limit "
                f"{self.limit_abs:.3g}), argmax agreement {self.argmax_agreement:.2%}{acc}")


def write_golden(artifact_dir: str | os.PathLike[str], pixels: np.ndarray, logits: np.ndarray,
                 labels: np.ndarray | None, dataset: str,
                 tolerances: dict[str, GoldenTolerance]) -> dict[str, Any]:
    """Write golden.npz into the artifact directory; returns the manifest's ``golden`` section."""
    path = Path(artifact_dir) / GOLDEN_FILE
    arrays = {"pixels": np.ascontiguousarray(pixels, dtype=np.uint8),
              "logits": np.ascontiguousarray(logits, dtype=np.float32)}
    if labels is not None:
        arrays["labels"] = np.asarray(labels, dtype=np.int64)
    buffer = io.BytesIO()
    np.savez(buffer, **arrays)  # not compressed: the check reads it at every load
    path.write_bytes(buffer.getvalue())
    return {
        "file": {"path": GOLDEN_FILE, "sha256": sha256_file(path), "bytes": path.stat().st_size},
        "images": int(len(pixels)), "dataset": dataset, "labels": labels is not None,
        "tolerance": {p: {"atol": t.atol, "rtol": t.rtol,
                          "min_argmax_agreement": t.min_argmax_agreement}
                      for p, t in tolerances.items()},
    }


def has_golden(manifest: Manifest) -> bool:
    return bool(manifest.golden)


def tolerance_for(manifest: Manifest, precision: str, gpu: bool = False) -> GoldenTolerance:
    """The manifest's tolerance for ``precision``; on a GPU its ``<precision>-cuda`` entry
    when it has one (see GPU_FP32)."""
    table = manifest.golden.get("tolerance") or {}
    raw = table.get(f"{precision}-cuda") if gpu else None
    raw = raw if raw is not None else table.get(precision)
    if not isinstance(raw, dict):
        raise ArtifactError(f"the manifest's golden set has no tolerance for precision "
                            f"{precision!r}; it has: {', '.join(sorted(table)) or 'none'}")
    try:
        tol = GoldenTolerance(float(raw["atol"]), float(raw["rtol"]),
                              float(raw["min_argmax_agreement"]))
    except (KeyError, TypeError, ValueError) as exc:
        raise ArtifactError(f"the manifest's golden tolerance for {precision} is malformed "
                            f"({exc!r})") from None
    if not all(math.isfinite(v) and v >= 0 for v in (tol.atol, tol.rtol)) or not (
            0 <= tol.min_argmax_agreement <= 1):
        raise ArtifactError(f"the manifest's golden tolerance for {precision} is out of range: "
                            f"{raw}")
    return tol


def read_golden(artifact_dir: str | os.PathLike[str], manifest: Manifest) -> Golden:
    """The golden set, its bytes checked against the manifest's sha256; ArtifactError if it is
    missing, tampered with or does not fit the model's tensors."""
    section = manifest.golden
    info = section.get("file") or {}
    entry = FileEntry(info.get("path", GOLDEN_FILE), "golden", "fp32", info.get("sha256", ""),
                      int(info.get("bytes", 0)))
    data = read_file(artifact_dir, entry, max_bytes=GOLDEN_MAX_BYTES)
    where = Path(artifact_dir) / entry.path
    try:
        with np.load(io.BytesIO(data), allow_pickle=False) as npz:
            pixels, logits = npz["pixels"], npz["logits"]
            labels = npz["labels"] if "labels" in npz.files else None
    except (OSError, ValueError, KeyError) as exc:
        raise ArtifactError(f"{where}: not a golden set ({exc})") from None
    spec = manifest.image
    n = len(pixels)
    if (pixels.dtype != np.uint8 or pixels.shape[1:] != (spec.height, spec.width, spec.channels)
            or logits.shape != (n, manifest.output.shape[-1]) or n == 0
            or (labels is not None and labels.shape != (n,))):
        raise ArtifactError(
            f"{where}: shapes pixels {list(pixels.shape)} {pixels.dtype}, logits "
            f"{list(logits.shape)} do not fit the manifest (images {spec.height}x{spec.width}x"
            f"{spec.channels} uint8, {manifest.output.shape[-1]} outputs)")
    return Golden(pixels, logits.astype(np.float32), labels, str(section.get("dataset", "")))


def compare(got: np.ndarray, golden: Golden, tol: GoldenTolerance) -> GoldenResult:
    """The model's logits on the golden images against the golden ones. Errors are judged
    relative to the logit scale, as export/verify.py does: abs <= atol + rtol * max|golden|."""
    ref = golden.logits
    n = len(ref)
    if got.shape != ref.shape:
        return GoldenResult(False, [f"output shape {list(got.shape)}, golden {list(ref.shape)}"],
                            n, math.inf, 0.0, 0.0, None, None)
    finite = bool(np.all(np.isfinite(got)))
    max_abs = float(np.max(np.abs(got - ref))) if finite else math.inf
    limit = tol.limit(float(np.max(np.abs(ref))))
    agree = float(np.mean(got.argmax(1) == ref.argmax(1)))
    acc = gacc = None
    if golden.labels is not None:
        acc = float(np.mean(got.argmax(1) == golden.labels))
        gacc = float(np.mean(ref.argmax(1) == golden.labels))
    failures = []
    if not finite:
        failures.append("non-finite logits")
    elif max_abs > limit:
        failures.append(f"max abs logit error {max_abs:.3g} > limit {limit:.3g} (atol "
                        f"{tol.atol:g} + rtol {tol.rtol:g} x max|logit|)")
    if agree < tol.min_argmax_agreement:
        failures.append(f"argmax agreement {agree:.2%} < {tol.min_argmax_agreement:.1%}")
    return GoldenResult(not failures, failures, n, max_abs, limit, agree, acc, gacc)
