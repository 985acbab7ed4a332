from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from cnnctl.errors import ArtifactError
from cnnctl.export import manifest as mf


def _artifact(tmp_path: Path) -> tuple[Path, mf.Manifest]:
    (tmp_path / "model.onnx").write_bytes(b"not really onnx, but bytes with a digest")
    entry = mf.file_entry(tmp_path, "model.onnx", "onnx", "fp32")
    m = mf.Manifest(
        name="lenet5", model="lenet5", version="1", files=[entry],
        input=mf.TensorSpec("input", "FP32", [-1, 1, 32, 32]),
        output=mf.TensorSpec("logits", "FP32", [-1, 10]),
        image=mf.ImageSpec(1, 32, 32, [0.1307], [0.3081]),
        class_names=[str(i) for i in range(10)], opset=18,
    )
    mf.save_manifest(tmp_path, m)
    return tmp_path, m


def test_round_trip(tmp_path: Path) -> None:
    d, m = _artifact(tmp_path)
    loaded = mf.load_manifest(d)
    assert loaded == m
    data = json.loads((d / "manifest.json").read_text())
    assert data["format"] == "cnnctl.artifact" and data["format_version"] == 1
    assert data["image"]["color"] == "grayscale"
    assert loaded.file("onnx").sha256 == mf.sha256_file(d / "model.onnx")
    assert loaded.file("torchscript") is None


def test_tampered_file_is_refused(tmp_path: Path) -> None:
    d, _ = _artifact(tmp_path)
    with open(d / "model.onnx", "r+b") as f:
        f.write(b"N")
    with pytest.raises(ArtifactError, match="sha256 .* does not match the manifest"):
        mf.load_manifest(d)
    with open(d / "model.onnx", "ab") as f:
        f.write(b"!")
    with pytest.raises(ArtifactError, match="size 41 bytes does not match the manifest's 40 "):
        mf.load_manifest(d)


def test_missing_file_and_bad_version(tmp_path: Path) -> None:
    d, _ = _artifact(tmp_path)
    data = json.loads((d / "manifest.json").read_text())
    data["format_version"] = 99
    (d / "manifest.json").write_text(json.dumps(data))
    with pytest.raises(ArtifactError, match="format_version 99 is not supported"):
        mf.load_manifest(d)
    (d / "manifest.json").unlink()
    with pytest.raises(ArtifactError, match="no manifest.json"):
        mf.load_manifest(d)
    with pytest.raises(ArtifactError, match="does not exist"):
        mf.load_manifest(d / "nope")


def test_manifest_module_imports_no_torch() -> None:
    code = "import sys, cnnctl.export.manifest; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def _edit(d: Path, **changes: Any) -> None:
    data = json.loads((d / "manifest.json").read_text())
    for dotted, value in changes.items():
        *parents, key = dotted.split("__")
        node = data
        for p in parents:
            node = node[int(p)] if p.isdigit() else node[p]
        node[int(key) if key.isdigit() else key] = value
    (d / "manifest.json").write_text(json.dumps(data))


def _triton(d: Path, path: str) -> dict[str, Any]:
    return {"repository": "triton", "files": [
        {"path": path, "sha256": mf.sha256_file(d / "model.onnx"), "bytes": 40}]}


@pytest.mark.parametrize("path", ["/etc/passwd", "../other/model.onnx", "triton/../../model.onnx",
                                  "a//model.onnx", "model.onnx/", "..", "", "model\n.onnx",
                                  "sub\\..\\model.onnx", 7])
@pytest.mark.parametrize("entry", ["files", "triton.files"])
def test_listed_paths_must_stay_inside_the_artifact_directory(tmp_path: Path, path: Any,
                                                              entry: str) -> None:
    d, _ = _artifact(tmp_path)
    if entry == "files":
        _edit(d, files__0__path=path)
    else:
        _edit(d, triton=_triton(d, path))
    with pytest.raises(ArtifactError) as exc:
        mf.load_manifest(d, verify_files=False)
    assert f"manifest.json: {entry}[0].path {path!r} is not allowed; allowed: a relative path " \
           f"inside the artifact directory" in str(exc.value)
    assert "\n" not in str(exc.value)


@pytest.mark.parametrize("entry", ["files", "triton.files"])
def test_a_symlink_out_of_the_artifact_directory_is_refused(tmp_path: Path, entry: str) -> None:
    (tmp_path / "art").mkdir()
    d, _ = _artifact(tmp_path / "art")
    outside = tmp_path / "elsewhere.onnx"
    outside.write_bytes((d / "model.onnx").read_bytes())  # same bytes: the sha256 cannot tell
    (d / "link.onnx").symlink_to(outside)
    if entry == "files":
        _edit(d, files__0__path="link.onnx")
    else:
        _edit(d, triton=_triton(d, "link.onnx"))
    for verify in (False, True):
        with pytest.raises(ArtifactError, match=r"link.onnx: resolves to '.*elsewhere.onnx', "
                           r"outside the artifact directory '.*art'; allowed: files inside it"):
            mf.load_manifest(d, verify_files=verify)
    (d / "link.onnx").unlink()
    (d / "link.onnx").symlink_to("model.onnx")  # a symlink that stays inside is fine
    assert ("link.onnx", mf.sha256_file(outside), 40) in mf.listed_files(mf.load_manifest(d))


def test_special_files_are_refused_without_blocking(tmp_path: Path) -> None:
    d, _ = _artifact(tmp_path)
    (d / "model.onnx").unlink()
    os.mkfifo(d / "model.onnx")  # reading it would wait for a writer forever
    with pytest.raises(ArtifactError, match="model.onnx: not a regular file"):
        mf.load_manifest(d)
    with pytest.raises(ArtifactError, match="model.onnx: not a regular file"):
        mf.read_file(d, mf.load_manifest(d, verify_files=False).files[0])


