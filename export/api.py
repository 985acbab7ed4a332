"""``export_checkpoint``: checkpoint in, verified artifact directory (model files + manifest) out.

Everything is written into a temporary sibling directory, verified there, and renamed into place
only when verification passes, so an artifact directory either holds a complete, verified export
(manifest last) or does not exist. A failed export leaves nothing a server could mistake for one.
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from cnnctl import __version__
from cnnctl.errors import ArtifactError, DataError, UsageError, known
from cnnctl.export.manifest import (
    NAME_RULE, PRECISIONS, FileEntry, ImageSpec, Manifest, TensorSpec, file_entry, is_safe_name,
    load_manifest, save_manifest, sha256_file, shown,
)
from cnnctl.files import fsync_dir

log = logging.getLogger(__name__)

FORMATS = ("onnx", "torchscript", "all", "triton")
ONNX_FILES = {"fp32": "model.onnx", "fp16": "model.fp16.onnx", "int8": "model.int8.onnx"}
TORCHSCRIPT_FILE = "model.pt"


@dataclass(frozen=True)
class ExportPlan:
    """What to write, resolved from the user's --format/--precision/--triton."""

    onnx: bool
    torchscript: bool
    triton: bool
    precision: str


def plan(formats: str | Sequence[str], precision: str = "fp32", triton: bool = False) -> ExportPlan:
    names = [formats] if isinstance(formats, str) else list(formats)
    for f in names:
        if f not in FORMATS:
            raise UsageError(f"unknown export format {f!r}; known: {known(FORMATS)}")
    if precision not in PRECISIONS:
        raise UsageError(f"unknown precision {precision!r}; known: {known(PRECISIONS)}")
    triton = triton or "triton" in names
    onnx = triton or any(f in ("onnx", "all") for f in names)
    torchscript = any(f in ("torchscript", "all") for f in names)
    if precision != "fp32" and not onnx:
        raise UsageError(f"--precision {precision} applies to ONNX files; add --format onnx or all")
    return ExportPlan(onnx, torchscript, triton, precision)


def resolve_checkpoint(
    checkpoint: str | os.PathLike[str] | Mapping[str, Any], model_name: str | None = None,
) -> tuple[dict[str, Any], dict[str, Any]]:
    """(checkpoint dict, manifest ``source`` section). A path may hold a cnnctl checkpoint or, with
    ``model_name``, a bare state_dict (a seed script's ``torch.save(model.state_dict(), f)``)."""
    from cnnctl.training.checkpoint import import_state_dict, load_checkpoint

    if isinstance(checkpoint, Mapping):
        ckpt = dict(checkpoint)
        source: dict[str, Any] = {"path": None, "sha256": None}
    else:
        path = Path(checkpoint)
        ckpt = import_state_dict(path, model_name) if model_name else load_checkpoint(path)
        source = {"path": str(path.resolve()), "sha256": sha256_file(path)}
    source.update(model=ckpt["model"], dataset=ckpt.get("dataset") or None,
                  epoch=ckpt.get("epoch"), metrics=dict(ckpt.get("metrics") or {}))
    if model_name and model_name != ckpt["model"]:
        raise UsageError(f"--model {model_name} but the checkpoint holds a {ckpt['model']}")
    return ckpt, source


def default_out_dir(name: str) -> Path:
    """``artifacts/<name>`` in the working directory (beside ``runs/``, where training writes)."""
    return Path("artifacts") / name


