"""Model control in serving/repository.py: version policies, loads that fail and leave what is
served alone, unloads that drain, readiness and health that follow, and the refusals."""

from __future__ import annotations

import asyncio
import dataclasses
import json
import logging
import shutil
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from cnnctl.errors import ArtifactError, UsageError
from cnnctl.protos import grpc_service_pb2 as pb
from cnnctl.serving.repository import VersionPolicy, read_policy, scan_repository
from tests.support.serving import (
    config_for, infer_request, logits_of, make_artifact, rewrite_listed, running, stub,
)


def run(coro: Any) -> Any:
    return asyncio.run(coro)


async def index(s: Any) -> list[tuple[str, str, str, str]]:
    resp = await s.RepositoryIndex(pb.RepositoryIndexRequest())
    return [(m.name, m.version, m.state, m.reason) for m in resp.models]


def copy_version(src: Path, repo: Path, version: str) -> Path:
    return Path(shutil.copytree(src, repo / "lenet5" / version))


@pytest.fixture(scope="module")
def versions(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("versions")
    return {v: make_artifact(root / v, version=v, seed=int(v)) for v in ("1", "2", "3")}


@pytest.mark.parametrize("text, policy, chosen", [
    (None, VersionPolicy("latest", 1), ["3"]),
    ("version_policy: { latest: { num_versions: 2 } }", VersionPolicy("latest", 2), ["2", "3"]),
    ("version_policy: { all: {} }", VersionPolicy("all"), ["1", "2", "3"]),
    ('name: "lenet5"\nplatform: "onnxruntime_onnx"\n'
     "version_policy: { specific: { versions: [1, 3] } }",
     VersionPolicy("specific", versions=("1", "3")), ["1", "3"]),
])
def test_version_policy_from_config_pbtxt(tmp_path: Path, text: str | None,
                                          policy: VersionPolicy, chosen: list[str]) -> None:
    if text is not None:
        (tmp_path / "config.pbtxt").write_text(text)
    assert read_policy(tmp_path) == policy
    assert policy.select(["3", "1", "2"]) == chosen


def test_a_bad_version_policy_names_the_file(tmp_path: Path) -> None:
    (tmp_path / "config.pbtxt").write_text("version_policy: { latest: { num_versions: 0 } }")
    with pytest.raises(ArtifactError, match="num_versions 0; allowed: 1 or more"):
        read_policy(tmp_path)
    (tmp_path / "config.pbtxt").write_text("version_policy: {{")
    with pytest.raises(ArtifactError, match="config.pbtxt: not a model config"):
        read_policy(tmp_path)


def test_scan_finds_versions_and_skips_work_in_progress(versions: dict[str, Path],
                                                        tmp_path: Path) -> None:
    for v in ("1", "2"):
        copy_version(versions[v], tmp_path, v)
    shutil.copytree(versions["3"], tmp_path / "lenet5" / ".3.tmp-abc")  # export at work
    (tmp_path / "lenet5" / "config.pbtxt").write_text("version_policy: { all: {} }")
    model = scan_repository(tmp_path)["lenet5"]
    assert [v.version for v in model.versions] == ["1", "2"]
    assert [v.version for v in model.wanted()] == ["1", "2"]


def test_explicit_load_unload_and_the_index(versions: dict[str, Path], tmp_path: Path) -> None:
    repo = tmp_path / "repo"
    copy_version(versions["1"], repo, "1")

    async def main() -> None:
        config = config_for(repository=str(repo), model_control_mode="explicit")
        async with running(config) as (server, ch):
            s = stub(ch)
            health = health_pb2_grpc.HealthStub(ch)
            assert await index(s) == [("lenet5", "", "UNAVAILABLE", "not loaded")]
            assert (await s.ServerReady(pb.ServerReadyRequest())).ready  # nothing asked for yet
            await s.RepositoryModelLoad(pb.RepositoryModelLoadRequest(model_name="lenet5"))
            entries = await index(s)
            assert [e[:3] for e in entries] == [("lenet5", "1", "READY")]
            assert entries[0][3].startswith("golden check passed on CPUExecutionProvider fp32")
            assert (await s.ModelReady(pb.ModelReadyRequest(name="lenet5"))).ready
            got = await health.Check(health_pb2.HealthCheckRequest(service="lenet5"))
            assert got.status == health_pb2.HealthCheckResponse.SERVING
            # A second load of unchanged files changes nothing.
            model = server.repository.get("lenet5")
            await s.RepositoryModelLoad(pb.RepositoryModelLoadRequest(model_name="lenet5"))
            assert server.repository.get("lenet5") is model
            await s.RepositoryModelUnload(pb.RepositoryModelUnloadRequest(model_name="lenet5"))
            assert await index(s) == [("lenet5", "1", "UNAVAILABLE", "unloaded")]
            with pytest.raises(grpc.aio.AioRpcError) as info:
                await s.ModelInfer(infer_request(np.zeros((1, 1, 32, 32), np.float32)))
            assert (info.value.code(), info.value.details()) == (
                grpc.StatusCode.UNAVAILABLE,
                "model 'lenet5' is not ready: version 1 UNAVAILABLE: unloaded")
            await asyncio.sleep(0.05)  # health follows in a task of its own
            got = await health.Check(health_pb2.HealthCheckRequest(service="lenet5"))
            assert got.status == health_pb2.HealthCheckResponse.NOT_SERVING
            assert (await s.ServerReady(pb.ServerReadyRequest())).ready  # unloaded on purpose

    run(main())


def test_a_failed_load_leaves_the_served_version_alone(versions: dict[str, Path],
                                                       tmp_path: Path, reference: Any) -> None:
    """Version 2's weights are swapped (sha256 rewritten): its golden check fails, version 1
    goes on serving; once fixed, version 2 loads and version 1 is unloaded."""
    repo = tmp_path / "repo"
    copy_version(versions["1"], repo, "1")
    bad = copy_version(versions["2"], repo, "2")
    shutil.copyfile(versions["3"] / "model.onnx", bad / "model.onnx")
    rewrite_listed(bad, "model.onnx")
    x = np.random.default_rng(0).standard_normal((2, 1, 32, 32), dtype=np.float32)

    async def main() -> None:
        config = config_for(repository=str(repo), model_control_mode="explicit",
                            load_models=("lenet5",))
        async with running(config) as (_, ch):
            s = stub(ch)
            entries = await index(s)
            assert [e[:3] for e in entries] == [("lenet5", "2", "UNAVAILABLE")]
            assert entries[0][3].startswith("golden check failed on CPUExecutionProvider fp32: "
                                            "max abs logit error")
            assert not (await s.ServerReady(pb.ServerReadyRequest())).ready
            with pytest.raises(grpc.aio.AioRpcError) as info:
                await s.RepositoryModelLoad(pb.RepositoryModelLoadRequest(model_name="lenet5"))
            assert info.value.code() == grpc.StatusCode.FAILED_PRECONDITION
            assert "golden check failed" in info.value.details()
            # Fixed: the right file back (and its sha256).
            shutil.copyfile(versions["2"] / "model.onnx", bad / "model.onnx")
            rewrite_listed(bad, "model.onnx")
            await s.RepositoryModelLoad(pb.RepositoryModelLoadRequest(model_name="lenet5"))
            assert [e[:3] for e in await index(s)] == [("lenet5", "2", "READY")]
            resp = await s.ModelInfer(infer_request(x))
            assert resp.model_version == "2"
            assert (await s.ServerReady(pb.ServerReadyRequest())).ready

    run(main())


def test_a_new_model_failing_its_load_leaves_the_server_ready(versions: dict[str, Path],
                                                             tmp_path: Path) -> None:
    """A model loaded after start-up that fails its golden check is not ready itself, but the
    server stays ready (health "" too): one bad upload must not take every replica out."""
    repo = tmp_path / "repo"
    bad = copy_version(versions["2"], repo, "2")
    shutil.copyfile(versions["3"] / "model.onnx", bad / "model.onnx")
    rewrite_listed(bad, "model.onnx")

    async def main() -> None:
        config = config_for(repository=str(repo), model_control_mode="explicit")
        async with running(config) as (_, ch):
            s = stub(ch)
            with pytest.raises(grpc.aio.AioRpcError) as info:
                await s.RepositoryModelLoad(pb.RepositoryModelLoadRequest(model_name="lenet5"))
            assert "golden check failed" in info.value.details()
            assert not (await s.ModelReady(pb.ModelReadyRequest(name="lenet5"))).ready
            assert (await s.ServerReady(pb.ServerReadyRequest())).ready
            health = await health_pb2_grpc.HealthStub(ch).Check(
                health_pb2.HealthCheckRequest(service=""))
            assert health.status == health_pb2.HealthCheckResponse.SERVING

    run(main())


def test_poll_keeps_serving_when_a_new_version_fails(versions: dict[str, Path], tmp_path: Path,
                                                     caplog: pytest.LogCaptureFixture) -> None:
    repo = tmp_path / "repo"
    copy_version(versions["1"], repo, "1")
    x = np.random.default_rng(0).standard_normal((1, 1, 32, 32), dtype=np.float32)

    async def main() -> None:
        config = config_for(repository=str(repo), model_control_mode="poll",
                            repository_poll_secs=0.05)
        async with running(config) as (server, ch):
            s = stub(ch)
            bad = copy_version(versions["2"], repo, "2")
            manifest = json.loads((bad / "manifest.json").read_text())
            manifest["image"]["std"] = [1.0]  # a wrong preprocessing spec
            (bad / "manifest.json").write_text(json.dumps(manifest))
            for _ in range(100):
                await asyncio.sleep(0.05)
                if ("lenet5", "2", "UNAVAILABLE") in {e[:3] for e in await index(s)}:
                    break  # (LOADING first)
            entries = {e[:2]: e[2:] for e in await index(s)}
            assert entries["lenet5", "1"][0] == "READY"
            assert entries["lenet5", "2"][0] == "UNAVAILABLE"
            assert entries["lenet5", "2"][1].startswith("golden check failed")
            await asyncio.sleep(0.3)  # more polls: the same files are not retried, v1 stays
            assert [e[2] for e in await index(s)] == ["READY", "UNAVAILABLE"]
            assert (await s.ModelInfer(infer_request(x))).model_version == "1"
            assert (await s.ServerReady(pb.ServerReadyRequest())).ready  # v1 serves
            # The directory goes: the failure goes with it, v1 stays.
            shutil.rmtree(bad)
            await asyncio.sleep(0.3)
            assert server.repository.get("lenet5").version == "1"

    with caplog.at_level(logging.INFO, logger="cnnctl.serving.repository"):
        run(main())
    assert caplog.text.count("model lenet5 version 2 failed to load") == 1  # not retried
    assert "repository poll failed" not in caplog.text


def test_unload_answers_queued_requests(versions: dict[str, Path], tmp_path: Path,
                                        reference: Any, artifacts: dict[str, Path]) -> None:
    repo = tmp_path / "repo"
    copy_version(artifacts["lenet5"], repo, "1")
    x = np.random.default_rng(0).standard_normal((8, 1, 32, 32), dtype=np.float32)

    async def main() -> None:
        config = config_for(repository=str(repo), model_control_mode="explicit",
                            load_models=("lenet5",), max_queue_delay_ms=5000)
        async with running(config) as (server, ch):
            s = stub(ch)
            calls = [asyncio.ensure_future(s.ModelInfer(infer_request(x[i:i + 1])))
                     for i in range(8)]
            model = server.repository.get("lenet5")
            for _ in range(100):
                await asyncio.sleep(0.01)
                if model.batcher.depth == 8:
                    break
            assert model.batcher.depth == 8  # held for the 5 s queue delay
            loop = asyncio.get_running_loop()
            start = loop.time()
            await s.RepositoryModelUnload(pb.RepositoryModelUnloadRequest(model_name="lenet5"))
            assert loop.time() - start < 2.0
            assert all(c.done() for c in calls)
            got = np.concatenate([logits_of(await c) for c in calls])
            np.testing.assert_allclose(got, reference(x), rtol=1e-5, atol=1e-5)

    run(main())


def test_no_golden_set_loads_unverified_and_says_so(tmp_path: Path,
                                                    caplog: pytest.LogCaptureFixture) -> None:
    old = make_artifact(tmp_path / "old", golden=False)

    async def main() -> None:
        async with running(config_for(old)) as (_, ch):
            s = stub(ch)
            assert (await s.ModelReady(pb.ModelReadyRequest(name="lenet5"))).ready
            entries = await index(s)
            assert entries[0][3].startswith("the artifact has no golden set")

    with caplog.at_level(logging.WARNING, logger="cnnctl.serving.repository"):
        run(main())
    assert "readiness unverified" in caplog.text


def test_control_requests_are_refused_outside_explicit_mode(artifacts: dict[str, Path]) -> None:
    async def main() -> None:
        async with running(config_for(artifacts["lenet5"])) as (_, ch):
            s = stub(ch)
            with pytest.raises(grpc.aio.AioRpcError) as info:
                await s.RepositoryModelUnload(pb.RepositoryModelUnloadRequest(model_name="lenet5"))
            assert (info.value.code(), info.value.details()) == (
                grpc.StatusCode.FAILED_PRECONDITION,
                "model unload requests need --model-control-mode explicit; this server runs "
                "with --model-control-mode none")
            req = pb.RepositoryModelLoadRequest(model_name="lenet5")
            req.parameters["config"].string_param = '{"max_batch_size": 1}'
            with pytest.raises(grpc.aio.AioRpcError) as info:
                await s.RepositoryModelLoad(req)
            assert (info.value.code(), info.value.details()) == (
                grpc.StatusCode.INVALID_ARGUMENT,
                "parameters ['config'] are not supported; cnnctl loads models only from its "
                "repository (no config override, no uploaded files)")
            assert (await s.ModelReady(pb.ModelReadyRequest(name="lenet5"))).ready

    run(main())


def test_flag_combinations_are_checked() -> None:
    with pytest.raises(UsageError, match="poll needs --repository"):
        config_for(model_control_mode="poll")
    with pytest.raises(UsageError, match="--load-model goes with"):
        config_for(load_models=("a",))
    with pytest.raises(UsageError, match="'sometimes' is not one of none, explicit, poll"):
        config_for(model_control_mode="sometimes")


def test_poll_does_not_reload_unchanged_files(artifacts: dict[str, Path], tmp_path: Path) -> None:
    """DIR/NAME/manifest.json (one artifact, its manifest's version) and DIR/NAME/1/ alike."""
    repo = tmp_path / "repo"
    shutil.copytree(artifacts["lenet5"], repo / "flat")
    manifest = json.loads((repo / "flat" / "manifest.json").read_text())
    manifest["name"] = "flat"
    (repo / "flat" / "manifest.json").write_text(json.dumps(manifest))
    copy_version(artifacts["lenet5"], repo, "1")

    async def main() -> None:
        config = config_for(repository=str(repo), model_control_mode="poll",
                            repository_poll_secs=0.05)
        async with running(config) as (server, ch):
            before = {m.name: m for m in server.repository}
            await asyncio.sleep(0.4)
            assert {m.name: m for m in server.repository} == before
            assert [e[:3] for e in await index(stub(ch))] == [
                ("flat", "1", "READY"), ("lenet5", "1", "READY")]

    run(main())


def test_a_policy_change_applies_on_the_next_poll(versions: dict[str, Path],
                                                  tmp_path: Path) -> None:
    """config.pbtxt rewritten: latest 1 → all → specific [7] (none present: the model goes)."""
    repo = tmp_path / "repo"
    for v in ("1", "2"):
        copy_version(versions[v], repo, v)

    async def main() -> None:
        config = config_for(repository=str(repo), model_control_mode="poll",
                            repository_poll_secs=0.05)
        async with running(config) as (server, ch):
            s = stub(ch)
            assert [m.version for m in server.repository] == ["2"]
            (repo / "lenet5" / "config.pbtxt").write_text("version_policy: { all: {} }")
            for _ in range(100):
                await asyncio.sleep(0.05)
                if [m.version for m in server.repository] == ["1", "2"]:
                    break
            assert [m.version for m in server.repository] == ["1", "2"]
            (repo / "lenet5" / "config.pbtxt").write_text(
                "version_policy: { specific: { versions: [7] } }")
            for _ in range(100):
                await asyncio.sleep(0.05)
                if not list(server.repository):
                    break
            assert [e[:3] for e in await index(s)] == [("lenet5", "1", "UNAVAILABLE"),
                                                       ("lenet5", "2", "UNAVAILABLE")]

    run(main())


def test_poll_logs_a_bad_directory_once_and_keeps_serving(
        artifacts: dict[str, Path], tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    repo = tmp_path / "repo"
    copy_version(artifacts["lenet5"], repo, "1")

    async def main() -> None:
        config = config_for(repository=str(repo), model_control_mode="poll",
                            repository_poll_secs=0.05)
        async with running(config) as (server, ch):
            shutil.copytree(artifacts["lenet5"], repo / "bad name")
            await asyncio.sleep(0.4)
            assert (await stub(ch).ModelReady(pb.ModelReadyRequest(name="lenet5"))).ready

    with caplog.at_level(logging.INFO, logger="cnnctl.serving.repository"):
        run(main())
    assert caplog.text.count("directory 'bad name' is not allowed") == 1


def test_fp32_on_a_gpu_is_judged_by_its_own_tolerance(artifacts: dict[str, Path]) -> None:
    from cnnctl.export.golden import tolerance_for
    from cnnctl.export.manifest import load_manifest

    m = load_manifest(artifacts["lenet5"])
    assert tolerance_for(m, "fp32").atol == 1e-5
    assert tolerance_for(m, "fp32", gpu=True).atol == 1e-2  # the "fp32-cuda" entry
    m.golden["tolerance"].pop("fp32-cuda")  # an artifact without one: fp32's
    assert tolerance_for(m, "fp32", gpu=True).atol == 1e-5


@pytest.mark.cuda
def test_golden_check_passes_on_cuda(artifacts: dict[str, Path]) -> None:
    """The check on the CUDA provider, as the server runs it (skipped without a usable GPU)."""
    from cnnctl.export.manifest import load_manifest, read_file
    from cnnctl.serving import runtime

    m = load_manifest(artifacts["lenet5"])
    if not runtime.cuda_usable(read_file(artifacts["lenet5"], m.files[0])):
        pytest.skip("no usable CUDA GPU (onnxruntime's CUDA provider did not initialise)")

    async def main() -> None:
        config = dataclasses.replace(config_for(artifacts["lenet5"]), device="cuda")
        async with running(config) as (_, ch):
            entries = await index(stub(ch))
            assert entries[0][2] == "READY"
            assert entries[0][3].startswith("golden check passed on CUDAExecutionProvider")

    run(main())