@pytest.mark.parametrize("key,value", [
    ("name", "../x\nINFO forged log line"), ("name", "a..b"), ("name", ".hidden"), ("name", ""),
    ("name", "x" * 129), ("name", "lenet/5"), ("name", "lenet 5"), ("name", 5),
    ("version", "1\n"), ("version", "../2"), ("version", "-1"), ("version", None),
])
def test_model_names_and_versions_are_limited_to_a_safe_set(tmp_path: Path, key: str,
                                                            value: Any) -> None:
    d, _ = _artifact(tmp_path)
    _edit(d, **{key: value})
    with pytest.raises(ArtifactError) as exc:
        mf.load_manifest(d)
    assert str(exc.value).endswith(
        f"manifest.json: model {key} {mf.shown(value)} is not allowed; allowed: 1-128 letters, "
        f"digits, '_', '.', '-', starting with a letter or digit, without '..'")
    assert "\n" not in str(exc.value)


def test_safe_names_are_accepted(tmp_path: Path) -> None:
    d, _ = _artifact(tmp_path)
    _edit(d, name="ResNet-18_v2.1", version=3)  # an integer version, as hand-written JSON has it
    m = mf.load_manifest(d)
    assert (m.name, m.version) == ("ResNet-18_v2.1", "3")
    assert mf.is_safe_name("x" * 128) and not mf.is_safe_name("x" * 129)


@pytest.mark.parametrize("text,message", [
    ("[]", "not a cnnctl artifact manifest (not a JSON object)"),
    ("[" * 100_000 + "]" * 100_000, "unreadable manifest"),
    ("\xff", "unreadable manifest"),
])
def test_malformed_manifest_json_is_an_artifact_error(tmp_path: Path, text: str,
                                                      message: str) -> None:
    d, _ = _artifact(tmp_path)
    (d / "manifest.json").write_bytes(text.encode("latin-1"))
    with pytest.raises(ArtifactError, match=message.replace("(", r"\(").replace(")", r"\)")):
        mf.load_manifest(d)


@pytest.mark.parametrize("changes,message", [
    ({"files__0__sha256": "abc"}, "files[0].sha256 'abc' is not 64 lowercase hex digits"),
    ({"files__0__bytes": "40"}, "files[0].bytes '40' is not a size"),
    ({"files__0__bytes": -1}, "files[0].bytes -1 is not a size"),
    ({"files__0": "model.onnx"}, "files[0]: 'model.onnx' is not an object"),
    ({"files__0__color": 1}, "malformed entry"),
    ({"input__shape": "abc"}, "input .* is not a tensor spec"),
    ({"output__shape": [10]}, "output .* is not a tensor spec"),
    ({"input__shape": [-1, 1, 0, 32]}, "input .* is not a tensor spec"),
    ({"image__channels": 2}, "image .* is not an image spec"),
    ({"image__std": [0.0]}, "image .* is not an image spec"),
    ({"image__mean": [0.1, 0.2]}, "image .* is not an image spec"),
    ({"image__height": 3.5}, "image .* is not an image spec"),
])
def test_malformed_entries_are_refused_at_load(tmp_path: Path, changes: dict[str, Any],
                                               message: str) -> None:
    d, _ = _artifact(tmp_path)
    _edit(d, **changes)
    with pytest.raises(ArtifactError, match=message.replace("[", r"\[").replace("]", r"\]")):
        mf.load_manifest(d)


def test_reads_are_bounded(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    d, m = _artifact(tmp_path)
    # A model file much larger than the manifest says: refused without hashing it all.
    hashed = []

    class Counting:
        def __init__(self, data: bytes = b"") -> None:
            self._h = hashlib.sha256()
            self.update(data)

        def update(self, data: bytes) -> None:
            hashed.append(len(data))
            self._h.update(data)

        def hexdigest(self) -> str:
            return self._h.hexdigest()

    monkeypatch.setattr(mf, "hashlib", type("hashlib", (), {"sha256": Counting}))
    with open(d / "model.onnx", "ab") as f:
        f.truncate(64 << 20)  # sparse: cheap to make, 64 MiB to read
    with pytest.raises(ArtifactError, match="size 67,108,864 bytes does not match the manifest"):
        mf.load_manifest(d)
    with pytest.raises(ArtifactError, match="size 67,108,864 bytes does not match"):
        mf.read_file(d, m.files[0])
    assert sum(hashed) <= 41
    # A file bigger than one ONNX file can be is not read into memory, whatever the manifest says.
    with pytest.raises(ArtifactError, match=r"the manifest says 67,108,864 bytes; at most 1,000 "
                       r"are read into memory \(one ONNX file, no external data\)"):
        mf.read_file(d, mf.FileEntry("model.onnx", "onnx", "fp32", "0" * 64, 64 << 20), 1000)
    # A manifest over the limit is refused before it is parsed.
    monkeypatch.setattr(mf, "MANIFEST_MAX_BYTES", 1 << 10)
    _edit(d, class_names=[f"class {i}" for i in range(1000)])
    with pytest.raises(ArtifactError, match="manifest.json: over 1,024 bytes; a manifest written by"):
        mf.load_manifest(d, verify_files=False)


def test_read_file_returns_the_bytes_it_checked(tmp_path: Path) -> None:
    d, m = _artifact(tmp_path)
    data = mf.read_file(d, m.files[0])
    assert data == (d / "model.onnx").read_bytes()
    assert hashlib.sha256(data).hexdigest() == m.files[0].sha256
