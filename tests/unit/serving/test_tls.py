"""--tls-cert/--tls-key: a TLS client that trusts the certificate gets answers; a plaintext one
does not."""

from __future__ import annotations

import asyncio
import dataclasses
import shutil
import subprocess
from pathlib import Path

import grpc
import pytest

from cnnctl.protos import grpc_service_pb2 as pb
from cnnctl.serving.server import create_server
from tests.support.serving import config_for, stub


@pytest.fixture(scope="module")
def cert(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    if shutil.which("openssl") is None:
        pytest.skip("openssl is not installed")
    d = tmp_path_factory.mktemp("tls")
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1",
                    "-subj", "/CN=localhost", "-addext", "subjectAltName=DNS:localhost",
                    "-keyout", str(d / "key.pem"), "-out", str(d / "cert.pem")],
                   check=True, capture_output=True, timeout=60)
    return d / "cert.pem", d / "key.pem"


def test_tls(artifacts: dict[str, Path], cert: tuple[Path, Path]) -> None:
    async def main() -> None:
        cfg = dataclasses.replace(config_for(artifacts["lenet5"]), tls_cert=str(cert[0]),
                                  tls_key=str(cert[1]))
        server, port = await create_server(cfg)
        await server.start()
        try:
            creds = grpc.ssl_channel_credentials(root_certificates=cert[0].read_bytes())
            async with grpc.aio.secure_channel(
                    f"127.0.0.1:{port}", creds,
                    options=[("grpc.ssl_target_name_override", "localhost")]) as ch:
                assert (await stub(ch).ServerLive(pb.ServerLiveRequest(), timeout=10)).live
            async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as ch:
                with pytest.raises(grpc.aio.AioRpcError) as info:
                    await stub(ch).ServerLive(pb.ServerLiveRequest(), timeout=5)
                assert info.value.code() == grpc.StatusCode.UNAVAILABLE
        finally:
            await server.stop(grace=1, linger=0)

    asyncio.run(main())