def _calibration_inputs(ckpt: Mapping[str, Any], dataset: str | None, data_dir: str | None,
                        count: int) -> Any:
    import torch

    from cnnctl.training.data import load_split
    from cnnctl.training.transforms import prepare_batch

    name = dataset or ckpt.get("dataset") or ""
    if not name:
        raise UsageError("int8 calibration needs real training images and the checkpoint names no "
                         "dataset; pass --calibration-dataset D (e.g. mnist-sample) [--data-dir DIR]")
    c, h, w = ckpt["input_shape"]
    try:
        data = load_split(name, "train", data_dir, download=False, shape=(c, h, w))
    except DataError as exc:
        raise DataError(f"int8 calibration: {exc}") from None
    if data.shape[0] != c:
        raise UsageError(f"--calibration-dataset {name} has {data.shape[0]} channels; model "
                         f"{ckpt['model']} takes {c}")
    index = torch.randperm(len(data), generator=torch.Generator().manual_seed(0))[:count]
    mean, std = ckpt["normalization"]["mean"], ckpt["normalization"]["std"]
    return prepare_batch(data.images[index], mean, std, (h, w)).numpy(), f"{name}/train"


def export_checkpoint(
    checkpoint: str | os.PathLike[str] | Mapping[str, Any],
    out_dir: str | os.PathLike[str] | None = None,
    formats: str | Sequence[str] = "all",
    opset: int | None = None,
    precision: str = "fp32",
    *,
    model_name: str | None = None,
    name: str | None = None,
    version: str = "1",
    triton: bool = False,
    triton_max_batch_size: int = 256,
    calibration_dataset: str | None = None,
    calibration_images: int = 512,
    data_dir: str | os.PathLike[str] | None = None,
    verify_dataset: str | None = None,
    verify_images: int = 2000,
    batch_sizes: Sequence[int] | None = None,
    force: bool = False,
) -> Manifest:
    """Export, verify and write an artifact directory; return its manifest.

    ``formats``: "onnx", "torchscript", "all" or "triton" (ONNX + a Triton repository), or a list.
    ``precision`` fp16/int8 writes that ONNX file *in addition to* the fp32 one, so a server can
    choose. Raises VerificationError (nothing written) if any file disagrees with eager PyTorch."""
    from cnnctl.export import verify
    from cnnctl.training.checkpoint import model_from_checkpoint

    what = plan(formats, precision, triton)
    ckpt, source = resolve_checkpoint(checkpoint, model_name)
    name, version = name or ckpt["model"], str(version)
    for key, value in (("name", name), ("version", version)):
        if not is_safe_name(value):
            raise UsageError(f"invalid model {key} {shown(value)}; allowed: {NAME_RULE}")
    if opset is not None and not 7 <= opset <= 30:
        raise UsageError(f"--opset {opset} is out of range; allowed 7..30 (default: the exporter's)")
    out = Path(out_dir) if out_dir is not None else default_out_dir(name)
    if out.exists() and (not out.is_dir() or any(out.iterdir())) and not force:
        raise UsageError(f"output directory {str(out)!r} exists and is not empty; pass --force "
                         f"to replace it")
    data_dir_s = str(data_dir) if data_dir is not None else None
    input_shape = tuple(int(s) for s in ckpt["input_shape"])
    c, h, w = input_shape
    mean, std = list(ckpt["normalization"]["mean"]), list(ckpt["normalization"]["std"])
    num_classes = int(ckpt["model_kwargs"]["num_classes"])
    model = model_from_checkpoint(ckpt, "cpu", check_inputs=False)

    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        files: list[FileEntry] = []
        to_verify: list[tuple[str, str, str]] = []
        exporters: dict[str, str] = {}
        used_opset: int | None = None
        calibration_source = None
        if what.onnx:
            from cnnctl.export.onnx import convert_fp16, export_onnx

            result = export_onnx(model, input_shape, tmp / ONNX_FILES["fp32"], opset)
            used_opset = result.opset
            exporters["fp32"] = result.exporter
            if what.precision == "fp16":
                convert_fp16(tmp / ONNX_FILES["fp32"], tmp / ONNX_FILES["fp16"])
                exporters["fp16"] = "onnxruntime.transformers.float16(keep_io_types=True)"
            elif what.precision == "int8":
                from cnnctl.export.quantize import EXPORTER, quantize_int8

                calib, calibration_source = _calibration_inputs(
                    ckpt, calibration_dataset, data_dir_s, calibration_images)
                quantize_int8(tmp / ONNX_FILES["fp32"], tmp / ONNX_FILES["int8"], calib)
                exporters["int8"] = f"{EXPORTER} on {len(calib)} {calibration_source} images"
            for prec in ("fp32", what.precision) if what.precision != "fp32" else ("fp32",):
                to_verify.append((ONNX_FILES[prec], "onnx", prec))
        if what.torchscript:
            from cnnctl.export.torchscript import EXPORTER as TS_EXPORTER, export_torchscript

            spec = {"input": {"name": "input", "datatype": "FP32", "shape": [-1, c, h, w]},
                    "output": {"name": "logits", "shape": [-1, num_classes]},
                    "mean": mean, "std": std, "class_names": list(ckpt["class_names"])}
            export_torchscript(model, input_shape, tmp / TORCHSCRIPT_FILE, spec)
            exporters["torchscript"] = TS_EXPORTER
            to_verify.append((TORCHSCRIPT_FILE, "torchscript", "fp32"))

        real = verify.load_real_images(
            verify_dataset or ckpt.get("dataset") or "", data_dir_s, input_shape, mean, std,
            verify_images, explicit=verify_dataset is not None)
        report = verify.verify_files(
            model, tmp, to_verify, input_shape=input_shape, mean=mean, std=std, real=real,
            batch_sizes=tuple(batch_sizes or verify.DEFAULT_BATCH_SIZES))
        verify.raise_on_failure(report)

        golden = _write_golden(tmp, model, real, ImageSpec(c, h, w, mean, std),
                               sorted({prec for _, _, prec in to_verify}))
        for relpath, format, prec in to_verify:
            entry = file_entry(tmp, relpath, format, prec)
            key = "torchscript" if format == "torchscript" else prec
            files.append(FileEntry(**{**entry.__dict__, "exporter": exporters[key]}))
        input_spec = TensorSpec("input", "FP32", [-1, c, h, w])
        output_spec = TensorSpec("logits", "FP32", [-1, num_classes])
        triton_info: dict[str, Any] = {}
        if what.triton:
            from cnnctl.export.triton import TritonConfig, write_repository

            triton_info = write_repository(tmp, name, version, ONNX_FILES["fp32"], input_spec,
                                           output_spec, TritonConfig(triton_max_batch_size))
        verification = report.to_json()
        if calibration_source:
            verification["int8_calibration"] = {"dataset": calibration_source,
                                                "images": calibration_images}
        manifest = Manifest(
            name=name, model=ckpt["model"], version=version, files=files,
            input=input_spec, output=output_spec, image=ImageSpec(c, h, w, mean, std),
            class_names=[str(n) for n in ckpt["class_names"]], opset=used_opset,
            verification=verification, source=source,
            created=datetime.now(timezone.utc).isoformat(timespec="seconds"),
            cnnctl_version=__version__, triton=triton_info, golden=golden,
        )
        save_manifest(tmp, manifest)  # last: a directory without it is not an artifact
        _move_into_place(tmp, out, force)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    log.info("wrote %s", out)
    return manifest


