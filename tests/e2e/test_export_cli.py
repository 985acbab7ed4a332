"""The real ``cnnctl export`` command in a subprocess: exit codes, --json, one-line errors."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from cnnctl.training.checkpoint import save_checkpoint

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "unit" / "export"))
from conftest import make_test_checkpoint  # noqa: E402

CLI = [sys.executable, "-m", "cnnctl"]


def cnnctl(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*CLI, "-q", "export", *args], cwd=cwd, capture_output=True, text=True,
                          timeout=300)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("run") / "convnet.pt"
    return save_checkpoint(make_test_checkpoint("convnet", steps=30), path)


def test_export_json_then_refuse_overwrite_then_tamper(checkpoint: Path, tmp_path: Path) -> None:
    done = cnnctl(str(checkpoint), "--format", "all", "--verify-images", "100", "--json",
                  cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    out = json.loads(done.stdout)
    artifact = tmp_path / "artifacts" / "convnet"  # the default --out
    assert Path(out["artifact_dir"]) == Path("artifacts/convnet")
    assert out["manifest"]["verification"]["passed"] is True
    assert (artifact / "manifest.json").is_file() and (artifact / "model.onnx").is_file()

    again = cnnctl(str(checkpoint), cwd=tmp_path)
    assert again.returncode == 2
    assert again.stderr.strip().splitlines()[-1].startswith("error: output directory")

    with open(artifact / "model.onnx", "r+b") as f:
        f.seek(100)
        f.write(b"\x7f")
    refused = cnnctl(str(checkpoint), "--verify-only", str(artifact), cwd=tmp_path)
    assert refused.returncode == 2
    assert "model.onnx: sha256" in refused.stderr and "refusing to load it" in refused.stderr


def test_missing_checkpoint_is_one_line_exit_2(tmp_path: Path) -> None:
    done = cnnctl(str(tmp_path / "nope.pt"), cwd=tmp_path)
    assert done.returncode == 2
    assert done.stderr.strip() == f"error: checkpoint {str(tmp_path / 'nope.pt')!r} does not exist"


@pytest.mark.parametrize("option,value", [("--name", "../evil\nINFO forged"), ("--name", "a" * 129),
                                          ("--version", "1/../2")])
def test_unsafe_name_or_version_is_one_line_exit_2_before_any_work(
        tmp_path: Path, option: str, value: str) -> None:
    done = cnnctl(str(tmp_path / "nope.pt"), option, value, cwd=tmp_path)  # the checkpoint: unread
    assert done.returncode == 2
    shown = repr(value) if len(repr(value)) <= 80 else repr(value)[:80] + "…"
    assert done.stderr == (
        f"error: Invalid value for '{option}': {shown} is not allowed; allowed: 1-128 letters, "
        f"digits, '_', '.', '-', starting with a letter or digit, without '..' "
        f"(see 'cnnctl export -h')\n")
