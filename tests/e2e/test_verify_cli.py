"""Must show 4 of issue 21: `cnnctl verify --server HOST:PORT ARTIFACT_DIR` passes against `cnnctl
serve` serving the artifact, and fails, naming the mismatch, against a server serving another
model (or the same one with other preprocessing) under the same name."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from cnnctl.training.checkpoint import save_checkpoint
from tests.support.serving import CliServer, make_artifact

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "unit" / "export"))
from conftest import make_test_checkpoint  # noqa: E402


def cnnctl(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "cnnctl", "-q", *args], cwd=cwd,
                          capture_output=True, text=True, timeout=300)


@pytest.fixture(scope="module")
def exported(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """'a': lenet5 trained a few steps and exported by the CLI (a golden set of real held-out
    images); 'b': another lenet5 (random weights) under the same name."""
    work = tmp_path_factory.mktemp("verify")
    ckpt = save_checkpoint(make_test_checkpoint("lenet5", steps=30), work / "a.pt")
    done = cnnctl("export", str(ckpt), "--format", "onnx", "--triton", "--verify-images", "64",
                  "--out", str(work / "a"))
    assert done.returncode == 0, done.stderr
    return {"a": work / "a", "b": make_artifact(work / "b", name="lenet5", seed=1)}


def test_verify_server_passes_then_names_the_mismatch(exported: dict[str, Path],
                                                     tmp_path: Path) -> None:
    a, b = exported["a"], exported["b"]
    with CliServer(str(a)) as server:
        ok = cnnctl("verify", "--server", server.address, str(a))
        as_json = cnnctl("verify", "--server", server.address, str(a), "--json")
    assert ok.returncode == 0, ok.stderr
    assert ok.stdout.startswith(f"{server.address} model 'lenet5': verified against {a} (64 "
                                f"golden images: max abs error ")
    doc = json.loads(as_json.stdout)
    assert doc["passed"] and doc["precision"] == "fp32" and doc["golden"]["images"] == 64
    assert doc["golden"]["dataset"] == "mnist-sample/test"
    assert doc["golden"]["accuracy"] == doc["golden"]["golden_accuracy"]

    with CliServer(str(b)) as server:  # another model under the same name
        bad = cnnctl("verify", "--server", server.address, str(a))
        bad_json = cnnctl("verify", "--server", server.address, str(a), "--json")
    assert bad.returncode == 2
    line = bad.stderr.strip().splitlines()[-1]
    assert line.startswith(f"error: {server.address} model 'lenet5' does not match {a}: max abs "
                           f"logit error "), line
    assert "argmax agreement" in line
    assert bad_json.returncode == 2 and json.loads(bad_json.stdout)["passed"] is False

    # The same weights, served with another preprocessing spec (golden check off, or the server
    # would refuse it at load): verify names the differing field.
    c = Path(shutil.copytree(a, tmp_path / "c"))
    manifest = json.loads((c / "manifest.json").read_text())
    manifest["image"]["mean"] = [0.5]
    (c / "manifest.json").write_text(json.dumps(manifest))
    with CliServer(str(c), "--no-golden-check") as server:
        spec = cnnctl("verify", "--server", server.address, str(a))
    assert spec.returncode == 2
    assert spec.stderr.strip().splitlines()[-1] == (
        f"error: {server.address} model 'lenet5' does not match {a}: preprocessing differs: "
        f"server's mean [0.5] (artifact [0.1307])")


def test_verify_needs_a_golden_set(exported: dict[str, Path], tmp_path: Path) -> None:
    old = Path(shutil.copytree(exported["a"], tmp_path / "old"))
    manifest = json.loads((old / "manifest.json").read_text())
    del manifest["golden"]  # as artifacts exported before the golden set existed
    (old / "manifest.json").write_text(json.dumps(manifest))
    done = cnnctl("verify", "--server", "127.0.0.1:1", str(old))
    assert done.returncode == 2
    assert done.stderr.strip().splitlines()[-1] == (
        f"error: {old} has no golden set (exported before cnnctl stored one); re-export it with "
        f"`cnnctl export` to verify servers against it")
