"""The protos are wire-compatible with Triton's: every message, field, enum and RPC we declare has
the same name, number and type as in tritonclient's bundled descriptors. (That the committed stubs
are protoc's output: tests/unit/test_packaging.py.)"""

from __future__ import annotations

import importlib.util

import pytest
from google.protobuf import descriptor_pb2

from cnnctl.protos import grpc_service_pb2, model_config_pb2


@pytest.fixture(scope="module")
def triton_files() -> dict[str, descriptor_pb2.FileDescriptorProto]:
    if importlib.util.find_spec("tritonclient") is None:
        pytest.skip("tritonclient is not installed")
    # In this process: our stubs live in cnnctl's own descriptor pool, so tritonclient's, which
    # define the same full names in protobuf's default pool, load beside them.
    from tritonclient.grpc import model_config_pb2 as triton_config
    from tritonclient.grpc import service_pb2 as triton_service

    files = {}
    for module in (triton_service, triton_config):
        fdp = descriptor_pb2.FileDescriptorProto()
        module.DESCRIPTOR.CopyToProto(fdp)
        files[fdp.name] = fdp
    return files


def _ours(module: object) -> descriptor_pb2.FileDescriptorProto:
    fdp = descriptor_pb2.FileDescriptorProto()
    module.DESCRIPTOR.CopyToProto(fdp)  # type: ignore[attr-defined]
    return fdp


def _short(type_name: str) -> str:
    return type_name.removeprefix(".inference.")


def _compare_enum(ours: descriptor_pb2.EnumDescriptorProto,
                  theirs: descriptor_pb2.EnumDescriptorProto, where: str) -> list[str]:
    values = {v.name: v.number for v in theirs.value}
    return [f"{where}.{v.name}: ours={v.number} triton={values.get(v.name)}"
            for v in ours.value if values.get(v.name) != v.number]


def _compare_message(ours: descriptor_pb2.DescriptorProto, theirs: descriptor_pb2.DescriptorProto,
                     where: str) -> list[str]:
    problems = []
    fields = {f.name: f for f in theirs.field}
    for f in ours.field:
        t = fields.get(f.name)
        if t is None:
            problems.append(f"{where}.{f.name}: not in Triton's message")
            continue
        mine = (f.number, f.type, f.label, _short(f.type_name),
                ours.oneof_decl[f.oneof_index].name if f.HasField("oneof_index") else None)
        triton = (t.number, t.type, t.label, _short(t.type_name),
                  theirs.oneof_decl[t.oneof_index].name if t.HasField("oneof_index") else None)
        if mine != triton:
            problems.append(f"{where}.{f.name}: ours={mine} triton={triton}")
    nested = {n.name: n for n in theirs.nested_type}
    for n in ours.nested_type:
        if n.name not in nested:
            problems.append(f"{where}.{n.name}: not in Triton's message")
        else:
            problems += _compare_message(n, nested[n.name], f"{where}.{n.name}")
    enums = {e.name: e for e in theirs.enum_type}
    for e in ours.enum_type:
        problems += (_compare_enum(e, enums[e.name], f"{where}.{e.name}") if e.name in enums
                     else [f"{where}.{e.name}: not in Triton's message"])
    return problems


@pytest.mark.parametrize("module,triton_name", [(grpc_service_pb2, "grpc_service.proto"),
                                                (model_config_pb2, "model_config.proto")])
def test_messages_match_triton(module: object, triton_name: str,
                               triton_files: dict[str, descriptor_pb2.FileDescriptorProto]) -> None:
    ours, theirs = _ours(module), triton_files[triton_name]
    assert ours.package == theirs.package == "inference"
    messages = {m.name: m for m in theirs.message_type}
    problems = []
    for m in ours.message_type:
        if m.name not in messages:
            problems.append(f"{m.name}: not in Triton's {triton_name}")
        else:
            problems += _compare_message(m, messages[m.name], m.name)
    enums = {e.name: e for e in theirs.enum_type}
    for e in ours.enum_type:
        problems += _compare_enum(e, enums[e.name], e.name)
    assert problems == []
    assert len(ours.message_type) >= (20 if triton_name == "grpc_service.proto" else 9)


def test_service_matches_triton(triton_files: dict[str, descriptor_pb2.FileDescriptorProto]) -> None:
    ours = _ours(grpc_service_pb2).service[0]
    theirs = triton_files["grpc_service.proto"].service[0]
    assert ours.name == theirs.name == "GRPCInferenceService"
    methods = {m.name: m for m in theirs.method}
    for m in ours.method:
        t = methods[m.name]
        assert (m.input_type, m.output_type, m.client_streaming, m.server_streaming) == (
            t.input_type, t.output_type, t.client_streaming, t.server_streaming), m.name
    assert {m.name for m in ours.method} >= {
        "ServerLive", "ServerReady", "ServerMetadata", "ModelReady", "ModelMetadata", "ModelConfig",
        "ModelInfer", "ModelStreamInfer", "ModelStatistics", "RepositoryIndex"}


def test_a_mismatch_would_be_reported(triton_files: dict[str, descriptor_pb2.FileDescriptorProto]) -> None:
    theirs = {m.name: m for m in triton_files["grpc_service.proto"].message_type}
    broken = descriptor_pb2.DescriptorProto()
    broken.CopyFrom(theirs["ModelInferRequest"])
    broken.field[-1].number = 99
    assert _compare_message(broken, theirs["ModelInferRequest"], "ModelInferRequest") == [
        "ModelInferRequest.raw_input_contents: ours=(99, 12, 3, '', None) "
        "triton=(7, 12, 3, '', None)"]
