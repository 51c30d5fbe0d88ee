"""TCP with TLS and a bearer token, for runners whose jobs live in containers:
the client library gets through with the token; a call without it is
UNAUTHENTICATED; health checks stay open for probes. TCP is never open by
accident: without TLS or a token the daemon refuses to start unless the
operator sets `daemon.insecure_tcp`, and clients never send a token over
plaintext TCP."""

from __future__ import annotations

import asyncio
import json
import socket
import subprocess

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from cowbranchd.client import AsyncClient, Client
from cowbranchd.errors import InvalidArgument, Unauthenticated
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
    # A wrong token is refused whatever its length or how much of it is right.
    for wrong in ("wrong", "s3cret-toke", "s3cret-token-and-more", "S3cret-token"):
        with (
            Client(address, token=wrong, tls_root_cert=cert) as client,
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
    # The client sends the token over the (local, 0750) socket without TLS.
    with Client(daemon.address, token="s3cret-token") as client:
        assert list(client.list_branches()) == []


NO_TOKEN = "a token (daemon.token_file or tenants.tokens_dir)"


@pytest.mark.parametrize(
    ("lines", "missing"),
    [
        ('token_file = "{token}"', "TLS (daemon.tls_cert, daemon.tls_key)"),
        ('tls_cert = "{cert}"\ntls_key = "{key}"', NO_TOKEN),
        ("", f"TLS (daemon.tls_cert, daemon.tls_key) or {NO_TOKEN}"),
    ],
    ids=["no-tls", "no-token", "neither"],
)
def test_tcp_without_tls_or_token_refuses_to_start(
    daemon_factory: DaemonFactory, lines: str, missing: str
) -> None:
    """A daemon configured for TCP without TLS or without a token exits 2
    before touching anything, with one line naming the keys to set."""
    d = daemon_factory(start=False)
    files = {name: d.workdir / name for name in ("cert", "key", "token")}
    for path in files.values():
        path.write_text("not needed: the daemon stops before reading it\n")
    port = free_port()
    d.sections = {"daemon": f'tcp_address = "127.0.0.1:{port}"\n' + lines.format(**files)}
    d.start(wait=False)
    assert d.proc is not None
    assert d.proc.wait(timeout=60) == 2
    assert d.log_path.read_text().splitlines() == [
        f"cowbranchd: bad configuration: daemon.tcp_address: TCP without {missing} lets "
        "anyone who can reach the port use every branch; configure them, or set "
        f"daemon.insecure_tcp = true to accept that (in {d.config_path})"
    ]
    assert not d.socket_path.parent.exists()
    with socket.socket() as probe:
        assert probe.connect_ex(("127.0.0.1", port)) != 0


def test_empty_token_file_refuses_to_start(daemon_factory: DaemonFactory) -> None:
    """An empty token file is not taken as 'no token needed' (nor as the
    empty token): the daemon stops before preparing anything, naming the key."""
    d = daemon_factory(start=False)
    token = d.workdir / "token"
    token.write_text("\n")
    d.sections = {
        "daemon": f'tcp_address = "127.0.0.1:{free_port()}"\ninsecure_tcp = true\n'
        f'token_file = "{token}"'
    }
    d.start(wait=False)
    assert d.proc is not None
    assert d.proc.wait(timeout=60) == 1
    failures = [
        {k: v for k, v in event.items() if k != "timestamp"}
        for event in map(json.loads, _json_lines(d.log_path.read_text()))
    ]
    assert failures == [
        {
            "event": "start_failed",
            "level": "error",
            "error": f"daemon.token_file: {token} holds no token",
        }
    ]
    assert not d.socket_path.parent.exists()


def test_insecure_tcp_serves_and_warns(daemon_factory: DaemonFactory) -> None:
    """With `insecure_tcp = true` the operator gets plaintext TCP without a
    token: a client reaches the daemon there, and every start logs a warning."""
    d = daemon_factory(start=False)
    port = free_port()
    d.sections = {"daemon": f'tcp_address = "127.0.0.1:{port}"\ninsecure_tcp = true'}
    d.start()
    with Client(f"127.0.0.1:{port}") as client:
        branch = client.create_branch("bases/demo")
        with branch.connect() as conn:
            assert conn.execute("SELECT count(*) FROM items").fetchone() == (3,)
        client.delete_branch(branch.name)
    warnings = [
        {k: v for k, v in event.items() if k != "timestamp"}
        for event in map(json.loads, _json_lines(d.log_path.read_text()))
        if event.get("event") == "insecure_tcp"
    ]
    assert warnings == [
        {
            "event": "insecure_tcp",
            "level": "warning",
            "tcp": f"127.0.0.1:{port}",
            "message": "INSECURE TCP (daemon.insecure_tcp = true): without TLS, tokens and "
            "branch passwords cross the network in clear; without a token, anyone who can "
            "reach the port can use every branch",
        }
    ]


def _json_lines(text: str) -> list[str]:
    return [line for line in text.splitlines() if line.startswith("{")]


def test_client_never_sends_a_token_over_plaintext_tcp() -> None:
    """A client holding a token and a TCP address without a TLS root
    certificate refuses before connecting, saying how to fix it; the listener
    sees no connection at all."""
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen()
        address = f"127.0.0.1:{listener.getsockname()[1]}"
        expected = (
            f"token: refusing to send the token to {address} over plaintext TCP; give the "
            "daemon's TLS root certificate (tls_root_cert=..., --tls-root-cert or "
            "COWBRANCHD_TLS_ROOT_CERT), or use its Unix socket"
        )
        with (
            Client(address, token="s3cret-token") as client,
            pytest.raises(InvalidArgument) as info,
        ):
            list(client.list_branches())
        assert str(info.value) == expected

        async def get_async() -> None:
            async with AsyncClient(address, token="s3cret-token") as aclient:
                await aclient.get_branch("any")

        with pytest.raises(InvalidArgument) as info:
            asyncio.run(get_async())
        assert str(info.value) == expected
        listener.settimeout(0.5)
        with pytest.raises(TimeoutError):
            listener.accept()
