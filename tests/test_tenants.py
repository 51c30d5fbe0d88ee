"""Tenants on one host: each branch's credentials open that branch alone,
through resets and daemon crashes."""

from __future__ import annotations

import pwd
import signal
from pathlib import Path

import psutil
import psycopg
import pytest

from cowbranchd.v1 import branches_pb2, daemon_pb2, daemon_pb2_grpc
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


def tenant_fails(dsn: str, sql_text: str) -> str:
    """Run `sql_text` as the tenant's superuser; return the error it must raise."""
    with psycopg.connect(dsn, autocommit=True) as conn:
        try:
            conn.execute(sql_text)
        except psycopg.Error as exc:
            return str(exc)
    raise AssertionError(f"{sql_text!r} succeeded")


def program(command: str) -> str:
    return f"COPY (SELECT 1) TO PROGRAM '{command}'"


@pytest.mark.btrfs
def test_a_tenant_superuser_cannot_reach_another_branch_or_the_base(
    daemon_factory: DaemonFactory,
) -> None:
    """Each postmaster runs as its own uid on an idmapped mount: A's superuser
    can neither read B's data (raw clone or B's mount), the base's files or
    B's socket directory, nor signal B's postmaster, nor write into the live
    base; B's data is unchanged. What A writes lands on disk as postgres."""
    d = daemon_factory()
    pool, mounts = Path(d.pool_root), d.mount_root
    with d.channel() as ch:
        stub = d.branches(ch)
        a = stub.CreateBranch(
            branches_pb2.CreateBranchRequest(parent="bases/demo", branch_id="a"), timeout=120
        )
        b = stub.CreateBranch(
            branches_pb2.CreateBranchRequest(parent="bases/demo", branch_id="b"), timeout=120
        )
        status = daemon_pb2_grpc.DaemonServiceStub(ch).GetStatus(daemon_pb2.GetStatusRequest())
    assert status.isolation == "uid"
    with psycopg.connect(b.connection.dsn, autocommit=True) as conn:
        conn.execute("CREATE TABLE secret AS SELECT 'b only' AS v")
    pid_a = int((mounts / "a" / "postmaster.pid").read_text().split()[0])
    pid_b = int((mounts / "b" / "postmaster.pid").read_text().split()[0])
    uid_a, uid_b = psutil.Process(pid_a).uids().real, psutil.Process(pid_b).uids().real
    postgres_uid = pwd.getpwnam("postgres").pw_uid
    assert len({uid_a, uid_b, postgres_uid}) == 3, (uid_a, uid_b)

    for path in (
        pool / "branches" / "b" / "pgdata" / "PG_VERSION",
        mounts / "b" / "PG_VERSION",
        pool / "bases" / "demo" / "pgdata" / "PG_VERSION",
    ):
        assert "Permission denied" in tenant_fails(
            a.connection.dsn, f"SELECT pg_read_file('{path}')"
        )
    socket_dir = Path(b.connection.socket_dir)
    for command in (
        f"ls {socket_dir}",
        f"kill -0 {pid_b}",
        f"touch {pool}/bases/demo/pgdata/planted",
        f"touch {mounts}/b/planted",
    ):
        assert "program" in tenant_fails(a.connection.dsn, program(command))
    assert not (pool / "bases" / "demo" / "pgdata" / "planted").exists()
    with psycopg.connect(b.connection.dsn) as conn:
        assert conn.execute("SELECT v FROM secret").fetchall() == [("b only",)]

    with psycopg.connect(a.connection.dsn, autocommit=True) as conn:
        conn.execute("CREATE TABLE mine (x int)")
        relation = conn.execute("SELECT pg_relation_filepath('mine')").fetchone()
    assert relation is not None
    on_disk = pool / "branches" / "a" / "pgdata" / str(relation[0])
    assert on_disk.stat().st_uid == postgres_uid
    d.cleanup()


@pytest.mark.zfs
def test_zfs_fuse_falls_back_to_a_shared_uid_and_says_so(
    daemon_factory: DaemonFactory, zfs_pool: str
) -> None:
    """zfs-fuse cannot idmap: branches still work, run as the shared postgres
    user, and GetStatus (and the start-up log) say the isolation is shared."""
    d = daemon_factory(driver="zfs", pool_root=f"{zfs_pool}/shared")
    try:
        with d.channel() as ch:
            branch = d.branches(ch).CreateBranch(
                branches_pb2.CreateBranchRequest(parent="bases/demo"), timeout=120
            )
            status = daemon_pb2_grpc.DaemonServiceStub(ch).GetStatus(daemon_pb2.GetStatusRequest())
        assert status.isolation == "shared"
        assert any(w.startswith("isolation is shared-uid") for w in status.warnings)
        assert opens(branch.connection.dsn)
        masters = d.postmasters()
        assert masters and {p.uids().real for p in masters} == {pwd.getpwnam("postgres").pw_uid}
        assert '"mode": "shared"' in d.log_path.read_text()
    finally:
        d.cleanup()
