"""The artifact manifest: the one contract between export and serving.

``manifest.json`` sits in an artifact directory beside the model files it describes. It is plain
JSON, and this module imports neither torch nor onnxruntime, so the server (and any other reader)
can load and check it cheaply. Loading verifies every listed file's size and sha256: a tampered or
truncated model file is refused before anything uses it.

The artifact directory is trusted but checked: names and versions are limited to a safe set, every
listed path must stay inside the directory (symlinks resolved), and every read is bounded. A reader
that goes on to use a file (the server) takes its bytes from ``read_file``, which hashes exactly the
bytes it returns, so a file replaced after the check is never what gets used.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
import stat
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, BinaryIO

from cnnctl.errors import ArtifactError
from cnnctl.files import write_atomic

MANIFEST_NAME = "manifest.json"
FORMAT = "cnnctl.artifact"
FORMAT_VERSION = 1
FILE_FORMATS = ("onnx", "torchscript")
PRECISIONS = ("fp32", "fp16", "int8")

# A manifest is a few KB (the class names of 100,000 classes fit in 2 MB); a bigger one is not ours.
MANIFEST_MAX_BYTES = 16 << 20
# One ONNX file is one protobuf message, which protobuf caps at 2 GiB. A bigger model keeps its
# weights in external data files, which no manifest hash covers; the server does not load those.
ONNX_MAX_BYTES = 2 << 30
# Model names and versions: usable as they are in KServe's URLs (/v2/models/NAME/versions/V), as
# Triton model-repository directories and in log lines. Also each part of a listed file's path.
NAME_RULE = "1-128 letters, digits, '_', '.', '-', starting with a letter or digit, without '..'"
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,127}")
_SHA256 = re.compile(r"[0-9a-f]{64}")
_CHUNK = 1 << 20


def is_safe_name(value: object) -> bool:
    """True for a model name or version (or a path part) made only of NAME_RULE's characters."""
    return isinstance(value, str) and _NAME.fullmatch(value) is not None and ".." not in value


def shown(value: object, limit: int = 80) -> str:
    """``value`` quoted for a message: repr escapes newlines and control characters; capped."""
    text = repr(value)
    return text if len(text) <= limit else text[:limit] + "…"


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
    # The golden set (export/golden.py): {"file": {path, sha256, bytes}, "images", "dataset",
    # "labels", "tolerance": {precision: {atol, rtol, min_argmax_agreement}}}. Empty in
    # artifacts exported before it existed: they load, with readiness unverified.
    golden: dict[str, Any] = field(default_factory=dict)

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


def sha256_file(path: str | os.PathLike[str], chunk: int = _CHUNK) -> str:
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


def _check_listed(raw: object, what: str) -> dict[str, Any]:
    """A ``files`` or ``triton.files`` entry: a path that cannot leave the artifact directory (no
    absolute path, no '..'), a sha256 and a size."""
    if not isinstance(raw, dict):
        raise ArtifactError(f"{what}: {shown(raw)} is not an object")
    path, sha256, size = raw.get("path"), raw.get("sha256"), raw.get("bytes")
    if not (isinstance(path, str) and all(is_safe_name(part) for part in path.split("/"))):
        raise ArtifactError(
            f"{what}.path {shown(path)} is not allowed; allowed: a relative path inside the "
            f"artifact directory ('/'-separated parts of {NAME_RULE}; not absolute)")
    if not (isinstance(sha256, str) and _SHA256.fullmatch(sha256)):
        raise ArtifactError(f"{what}.sha256 {shown(sha256)} is not 64 lowercase hex digits")
    if type(size) is not int or size < 0:
        raise ArtifactError(f"{what}.bytes {shown(size)} is not a size (an integer >= 0)")
    return raw


