"""Issue 21, model lifecycle: `cnnctl serve --model-control-mode poll|explicit` swapping, loading
and unloading versions under traffic, and refusing an artifact whose golden check fails."""

from __future__ import annotations

import importlib.util
import json
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from tests.support.serving import CliServer, infer_request, logits_of, make_artifact, rewrite_listed

PROBE = Path(__file__).with_name("triton_probe.py")
CLIENTS = 8


def reference(artifact: Path, x: np.ndarray) -> np.ndarray:
    import onnxruntime as ort

    session = ort.InferenceSession(str(artifact / "model.onnx"), providers=["CPUExecutionProvider"])
    return session.run(["logits"], {"input": x})[0]


def index_of(address: str) -> list[tuple[str, str, str, str]]:
    import grpc

    from cnnctl.protos import grpc_service_pb2 as pb
    from tests.support.serving import stub

    with grpc.insecure_channel(address) as channel:
        index = stub(channel).RepositoryIndex(pb.RepositoryIndexRequest(), timeout=10)
    return [(m.name, m.version, m.state, m.reason) for m in index.models]


def model_ready(address: str, name: str, version: str = "") -> tuple[bool, str]:
    """ModelReady's answer and the reason the server gives in the trailing metadata."""
    import grpc

    from cnnctl.protos import grpc_service_pb2 as pb
    from tests.support.serving import stub

    with grpc.insecure_channel(address) as channel:
        resp, call = stub(channel).ModelReady.with_call(
            pb.ModelReadyRequest(name=name, version=version), timeout=10)
    reason = dict(call.trailing_metadata() or ()).get("cnnctl-not-ready-reason", "")
    return resp.ready, reason


def wait_for(predicate: Any, timeout: float = 60.0, what: str = "") -> None:
    end = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > end:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.05)


def test_poll_swaps_v1_to_v2_under_load_without_a_failed_request(tmp_path: Path) -> None:
    """Must show 1: 8 closed-loop clients on version 1; version 2's directory is copied into the
    repository; the server (poll mode) swaps it in. No request fails, and the answers switch
    from v1's logits to v2's at one point in time."""
    from cnnctl.clients.client import Client

    repo = tmp_path / "repo"
    v1 = make_artifact(repo / "lenet5" / "1", version="1", seed=0)
    v2 = make_artifact(tmp_path / "staging" / "2", version="2", seed=1)  # other weights
    x = np.random.default_rng(0).standard_normal((1, 1, 32, 32), dtype=np.float32)
    want = {"1": reference(v1, x), "2": reference(v2, x)}
    assert not np.allclose(want["1"], want["2"], atol=1e-3)  # distinguishable answers
    records: list[list[tuple[float, float, str]]] = [[] for _ in range(CLIENTS)]
    failures: list[str] = []
    stop = threading.Event()

    def closed_loop(i: int, address: str) -> None:
        with Client(address, retries=0) as client:
            request = infer_request(x)
            while not stop.is_set():
                start = time.monotonic()
                try:
                    resp = client.infer_request(request)
                except Exception as exc:  # noqa: BLE001 - every failure is counted
                    failures.append(repr(exc))
                    continue
                end = time.monotonic()
                y = logits_of(resp)
                by_logits = [v for v, ref in want.items()
                             if np.allclose(y, ref, rtol=1e-5, atol=1e-5)]
                records[i].append((start, end, by_logits[0] if by_logits else "?"))
                assert resp.model_version in by_logits, (resp.model_version, y)

    with CliServer("--repository", str(repo), "--model-control-mode", "poll",
                   "--repository-poll-secs", "0.2") as server:
        threads = [threading.Thread(target=closed_loop, args=(i, server.address))
                   for i in range(CLIENTS)]
        for t in threads:
            t.start()
        time.sleep(1.0)
        shutil.copytree(v2, repo / "lenet5" / "2")
        wait_for(lambda: all(r and r[-1][2] == "2" for r in records), what="every client on v2")
        time.sleep(0.5)
        stop.set()
        for t in threads:
            t.join(30)
        index = index_of(server.address)

    answers = sorted((a for r in records for a in r), key=lambda a: a[0])
    assert failures == []
    assert {a[2] for a in answers} == {"1", "2"}
    assert sum(a[2] == "1" for a in answers) > 50 and sum(a[2] == "2" for a in answers) > 50
    for r in records:  # each client: v1's answers, then v2's, never back
        versions = [a[2] for a in r]
        assert versions == sorted(versions)
    v1_answers = [a for a in answers if a[2] == "1"]
    v2_answers = [a for a in answers if a[2] == "2"]
    # Once any client had a v2 answer, no request it or any other started was answered by v1 ...
    assert max(a[0] for a in v1_answers) < min(a[1] for a in v2_answers)
    # ... and v2 computed nothing until v1 had answered all it took in (Batcher.hold_until).
    assert max(a[1] for a in v1_answers) < min(a[1] for a in v2_answers)
    assert index == [("lenet5", "1", "UNAVAILABLE", "unloaded"),
                     ("lenet5", "2", "READY", index[1][3])]
    assert index[1][3].startswith("golden check passed on CPUExecutionProvider fp32")


