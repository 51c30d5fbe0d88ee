"""TCP with TLS and a bearer token, for runners whose jobs live in containers:
the client library gets through with the token; a call without it is
UNAUTHENTICATED; health checks stay open for probes."""

from __future__ import annotations

import socket
import subprocess

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from cowbranchd.client import Client
from cowbranchd.errors import Unauthenticated
from cowbranchd.v1 import branches_pb2, branches_pb2_grpc
from tests.fix_daemon import DaemonFactory, DaemonHandle


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture
def tls_daemon(daemon_factory: DaemonFactory) -> tuple[DaemonHandle, str]:
    """A daemon also serving TLS on a loopback port, requiring a token; with
    its TCP address."""
    d = daemon_factory(start=False)
    cert, key, token = d.workdir / "cert.pem", d.workdir / "key.pem", d.workdir / "token"
    subprocess.run(
        [
            "openssl",
            "req",
            "-x509",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-days",
            "1",
            "-keyout",
            str(key),
            "-out",
            str(cert),
            "-subj",
            "/CN=localhost",
            "-addext",
            "subjectAltName=DNS:localhost,IP:127.0.0.1",
        ],
        check=True,
        capture_output=True,
    )
    token.write_text("s3cret-token\n")
    port = free_port()
    d.sections = {
        "daemon": (
            f'tcp_address = "127.0.0.1:{port}"\ntls_cert = "{cert}"\ntls_key = "{key}"\n'
            f'token_file = "{token}"'
        )
    }
    d.start()
    return d, f"localhost:{port}"


def test_tcp_tls_with_token(tls_daemon: tuple[DaemonHandle, str]) -> None:
    """Over TLS the token lets a client create and delete a branch; without it
    the call is UNAUTHENTICATED, while health checks answer."""
    daemon, address = tls_daemon
    cert = daemon.workdir / "cert.pem"
    with Client(address, token="s3cret-token", tls_root_cert=cert) as client:
        branch = client.create_branch("bases/demo")
        with branch.connect() as conn:
            assert conn.execute("SELECT count(*) FROM items").fetchone() == (3,)
        client.delete_branch(branch.name)
    with (
        Client(address, token="wrong", tls_root_cert=cert) as client,
        pytest.raises(Unauthenticated),
    ):
        list(client.list_branches())
    creds = grpc.ssl_channel_credentials(cert.read_bytes())
    with grpc.secure_channel(address, creds) as channel:
        with pytest.raises(grpc.RpcError) as info:
            branches_pb2_grpc.BranchServiceStub(channel).ListBranches(
                branches_pb2.ListBranchesRequest(), timeout=30
            )
        assert info.value.code() == grpc.StatusCode.UNAUTHENTICATED
        health = health_pb2_grpc.HealthStub(channel).Check(
            health_pb2.HealthCheckRequest(service=""), timeout=30
        )
        assert health.status == health_pb2.HealthCheckResponse.SERVING
    # The Unix socket is served alongside, and the token applies there too.
    with daemon.channel() as channel, pytest.raises(grpc.RpcError) as info:
        branches_pb2_grpc.BranchServiceStub(channel).ListBranches(
            branches_pb2.ListBranchesRequest(), timeout=30
        )
    assert info.value.code() == grpc.StatusCode.UNAUTHENTICATED