def _model_size_pixels(images: Any, spec: ImageSpec) -> Any:
    """uint8 N×C×H×W (a dataset's native size) → uint8 N×H×W×C at the model's size, resized
    as the server resizes an encoded image (PIL bilinear, export/image.py)."""
    import numpy as np
    from PIL import Image

    hwc = np.ascontiguousarray(np.asarray(images, dtype=np.uint8).transpose(0, 2, 3, 1))
    if hwc.shape[1:3] == (spec.height, spec.width):
        return hwc
    out = np.empty((len(hwc), spec.height, spec.width, spec.channels), dtype=np.uint8)
    for i, img in enumerate(hwc):
        pil = Image.fromarray(img[:, :, 0] if spec.channels == 1 else img)
        resized = np.asarray(pil.resize((spec.width, spec.height), Image.Resampling.BILINEAR))
        out[i] = resized.reshape(spec.height, spec.width, spec.channels)
    return out


def _write_golden(out: Path, model: Any, real: Any, spec: ImageSpec,
                  precisions: Sequence[str]) -> dict[str, Any]:
    """The artifact's golden set (export/golden.py): the first held-out images verification
    used, or seeded random pixels when there were none, with the eager model's logits."""
    import numpy as np

    from cnnctl.export import golden, verify

    if real.pixels is not None:
        pixels = _model_size_pixels(real.pixels, spec)
        labels = real.labels[:len(pixels)]
        dataset = real.dataset
    else:
        rng = np.random.default_rng(0)
        pixels = rng.integers(0, 256, (golden.GOLDEN_IMAGES, spec.height, spec.width,
                                       spec.channels), dtype=np.uint8)
        labels, dataset = None, "random pixels"
        log.warning("golden set: no real images; using random pixels (readiness checks the "
                    "model's answers, not its accuracy)")
    inputs = golden.to_tensor(list(pixels), spec, "golden image")
    logits = verify.eager_runner(model)(inputs)
    def tolerance(p: str) -> Any:
        t = verify.TOLERANCES[p]
        return golden.GoldenTolerance(t.atol, t.rtol, t.min_argmax_agreement)

    tolerances = {p: tolerance(p) for p in precisions}
    if "fp32" in tolerances:
        tolerances[golden.GPU_FP32] = tolerance("fp16")
    return golden.write_golden(out, pixels, logits, labels, dataset, tolerances)


