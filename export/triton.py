"""Lay an exported ONNX model out as a Triton Inference Server model repository.

``<artifact>/triton/<name>/<version>/model.onnx`` + ``<artifact>/triton/<name>/config.pbtxt``:
point ``tritonserver --model-repository <artifact>/triton`` at it and the same model is served by
Triton, with the same ``input``/``logits`` tensor names cnnctl's own server uses, so clients do not
change. Dims in the config exclude the batch dimension (Triton adds it when max_batch_size > 0).
"""

from __future__ import annotations

import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cnnctl.errors import UsageError
from cnnctl.export.manifest import TensorSpec, sha256_file

REPOSITORY = "triton"
PLATFORM = "onnxruntime_onnx"


@dataclass(frozen=True)
class TritonConfig:
    max_batch_size: int = 256  # images per batch Triton may form
    max_queue_delay_us: int = 2000  # how long Triton holds a request to grow a batch (microseconds)


def config_text(name: str, input: TensorSpec, output: TensorSpec, cfg: TritonConfig) -> str:
    def dims(spec: TensorSpec) -> str:
        return ", ".join(str(d) for d in spec.shape[1:])

    def dtype(spec: TensorSpec) -> str:
        return f"TYPE_{spec.datatype}"

    return (
        f'name: "{name}"\n'
        f'platform: "{PLATFORM}"\n'
        f"max_batch_size: {cfg.max_batch_size}\n"
        f"input [\n"
        f'  {{ name: "{input.name}" data_type: {dtype(input)} dims: [ {dims(input)} ] }}\n'
        f"]\n"
        f"output [\n"
        f'  {{ name: "{output.name}" data_type: {dtype(output)} dims: [ {dims(output)} ] }}\n'
        f"]\n"
        f"dynamic_batching {{\n"
        f"  max_queue_delay_microseconds: {cfg.max_queue_delay_us}\n"
        f"}}\n"
        f"version_policy: {{ latest: {{ num_versions: 1 }} }}\n"
    )


def write_repository(
    artifact_dir: str | os.PathLike[str], name: str, version: str, onnx_relpath: str,
    input: TensorSpec, output: TensorSpec, cfg: TritonConfig = TritonConfig(),
) -> dict[str, Any]:
    """Copy the ONNX file into the Triton layout and write config.pbtxt. Returns the manifest's
    ``triton`` section (with each file's sha256, so loaders refuse a tampered copy too)."""
    if not version.isdigit():
        raise UsageError(f"Triton needs a numeric model version; got {version!r} (use --version N)")
    if cfg.max_batch_size < 1:
        raise UsageError(f"max_batch_size must be at least 1, got {cfg.max_batch_size}")
    root = Path(artifact_dir)
    model_dir = root / REPOSITORY / name
    (model_dir / version).mkdir(parents=True, exist_ok=True)
    model_rel = f"{REPOSITORY}/{name}/{version}/model.onnx"
    config_rel = f"{REPOSITORY}/{name}/config.pbtxt"
    shutil.copyfile(root / onnx_relpath, root / model_rel)
    (root / config_rel).write_text(config_text(name, input, output, cfg))
    files = [{"path": p, "sha256": sha256_file(root / p), "bytes": (root / p).stat().st_size}
             for p in (model_rel, config_rel)]
    return {"repository": REPOSITORY, "model_name": name, "version": version,
            "platform": PLATFORM, "max_batch_size": cfg.max_batch_size,
            "max_queue_delay_microseconds": cfg.max_queue_delay_us, "files": files}