def _check_specs(m: Manifest, where: str) -> None:
    """The tensor and image specs the server sizes its buffers by: well-typed, or refused here
    rather than as a traceback in the request path."""
    for what, t in (("input", m.input), ("output", m.output)):
        if not (isinstance(t.name, str) and isinstance(t.datatype, str)
                and isinstance(t.shape, list) and t.shape[:1] == [-1]
                and all(type(d) is int and d >= 1 for d in t.shape[1:])):
            raise ArtifactError(f"{where}: {what} {shown(asdict(t), 200)} is not a tensor spec; "
                                f"allowed: a name, a datatype and a shape [-1, positive ints...]")
    im = m.image
    per_channel = [im.mean, im.std]
    if not (type(im.channels) is int and im.channels in (1, 3)
            and all(type(d) is int and d >= 1 for d in (im.height, im.width))
            and all(isinstance(v, list) and len(v) == im.channels for v in per_channel)
            and all(type(v) in (int, float) and math.isfinite(v) for v in [*im.mean, *im.std])
            and all(v > 0 for v in im.std)):
        raise ArtifactError(f"{where}: image {shown(asdict(im), 200)} is not an image spec; "
                            f"allowed: channels 1 or 3, positive height and width, a finite mean "
                            f"and a positive std per channel")


def parse_manifest(data: dict[str, Any], where: str = "manifest") -> Manifest:
    if not isinstance(data, dict):
        raise ArtifactError(f"{where}: not a cnnctl artifact manifest (not a JSON object)")
    if data.get("format") != FORMAT:
        raise ArtifactError(f"{where}: not a cnnctl artifact manifest "
                            f"(format={shown(data.get('format'))})")
    format_version = data.get("format_version")
    if format_version != FORMAT_VERSION:
        raise ArtifactError(
            f"{where}: manifest format_version {shown(format_version)} is not supported; this "
            f"cnnctl reads {FORMAT_VERSION}"
        )
    name, version = _require(data, "name", where), data.get("version", "1")
    if type(version) is int and version >= 0:
        version = str(version)
    for key, value in (("name", name), ("version", version)):
        if not is_safe_name(value):
            raise ArtifactError(f"{where}: model {key} {shown(value)} is not allowed; allowed: "
                                f"{NAME_RULE}")
    try:
        files = [FileEntry(**_check_listed(f, f"{where}: files[{i}]"))
                 for i, f in enumerate(_require(data, "files", where))]
        triton = dict(data.get("triton") or {})
        for i, f in enumerate(triton.get("files", [])):
            _check_listed(f, f"{where}: triton.files[{i}]")
        golden = dict(data.get("golden") or {})
        if golden:
            _check_listed(golden.get("file"), f"{where}: golden.file")
        image = dict(_require(data, "image", where))
        image.pop("color", None)
        manifest = Manifest(
            name=name,
            model=str(_require(data, "model", where)),
            version=version,
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
            triton=triton,
            golden=golden,
        )
    except (TypeError, ValueError) as exc:
        raise ArtifactError(f"{where}: malformed entry ({exc})") from None
    _check_specs(manifest, where)
    return manifest


def listed_files(manifest: Manifest) -> list[tuple[str, str, int]]:
    """(path, sha256, bytes) of every file the manifest lists, the Triton repository's included."""
    listed = [(e.path, e.sha256, e.bytes) for e in manifest.files]
    # The Triton repository holds its own copy of the ONNX model (and config.pbtxt), which
    # tritonserver loads: a tampered copy is refused like the others.
    listed += [(f["path"], f["sha256"], f["bytes"]) for f in manifest.triton.get("files", [])]
    if manifest.golden:
        g = manifest.golden["file"]
        listed.append((g["path"], g["sha256"], g["bytes"]))
    return listed


def _inside(artifact_dir: Path, relpath: str) -> Path:
    """The real path of ``relpath``, which must stay inside the artifact directory once symlinks
    are resolved."""
    root = artifact_dir.resolve()
    try:
        full = (root / relpath).resolve()
    except (OSError, RuntimeError) as exc:  # RuntimeError: a symlink loop
        raise ArtifactError(f"{artifact_dir / relpath}: cannot resolve it ({exc})") from None
    if not full.is_relative_to(root):
        raise ArtifactError(
            f"{artifact_dir / relpath}: resolves to {shown(str(full), 200)}, outside the artifact "
            f"directory {shown(str(root), 200)}; allowed: files inside it (symlinks included)")
    return full


# O_NOFOLLOW: the real path is opened, so a symlink swapped in since it was resolved is refused.
# O_NONBLOCK: a FIFO would wait for a writer forever (it is then refused as not a regular file).
_OPEN_FLAGS = (os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_NONBLOCK", 0)
               | getattr(os, "O_CLOEXEC", 0))


