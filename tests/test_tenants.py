"""Tenants on one host: each branch's credentials open that branch alone,
through resets and daemon crashes."""

from __future__ import annotations

import signal

import psycopg
import pytest

from cowbranchd.v1 import branches_pb2
from tests.fix_daemon import DaemonFactory

Branch = branches_pb2.Branch


def opens(dsn: str) -> bool:
    try:
        with psycopg.connect(dsn, connect_timeout=10) as conn:
            conn.execute("SELECT 1")
    except psycopg.OperationalError as exc:
        assert "password authentication failed" in str(exc)
        return False
    return True


def swap_password(dsn_of: Branch, password_of: Branch) -> str:
    """`dsn_of`'s DSN with `password_of`'s password in it."""
    conn = dsn_of.connection
    return (
        f"host={conn.host} port={conn.port} user={conn.user} "
        f"password={password_of.connection.password} dbname={conn.database}"
    )


@pytest.mark.btrfs
def test_each_branch_password_opens_only_its_branch(daemon_factory: DaemonFactory) -> None:
    """Two branches of one base get different passwords (of 24 url-safe
    characters, 144 bits); A's opens A only, B's opens B only, and so it stays
    after a reset of A and after a SIGKILL and restart of the daemon."""
    d = daemon_factory()
    with d.channel() as ch:
        stub = d.branches(ch)
        a = stub.CreateBranch(
            branches_pb2.CreateBranchRequest(parent="bases/demo", branch_id="tenant-a"), timeout=120
        )
        b = stub.CreateBranch(
            branches_pb2.CreateBranchRequest(parent="bases/demo", branch_id="tenant-b"), timeout=120
        )
    assert a.connection.password != b.connection.password
    assert len(a.connection.password) == 24

    def check() -> None:
        assert opens(a.connection.dsn) and opens(b.connection.dsn)
        assert not opens(swap_password(a, b)) and not opens(swap_password(b, a))

    check()
    with d.channel() as ch:
        reset = d.branches(ch).ResetBranch(
            branches_pb2.ResetBranchRequest(name="branches/tenant-a"), timeout=120
        )
    assert reset.connection == a.connection
    check()
    d.kill(signal.SIGKILL)
    d.start()
    with d.channel() as ch:
        again = d.branches(ch).GetBranch(branches_pb2.GetBranchRequest(name="branches/tenant-a"))
    assert again.connection == a.connection
    check()
    d.cleanup()