@pytest.mark.skipif(importlib.util.find_spec("tritonclient") is None,
                    reason="tritonclient is not installed")
def test_explicit_load_and_unload_through_tritonclient(tmp_path: Path) -> None:
    """Must show 2: tritonclient's load_model / unload_model / get_model_repository_index; the
    requests queued when unload_model is called are all answered (by the version they were
    sent to) before it returns."""
    repo = tmp_path / "repo"
    art = make_artifact(repo / "lenet5" / "1", version="1", seed=0)
    x = np.random.default_rng(1).standard_normal((16, 1, 32, 32), dtype=np.float32)
    np.save(tmp_path / "x.npy", x)
    expected = reference(art, x)
    # Batches are held 3 s for company: the 16 requests are still queued when the unload comes.
    with CliServer("--repository", str(repo), "--model-control-mode", "explicit",
                   "--max-queue-delay-ms", "3000") as server:
        done = subprocess.run([sys.executable, str(PROBE), server.address, "lenet5",
                               str(tmp_path / "x.npy"), "control"], capture_output=True,
                              text=True, timeout=120)
        assert done.returncode == 0, done.stderr
    got = json.loads(done.stdout)
    assert got["index_before"] == {"models": [{"name": "lenet5", "state": "UNAVAILABLE",
                                               "reason": "not loaded"}]}
    assert (got["ready_before"], got["ready_loaded"], got["server_ready_loaded"]) == (
        False, True, True)
    assert got["answered_before_unload"] == 0
    answers = got["answers"]
    assert len(answers) == 16 and all("error" not in a for a in answers), answers
    assert all(a["after_unload_began_s"] < got["unload_s"] + 0.5 for a in answers)
    assert got["unload_s"] < 2.5  # answered by the drain, not by the 3 s queue delay
    import base64

    for a in answers:
        i = int(a["id"][1:])
        logits = np.frombuffer(base64.b64decode(a["logits"]), dtype="<f4")
        np.testing.assert_allclose(logits, expected[i], rtol=1e-5, atol=1e-5)
    assert got["ready_unloaded"] is False
    assert got["index_unloaded"]["models"] == [
        {"name": "lenet5", "version": "1", "state": "UNAVAILABLE", "reason": "unloaded"}]
    assert got["errors"]["infer_unloaded"] == [
        "StatusCode.UNAVAILABLE", "model 'lenet5' is not ready: version 1 UNAVAILABLE: unloaded"]
    assert got["errors"]["load_unknown"][0] == "StatusCode.NOT_FOUND"
    assert got["errors"]["load_unknown"][1].startswith(
        "no model 'no-such-model' in the repository")
    assert got["ready_reloaded"] is True
    assert got["index_reloaded"]["models"][0]["state"] == "READY"


@pytest.mark.parametrize("tamper", ["weights", "preprocessing"])
def test_an_artifact_failing_its_golden_check_is_never_ready(tmp_path: Path,
                                                             tamper: str) -> None:
    """Must show 3: other weights whose manifest sha256 was rewritten to match, or a changed
    preprocessing spec: the files pass their checks, the golden check does not, and the model
    is never reported ready; ModelReady, the index and the log say why."""
    repo = tmp_path / "repo"
    bad = make_artifact(repo / "lenet5" / "1", version="1", seed=0)
    if tamper == "weights":
        other = make_artifact(tmp_path / "other", version="1", seed=1)
        shutil.copyfile(other / "model.onnx", bad / "model.onnx")
        rewrite_listed(bad, "model.onnx")
    else:
        manifest = json.loads((bad / "manifest.json").read_text())
        manifest["image"]["mean"] = [0.5]
        (bad / "manifest.json").write_text(json.dumps(manifest))
    with CliServer("--repository", str(repo), "--model-control-mode", "poll",
                   "--repository-poll-secs", "0.2") as server:
        time.sleep(1.0)  # several polls: a failed version is not retried on the same files
        ready, reason = model_ready(server.address, "lenet5")
        index = index_of(server.address)
        from cnnctl.clients.client import Client

        with Client(server.address, retries=0) as client:
            server_ready = client.server_ready()
        log = server.output()
    assert not ready and not server_ready
    assert reason.startswith("version 1 UNAVAILABLE: golden check failed on "
                             "CPUExecutionProvider fp32: max abs logit error")
    assert index == [("lenet5", "1", "UNAVAILABLE", reason.split("UNAVAILABLE: ", 1)[1])]
    assert log.count("model lenet5 version 1 failed to load: golden check failed") == 1
