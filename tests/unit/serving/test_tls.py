"""--tls-cert/--tls-key: a TLS client that trusts the certificate gets answers; a plaintext one
does not. --tls-client-ca: only clients with a certificate the CA signed get answers."""

from __future__ import annotations

import asyncio
import dataclasses
import shutil
import subprocess
from pathlib import Path

import grpc
import pytest

from cnnctl.clients.client import Client
from cnnctl.clients.errors import Unavailable
from cnnctl.errors import UsageError
from cnnctl.protos import grpc_service_pb2 as pb
from cnnctl.serving.config import ServerConfig
from cnnctl.serving.server import ServerThread, create_server
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


# Just what the certificates need, so that the system's openssl.cnf cannot add or refuse any.
OPENSSL_CNF = """\
[req]
distinguished_name = dn
[dn]
[ca]
basicConstraints = critical,CA:TRUE
keyUsage = critical,keyCertSign
[server]
subjectAltName = DNS:localhost
[client]
extendedKeyUsage = clientAuth
"""


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A directory: a CA (ca.pem/.key); a server (server.pem/.key, for localhost) and a client
    certificate (client.pem/.key) it signed; a client certificate it did not (rogue.pem/.key)."""
    if shutil.which("openssl") is None:
        pytest.skip("openssl is not installed")
    d = tmp_path_factory.mktemp("pki")
    (d / "openssl.cnf").write_text(OPENSSL_CNF)

    def openssl(*args: str) -> None:
        subprocess.run(["openssl", *args], check=True, capture_output=True, timeout=60, cwd=d)

    def self_signed(name: str, cn: str, extensions: str) -> None:
        openssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1", "-subj",
                f"/CN={cn}", "-config", "openssl.cnf", "-extensions", extensions,
                "-keyout", f"{name}.key", "-out", f"{name}.pem")

    def signed(name: str, cn: str, extensions: str) -> None:
        openssl("req", "-new", "-newkey", "rsa:2048", "-nodes", "-subj", f"/CN={cn}",
                "-config", "openssl.cnf", "-keyout", f"{name}.key", "-out", f"{name}.csr")
        openssl("x509", "-req", "-in", f"{name}.csr", "-CA", "ca.pem", "-CAkey", "ca.key",
                "-CAcreateserial", "-days", "1", "-extfile", "openssl.cnf", "-extensions",
                extensions, "-out", f"{name}.pem")

    self_signed("ca", "test-ca", "ca")
    signed("server", "localhost", "server")
    signed("client", "client", "client")
    self_signed("rogue", "rogue", "client")
    return d


def test_client_certificates(artifacts: dict[str, Path], pki: Path) -> None:
    """--tls-client-ca: a client with a certificate the CA signed is answered, one without a
    certificate or with another is refused at the handshake; our own Client can be the first."""
    cfg = dataclasses.replace(config_for(artifacts["lenet5"]), tls_cert=str(pki / "server.pem"),
                              tls_key=str(pki / "server.key"), tls_client_ca=str(pki / "ca.pem"))
    with ServerThread(cfg) as server:
        address = f"127.0.0.1:{server.port}"
        ca = (pki / "ca.pem").read_bytes()

        def live(key: bytes | None = None, chain: bytes | None = None) -> bool:
            creds = grpc.ssl_channel_credentials(root_certificates=ca, private_key=key,
                                                 certificate_chain=chain)
            with grpc.secure_channel(address, creds, options=[
                    ("grpc.ssl_target_name_override", "localhost")]) as ch:
                return bool(stub(ch).ServerLive(pb.ServerLiveRequest(), timeout=10).live)

        assert live((pki / "client.key").read_bytes(), (pki / "client.pem").read_bytes())
        rogue = ((pki / "rogue.key").read_bytes(), (pki / "rogue.pem").read_bytes())
        for key, chain in [(None, None), rogue]:  # no certificate; one the CA did not sign
            with pytest.raises(grpc.RpcError) as info:
                live(key, chain)
            assert info.value.code() == grpc.StatusCode.UNAVAILABLE  # type: ignore[attr-defined]
        options = dict(root_certificates=pki / "ca.pem", server_name="localhost", retries=0,
                       timeout=10)
        with Client(address, certificate_chain=pki / "client.pem",
                    private_key=pki / "client.key", **options) as client:
            assert client.server_live()
        with Client(address, **options) as client, pytest.raises(Unavailable):
            client.server_live()


def test_client_certificate_settings_that_cannot_work_are_refused(pki: Path) -> None:
    with pytest.raises(UsageError) as info:
        ServerConfig(tls_client_ca=str(pki / "ca.pem"))
    assert str(info.value) == ("--tls-client-ca needs --tls-cert and --tls-key: client "
                               "certificates are checked only over TLS")
    with pytest.raises(UsageError) as info:
        Client("127.0.0.1:1", certificate_chain=pki / "client.pem")
    assert str(info.value) == ("a client certificate and its private key go together; give "
                               "both or neither")


def test_the_rest_port_is_https_with_the_same_certificate(artifacts: dict[str, Path],
                                                          cert: tuple[Path, Path]) -> None:
    import http.client
    import ssl

    cfg = dataclasses.replace(config_for(artifacts["lenet5"]), tls_cert=str(cert[0]),
                              tls_key=str(cert[1]))
    with ServerThread(cfg) as running:
        port = running.server.http_port
        context = ssl.create_default_context(cafile=str(cert[0]))
        context.check_hostname = False  # the certificate names localhost; we dial 127.0.0.1
        conn = http.client.HTTPSConnection("127.0.0.1", port, context=context, timeout=10)
        conn.request("GET", "/v2/health/ready")
        assert conn.getresponse().status == 200
        conn.close()
        plain = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
        with pytest.raises((http.client.HTTPException, ConnectionError)):
            plain.request("GET", "/v2/health/ready")
            plain.getresponse()
        plain.close()