def _open_inside(artifact_dir: Path, relpath: str) -> BinaryIO:
    """A regular file inside the artifact directory, open for reading."""
    full = _inside(artifact_dir, relpath)
    try:
        fd = os.open(full, _OPEN_FLAGS)
    except FileNotFoundError:
        raise ArtifactError(f"{artifact_dir / relpath}: listed in the manifest but "
                            f"missing") from None
    except OSError as exc:
        raise ArtifactError(f"{artifact_dir / relpath}: cannot open it ({exc.strerror})") from None
    f = os.fdopen(fd, "rb")
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        f.close()
        raise ArtifactError(f"{artifact_dir / relpath}: not a regular file; allowed: regular files "
                            f"(or symlinks to them inside the artifact directory)")
    return f


def _check_size(where: Path, size: int, expected: int) -> None:
    if size != expected:
        raise ArtifactError(f"{where}: size {size:,} bytes does not match the manifest's "
                            f"{expected:,} (file changed after export); refusing to load it")


def _check_digest(where: Path, digest: str, expected: str) -> None:
    if digest != expected:
        raise ArtifactError(
            f"{where}: sha256 {digest[:16]}… does not match the manifest's {expected[:16]}… "
            f"(file changed after export); refusing to load it"
        )


def load_manifest(artifact_dir: str | os.PathLike[str], verify_files: bool = True) -> Manifest:
    """Read and check ``manifest.json`` and (by default) every listed file's size and sha256.

    Every listed path is checked to stay inside the artifact directory either way. A reader that
    uses a file's contents passes ``verify_files=False`` and reads it with ``read_file``."""
    artifact_dir = Path(artifact_dir)
    path = artifact_dir / MANIFEST_NAME
    if not artifact_dir.is_dir():
        raise ArtifactError(f"artifact directory {str(artifact_dir)!r} does not exist")
    if not path.is_file():
        raise ArtifactError(
            f"{str(artifact_dir)!r} is not an artifact directory: no {MANIFEST_NAME} "
            f"(write one with `cnnctl export`)"
        )
    with _open_inside(artifact_dir, MANIFEST_NAME) as f:
        text = f.read(MANIFEST_MAX_BYTES + 1)
    if len(text) > MANIFEST_MAX_BYTES:
        raise ArtifactError(f"{path}: over {MANIFEST_MAX_BYTES:,} bytes; a manifest written by "
                            f"`cnnctl export` is a few KB")
    try:
        data = json.loads(text)
    except (ValueError, RecursionError) as exc:  # RecursionError: arrays nested too deep
        raise ArtifactError(f"{path}: unreadable manifest ({exc})") from None
    manifest = parse_manifest(data, str(path))
    for relpath, _, _ in listed_files(manifest):
        _inside(artifact_dir, relpath)
    if verify_files:
        verify_files_of(artifact_dir, manifest)
    return manifest


def verify_files_of(artifact_dir: str | os.PathLike[str], manifest: Manifest) -> None:
    """Check every listed file's size and sha256, reading each in chunks (none is kept)."""
    artifact_dir = Path(artifact_dir)
    for relpath, sha256, size in listed_files(manifest):
        h = hashlib.sha256()
        with _open_inside(artifact_dir, relpath) as f:
            _check_size(artifact_dir / relpath, os.fstat(f.fileno()).st_size, size)
            read = 0
            while read <= size and (block := f.read(min(_CHUNK, size + 1 - read))):
                h.update(block)
                read += len(block)
        _check_size(artifact_dir / relpath, read, size)  # it grew or shrank since the fstat
        _check_digest(artifact_dir / relpath, h.hexdigest(), sha256)


def read_file(artifact_dir: str | os.PathLike[str], entry: FileEntry,
              max_bytes: int = ONNX_MAX_BYTES) -> bytes:
    """The bytes of one listed file, read once, with their size and sha256 checked.

    Use these bytes, not the path: a file replaced after this check is then never what is used."""
    artifact_dir = Path(artifact_dir)
    where = artifact_dir / entry.path
    if entry.bytes > max_bytes:
        raise ArtifactError(f"{where}: the manifest says {entry.bytes:,} bytes; at most "
                            f"{max_bytes:,} are read into memory (one ONNX file, no external data)")
    with _open_inside(artifact_dir, entry.path) as f:
        _check_size(where, os.fstat(f.fileno()).st_size, entry.bytes)
        data = f.read(entry.bytes + 1)
    _check_size(where, len(data), entry.bytes)
    _check_digest(where, hashlib.sha256(data).hexdigest(), entry.sha256)
    return data
