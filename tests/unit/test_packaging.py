"""What the package declares is what its code runs on: the committed stubs are protoc's output
for the pinned grpcio-tools, and they run on the oldest protobuf and grpcio pyproject.toml allows
(installed in a venv of their own: protos/generate.py's tools venv)."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

from cnnctl.protos import generate as gen

ROOT = Path(__file__).resolve().parents[2]


def _requirements() -> dict[str, str]:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    found = {}
    for req in project["dependencies"]:
        name = re.match(r"[A-Za-z0-9_.-]+", req).group(0).lower()
        found[name] = req
    return found


def _lower_bound(requirement: str) -> str:
    match = re.search(r">=\s*([0-9.]+)", requirement)
    assert match, f"{requirement!r} declares no lower bound"
    return match.group(1)


def test_declared_lower_bounds_are_what_the_stubs_were_generated_for() -> None:
    reqs = _requirements()
    stub = (gen.PROTOS_DIR / "grpc_service_pb2.py").read_text()
    gencode = re.search(r"^# Protobuf Python Version: (\S+)$", stub, re.MULTILINE).group(1)
    grpc_stub = (gen.PROTOS_DIR / "grpc_service_pb2_grpc.py").read_text()
    generated = re.search(r"^GRPC_GENERATED_VERSION = '(\S+)'$", grpc_stub, re.MULTILINE).group(1)
    # protobuf runs gencode of its own version or older; grpc stubs need grpcio >= their tools.
    assert _lower_bound(reqs["protobuf"]) == gencode
    assert generated == gen.GRPCIO_TOOLS
    for name in ("grpcio", "grpcio-health-checking", "grpcio-reflection"):
        assert _lower_bound(reqs[name]) == gen.GRPCIO_TOOLS, name
    assert f"protobuf=={gencode}" in gen.LOWEST
    # And no stub was written for a newer runtime (protobuf >= 5.28 adds a version check).
    assert "ValidateProtobufRuntimeVersion" not in stub


def test_stubs_register_in_cnnctls_own_pool() -> None:
    from google.protobuf import descriptor_pool

    from cnnctl import protos
    from cnnctl.protos import grpc_service_pb2 as pb

    assert pb.DESCRIPTOR.pool is protos.POOL
    assert pb.ModelInferRequest.DESCRIPTOR.file.pool is protos.POOL
    try:  # present only if something (tritonclient) registered Triton's own stubs
        theirs = descriptor_pool.Default().FindMessageTypeByName("inference.ModelInferRequest")
    except KeyError:
        return
    assert theirs is not pb.ModelInferRequest.DESCRIPTOR


@pytest.fixture(scope="module")
def tools_python() -> Path:
    try:
        return gen.tools_python()
    except subprocess.CalledProcessError as exc:  # no package index reachable
        if os.environ.get("CI") == "true":
            raise
        pytest.skip(f"cannot install grpcio-tools {gen.GRPCIO_TOOLS} with pip ({exc})")


def test_committed_stubs_are_protocs_output(tools_python: Path, tmp_path: Path) -> None:
    subprocess.run([str(tools_python), str(gen.PROTOS_DIR / "generate.py"), "--out",
                    str(tmp_path)], check=True, capture_output=True, timeout=120)
    stale = [name for name in gen.generated_names()
             if (tmp_path / name).read_text() != (gen.PROTOS_DIR / name).read_text()]
    assert stale == [], f"stale stubs {stale}: run `python -m cnnctl.protos.generate`"


SMOKE = r'''
import asyncio, sys
import grpc, google.protobuf
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from cnnctl.protos import grpc_service_pb2 as pb, grpc_service_pb2_grpc as pb_grpc

class Servicer(pb_grpc.GRPCInferenceServiceServicer):
    async def ServerLive(self, request, context):
        return pb.ServerLiveResponse(live=True)
    async def ModelInfer(self, request, context):
        out = pb.ModelInferResponse(model_name=request.model_name, id=request.id)
        out.outputs.add(name="logits", datatype="FP32", shape=request.inputs[0].shape)
        out.raw_output_contents.extend(request.raw_input_contents)
        return out

async def main():
    server = grpc.aio.server()
    pb_grpc.add_GRPCInferenceServiceServicer_to_server(Servicer(), server)
    health_pb2_grpc.add_HealthServicer_to_server(health.aio.HealthServicer(), server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
        stub = pb_grpc.GRPCInferenceServiceStub(channel)
        assert (await stub.ServerLive(pb.ServerLiveRequest())).live
        request = pb.ModelInferRequest(model_name="m", id="7")
        request.inputs.add(name="input", datatype="FP32", shape=[1, 4])
        request.raw_input_contents.append(bytes(range(16)))
        reply = await stub.ModelInfer(request)
        assert (reply.id, list(reply.outputs[0].shape)) == ("7", [1, 4])
        assert reply.raw_output_contents[0] == bytes(range(16))
        status = await health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest())
        assert status.status == health_pb2.HealthCheckResponse.SERVING
    await server.stop(None)
    print(google.protobuf.__version__, grpc.__version__)

asyncio.run(main())
'''


def test_stubs_run_on_the_oldest_declared_runtimes(tools_python: Path, tmp_path: Path) -> None:
    # cnnctl.protos alone, importable without installing cnnctl into the tools venv.
    (tmp_path / "cnnctl").mkdir()
    (tmp_path / "cnnctl" / "__init__.py").write_text("")
    (tmp_path / "cnnctl" / "protos").symlink_to(gen.PROTOS_DIR)
    done = subprocess.run([str(tools_python), "-c", SMOKE], capture_output=True, text=True,
                          timeout=120, cwd=tmp_path,
                          env={**os.environ, "PYTHONPATH": str(tmp_path)})
    assert done.returncode == 0, done.stderr
    protobuf, grpcio = done.stdout.split()
    reqs = _requirements()
    assert (protobuf, grpcio) == (_lower_bound(reqs["protobuf"]), _lower_bound(reqs["grpcio"]))