def _move_into_place(tmp: Path, out: Path, force: bool) -> None:
    if out.exists():
        if not force and (not out.is_dir() or any(out.iterdir())):
            raise UsageError(f"output directory {str(out)!r} appeared during export; not replacing")
        old = out.with_name(f".{out.name}.old-{os.getpid()}")
        os.replace(out, old)
        os.replace(tmp, out)
        if old.is_dir():
            shutil.rmtree(old, ignore_errors=True)
        else:
            old.unlink(missing_ok=True)
    else:
        os.replace(tmp, out)
    fsync_dir(out.parent)


def verify_artifact_dir(
    artifact_dir: str | os.PathLike[str],
    checkpoint: str | os.PathLike[str] | Mapping[str, Any],
    *,
    model_name: str | None = None,
    data_dir: str | os.PathLike[str] | None = None,
    verify_dataset: str | None = None,
    verify_images: int = 2000,
    batch_sizes: Sequence[int] | None = None,
) -> dict[str, Any]:
    """Re-verify an existing artifact directory against its checkpoint: the manifest's sha256s first
    (a tampered file is an ArtifactError), then every file against eager PyTorch (VerificationError).
    Returns the verification report (JSON-ready)."""
    from cnnctl.export import verify
    from cnnctl.training.checkpoint import model_from_checkpoint

    manifest = load_manifest(artifact_dir)
    ckpt, _ = resolve_checkpoint(checkpoint, model_name)
    if ckpt["model"] != manifest.model:
        raise ArtifactError(f"{artifact_dir} holds a {manifest.model}; the checkpoint is a "
                            f"{ckpt['model']}")
    shape = tuple(int(s) for s in ckpt["input_shape"])
    mean, std = list(ckpt["normalization"]["mean"]), list(ckpt["normalization"]["std"])
    real = verify.load_real_images(
        verify_dataset or ckpt.get("dataset") or "", str(data_dir) if data_dir else None, shape,
        mean, std, verify_images, explicit=verify_dataset is not None)
    report = verify.verify_files(
        model_from_checkpoint(ckpt, "cpu", check_inputs=False), artifact_dir,
        [(f.path, f.format, f.precision) for f in manifest.files], input_shape=shape, mean=mean,
        std=std, real=real, batch_sizes=tuple(batch_sizes or verify.DEFAULT_BATCH_SIZES))
    verify.raise_on_failure(report)
    return report.to_json()
