"""The artifact manifest: the one contract between export and serving.

``manifest.json`` sits in an artifact directory beside the model files it describes. It is plain
JSON, and this module imports neither torch nor onnxruntime, so the server (and any other reader)
can load and check it cheaply. Loading verifies every listed file's sha256: a tampered or truncated
model file is refused before anything uses it.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from cnnctl.errors import ArtifactError
from cnnctl.files import write_atomic

MANIFEST_NAME = "manifest.json"
FORMAT = "cnnctl.artifact"
FORMAT_VERSION = 1
FILE_FORMATS = ("onnx", "torchscript")
PRECISIONS = ("fp32", "fp16", "int8")


@dataclass(frozen=True)
class FileEntry:
    path: str  # relative to the artifact directory
    format: str  # onnx | torchscript
    precision: str  # fp32 | fp16 | int8
    sha256: str
    bytes: int
    exporter: str = ""  # what wrote it, e.g. "torch.onnx(dynamo=True)", "torch.jit.trace"


@dataclass(frozen=True)
class TensorSpec:
    name: str
    datatype: str  # KServe v2 datatype name: FP32, FP16, INT64, ...
    shape: list[int]  # -1 for the batch dimension


@dataclass(frozen=True)
class ImageSpec:
    """How to turn a raw image into the model's input tensor (what a server preprocesses)."""

    channels: int  # 1 = grayscale (PIL mode "L"), 3 = RGB
    height: int
    width: int
    mean: list[float]  # per channel, applied after scaling pixels to [0, 1]
    std: list[float]

    @property
    def color(self) -> str:
        return "grayscale" if self.channels == 1 else "rgb"


@dataclass(frozen=True)
class Manifest:
    name: str  # the served model name
    model: str  # registry name of the architecture
    version: str
    files: list[FileEntry]
    input: TensorSpec
    output: TensorSpec
    image: ImageSpec
    class_names: list[str]
    opset: int | None = None
    verification: dict[str, Any] = field(default_factory=dict)
    source: dict[str, Any] = field(default_factory=dict)  # the checkpoint it came from
    created: str = ""
    cnnctl_version: str = ""
    # The optional Triton model repository laid out beside the files (export/triton.py):
    # {"repository": "triton", "model_name": ..., "max_batch_size": ..., "files": [FileEntry-like]}.
    triton: dict[str, Any] = field(default_factory=dict)

    def file(self, format: str, precision: str | None = None) -> FileEntry | None:
        """The file of this format (and precision, if given); fp32 is preferred when not given."""
        matches = [f for f in self.files if f.format == format]
        if precision is not None:
            matches = [f for f in matches if f.precision == precision]
        matches.sort(key=lambda f: PRECISIONS.index(f.precision) if f.precision in PRECISIONS else 9)
        return matches[0] if matches else None

    def to_json(self) -> dict[str, Any]:
        data = asdict(self)
        data["image"]["color"] = self.image.color
        return {"format": FORMAT, "format_version": FORMAT_VERSION, **data}


def sha256_file(path: str | os.PathLike[str], chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def file_entry(artifact_dir: str | os.PathLike[str], relpath: str, format: str,
               precision: str) -> FileEntry:
    """Describe a model file already written into the artifact directory."""
    if format not in FILE_FORMATS:
        raise ArtifactError(f"unknown file format {format!r}; known: {', '.join(FILE_FORMATS)}")
    if precision not in PRECISIONS:
        raise ArtifactError(f"unknown precision {precision!r}; known: {', '.join(PRECISIONS)}")
    full = Path(artifact_dir) / relpath
    return FileEntry(relpath, format, precision, sha256_file(full), full.stat().st_size)


def save_manifest(artifact_dir: str | os.PathLike[str], manifest: Manifest) -> Path:
    path = Path(artifact_dir) / MANIFEST_NAME
    text = json.dumps(manifest.to_json(), indent=2, sort_keys=False) + "\n"
    write_atomic(path, text)
    return path


def _require(data: dict[str, Any], key: str, where: str) -> Any:
    if key not in data:
        raise ArtifactError(f"{where}: missing key {key!r}")
    return data[key]


def parse_manifest(data: dict[str, Any], where: str = "manifest") -> Manifest:
    if data.get("format") != FORMAT:
        raise ArtifactError(f"{where}: not a cnnctl artifact manifest (format={data.get('format')!r})")
    version = data.get("format_version")
    if version != FORMAT_VERSION:
        raise ArtifactError(
            f"{where}: manifest format_version {version!r} is not supported; this cnnctl reads "
            f"{FORMAT_VERSION}"
        )
    try:
        files = [FileEntry(**f) for f in _require(data, "files", where)]
        image = dict(_require(data, "image", where))
        image.pop("color", None)
        return Manifest(
            name=str(_require(data, "name", where)),
            model=str(_require(data, "model", where)),
            version=str(data.get("version", "1")),
            files=files,
            input=TensorSpec(**_require(data, "input", where)),
            output=TensorSpec(**_require(data, "output", where)),
            image=ImageSpec(**image),
            class_names=[str(c) for c in _require(data, "class_names", where)],
            opset=data.get("opset"),
            verification=dict(data.get("verification") or {}),
            source=dict(data.get("source") or {}),
            created=str(data.get("created", "")),
            cnnctl_version=str(data.get("cnnctl_version", "")),
            triton=dict(data.get("triton") or {}),
        )
    except TypeError as exc:
        raise ArtifactError(f"{where}: malformed entry ({exc})") from None


def load_manifest(artifact_dir: str | os.PathLike[str], verify_files: bool = True) -> Manifest:
    """Read ``manifest.json`` and (by default) check every listed file's size and sha256."""
    artifact_dir = Path(artifact_dir)
    path = artifact_dir / MANIFEST_NAME
    if not artifact_dir.is_dir():
        raise ArtifactError(f"artifact directory {str(artifact_dir)!r} does not exist")
    if not path.is_file():
        raise ArtifactError(
            f"{str(artifact_dir)!r} is not an artifact directory: no {MANIFEST_NAME} "
            f"(write one with `cnnctl export`)"
        )
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise ArtifactError(f"{path}: unreadable manifest ({exc})") from None
    manifest = parse_manifest(data, str(path))
    if verify_files:
        verify_files_of(artifact_dir, manifest)
    return manifest


def verify_files_of(artifact_dir: str | os.PathLike[str], manifest: Manifest) -> None:
    listed = [(e.path, e.sha256) for e in manifest.files]
    # The Triton repository holds its own copy of the ONNX model (and config.pbtxt): a server
    # pointed at it must get the same refusal.
    listed += [(str(e["path"]), str(e["sha256"])) for e in manifest.triton.get("files", [])]
    for relpath, sha256 in listed:
        full = Path(artifact_dir) / relpath
        if not full.is_file():
            raise ArtifactError(f"{full}: listed in the manifest but missing")
        digest = sha256_file(full)
        if digest != sha256:
            raise ArtifactError(
                f"{full}: sha256 {digest[:16]}… does not match the manifest's "
                f"{sha256[:16]}… (file changed after export); refusing to load it"
            )
