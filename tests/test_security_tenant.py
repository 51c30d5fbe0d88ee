"""A tenant holding nothing but its branch's DSN tries to turn the root daemon
against its host, and fails.

Every branch hands out a superuser, and a superuser runs programs as the
branch's OS user (`COPY ... TO PROGRAM`, in its data directory). These tests do
exactly that: plant links to a root-only canary, a FIFO, a huge pid file, and
delete PG_VERSION; then they make the daemon work on that tree (branch from it,
reset it, restart the daemon) and check the canary is byte-identical, the
branch is FAILED with a reason where it cannot run, and the daemon SERVING.
"""

from __future__ import annotations

import base64
import json
import os
import pwd
import shutil
import signal
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import psutil
import psycopg
import pytest
from psycopg import sql

from cowbranchd.v1 import bases_pb2, branches_pb2, daemon_pb2, daemon_pb2_grpc
from cowbranchd.v1.branches_pb2 import Branch
from tests.fix_daemon import DaemonFactory, DaemonHandle, code_of

pytestmark = pytest.mark.btrfs

Canary = dict[str, tuple[int, int, bytes]]


def tenant_runs(dsn: str, command: str) -> None:
    """What any tenant can do: run a shell command as the branch's OS user,
    in its data directory, through its own superuser."""
    query = sql.SQL("COPY (SELECT 1) TO PROGRAM {}").format(sql.Literal(command))
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute(query)


@pytest.fixture
def canary() -> Iterator[Path]:
    """A root-only directory outside the pool, holding files and a subdirectory."""
    root = Path(tempfile.mkdtemp(prefix="cbt-canary-", dir="/tmp"))
    os.chmod(root, 0o700)
    (root / "secret").write_bytes(b"root only\n")
    os.chmod(root / "secret", 0o600)
    (root / "sub").mkdir(mode=0o700)
    (root / "sub" / "keep").write_bytes(b"keep me\n")
    yield root
    shutil.rmtree(root)


def snapshot(root: Path) -> Canary:
    """Every entry under `root` with its mode, owner and content."""
    found: Canary = {}
    for path in sorted(root.rglob("*")):
        st = path.lstat()
        found[str(path.relative_to(root))] = (
            st.st_mode,
            st.st_uid,
            path.read_bytes() if path.is_file() else b"",
        )
    return found


def plant_links(dsn: str, canary: Path) -> None:
    """Links at the three names the daemon touches, pointing at root's files."""
    tenant_runs(
        dsn,
        f"rm -rf pg_replslot && ln -s {canary} pg_replslot"
        f" && ln -sf {canary}/secret pg_hba.conf"
        f" && rm -f postmaster.pid && ln -s {canary}/secret postmaster.pid",
    )


def postmaster_pid(d: DaemonHandle, volume: str) -> int:
    return int(
        (Path(d.pool_root) / "branches" / volume / "pgdata" / "postmaster.pid")
        .read_text()
        .split()[0]
    )


def kill_and_wait(pid: int) -> None:
    """SIGKILL a postmaster the test's daemon started, and its backends."""
    try:
        proc = psutil.Process(pid)
    except psutil.NoSuchProcess:
        return
    children = proc.children(recursive=True)
    proc.kill()
    psutil.wait_procs([proc, *children], timeout=30)
    for child in children:
        if child.is_running():
            child.kill()


def volumes(d: DaemonHandle) -> list[str]:
    return sorted(p.name for p in (Path(d.pool_root) / "branches").iterdir())


def test_links_planted_by_a_tenant_are_never_followed(
    daemon_factory: DaemonFactory, canary: Path
) -> None:
    """Links at pg_replslot, postmaster.pid and pg_hba.conf pointing at a root-only
    canary: branch-from-branch is FAILED_PRECONDITION naming pg_replslot and
    leaves no clone, reset works, a daemon restart marks the branch FAILED; the
    canary stays byte-identical and the daemon SERVING throughout."""
    before = snapshot(canary)
    d = daemon_factory()
    with d.channel() as ch:
        stub = d.branches(ch)
        a = stub.CreateBranch(
            branches_pb2.CreateBranchRequest(parent="bases/demo", branch_id="tenant-a"), timeout=120
        )
        plant_links(a.connection.dsn, canary)
        child = branches_pb2.CreateBranchRequest(parent="branches/tenant-a", branch_id="child")
        code, details = code_of(stub.CreateBranch, child)
        assert code == grpc.StatusCode.FAILED_PRECONDITION, details
        assert "pg_replslot" in details and "symbolic link" in details
        assert volumes(d) == ["tenant-a"]
        assert snapshot(canary) == before

        reset = stub.ResetBranch(
            branches_pb2.ResetBranchRequest(name="branches/tenant-a"), timeout=120
        )
        assert reset.state == Branch.READY
        assert snapshot(canary) == before

        # Planted again, then the daemon restarts while the postmaster is down:
        # start-up prepares the clone, refuses it, and carries on.
        reset = stub.GetBranch(branches_pb2.GetBranchRequest(name="branches/tenant-a"))
        volume = next(v for v in volumes(d) if v.startswith("tenant-a"))
        pid = postmaster_pid(d, volume)
        plant_links(reset.connection.dsn, canary)
    d.stop()
    kill_and_wait(pid)
    d.start()
    assert d.health() == "SERVING"
    with d.channel() as ch:
        stub = d.branches(ch)
        got = stub.GetBranch(branches_pb2.GetBranchRequest(name="branches/tenant-a"))
        assert got.state == Branch.FAILED
        assert "pg_replslot" in got.failure
        stub.DeleteBranch(branches_pb2.DeleteBranchRequest(name="branches/tenant-a"), timeout=120)
        assert volumes(d) == []
    assert snapshot(canary) == before


@pytest.mark.parametrize(
    "planted",
    [
        pytest.param("rm -f postmaster.pid && mkfifo postmaster.pid", id="fifo"),
        pytest.param(
            "head -c 50000000 /dev/zero > postmaster.pid.new"
            " && mv postmaster.pid.new postmaster.pid",
            id="huge",
        ),
    ],
)
def test_a_broken_pid_file_does_not_stall_start_up(
    daemon_factory: DaemonFactory, planted: str
) -> None:
    """A FIFO (which blocks whoever opens it) or a 50 MB file at postmaster.pid:
    the daemon restarts to SERVING within a bound, still finds the running
    postmaster by its working directory, and deletes the branch cleanly."""
    d = daemon_factory()
    with d.channel() as ch:
        b = d.branches(ch).CreateBranch(
            branches_pb2.CreateBranchRequest(parent="bases/demo", branch_id="broken"), timeout=120
        )
    pid = postmaster_pid(d, "broken")
    tenant_runs(b.connection.dsn, planted)
    d.kill(signal.SIGKILL)
    started = time.monotonic()
    d.start(wait=False)
    d.wait_serving(timeout=60)
    assert time.monotonic() - started < 60
    with d.channel() as ch:
        stub = d.branches(ch)
        got = stub.GetBranch(branches_pb2.GetBranchRequest(name="branches/broken"))
        assert got.state in (Branch.READY, Branch.FAILED)
        stub.DeleteBranch(branches_pb2.DeleteBranchRequest(name="branches/broken"), timeout=120)
    assert not psutil.pid_exists(pid) or psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    assert volumes(d) == []


def test_deleted_pg_version_fails_only_that_branch(daemon_factory: DaemonFactory) -> None:
    """A tenant deletes PG_VERSION and its postmaster dies: at the next start
    that branch is FAILED naming PG_VERSION, its neighbour is READY."""
    d = daemon_factory()
    with d.channel() as ch:
        stub = d.branches(ch)
        bad = stub.CreateBranch(
            branches_pb2.CreateBranchRequest(parent="bases/demo", branch_id="bad"), timeout=120
        )
        stub.CreateBranch(
            branches_pb2.CreateBranchRequest(parent="bases/demo", branch_id="good"), timeout=120
        )
    pid = postmaster_pid(d, "bad")
    tenant_runs(bad.connection.dsn, "rm -f PG_VERSION")
    d.kill(signal.SIGKILL)
    kill_and_wait(pid)
    d.start()
    with d.channel() as ch:
        stub = d.branches(ch)
        states = {
            b.name: (b.state, b.failure)
            for b in stub.ListBranches(branches_pb2.ListBranchesRequest()).branches
        }
        assert states["branches/good"] == (Branch.READY, "")
        assert states["branches/bad"][0] == Branch.FAILED
        assert "PG_VERSION" in states["branches/bad"][1]
        stub.DeleteBranch(branches_pb2.DeleteBranchRequest(name="branches/bad"), timeout=120)


def test_garbage_metadata_fails_the_branch_and_quarantines_the_base(
    daemon_factory: DaemonFactory,
) -> None:
    """Unreadable metadata (a corrupted sidecar): the branch comes back FAILED
    with the reason, the base is kept on storage and reported by GetStatus,
    and the daemon serves everything else."""
    d = daemon_factory()
    with d.channel() as ch:
        d.bases(ch).CreateBase(bases_pb2.CreateBaseRequest(base_id="other"), timeout=120)
        stub = d.branches(ch)
        stub.CreateBranch(
            branches_pb2.CreateBranchRequest(parent="bases/demo", branch_id="garbled"), timeout=120
        )
    d.stop()
    for postmaster in d.postmasters():
        kill_and_wait(postmaster.pid)
    pool = Path(d.pool_root)
    (pool / "branches" / "garbled" / "cowbranch.json").write_text("{not json")
    sidecar = pool / "bases" / "other" / "cowbranch.json"
    data = json.loads(sidecar.read_text())
    data["meta"]["versions"] = "[[[["
    sidecar.write_text(json.dumps(data))
    d.start()
    with d.channel() as ch:
        got = d.branches(ch).GetBranch(branches_pb2.GetBranchRequest(name="branches/garbled"))
        assert got.state == Branch.FAILED
        assert "unreadable metadata" in got.failure and "not valid JSON" in got.failure
        status = daemon_pb2_grpc.DaemonServiceStub(ch).GetStatus(daemon_pb2.GetStatusRequest())
        assert [w.split(":")[0] for w in status.warnings] == [
            "bases/other is quarantined (kept, not served)"
        ]
        listed = d.bases(ch).ListBases(bases_pb2.ListBasesRequest()).bases
        assert [b.name for b in listed] == ["bases/demo"]
        fresh = d.branches(ch).CreateBranch(
            branches_pb2.CreateBranchRequest(parent="bases/demo"), timeout=120
        )
        assert fresh.state == Branch.READY
        d.branches(ch).DeleteBranch(
            branches_pb2.DeleteBranchRequest(name="branches/garbled"), timeout=120
        )
    assert (pool / "bases" / "other" / "pgdata" / "PG_VERSION").exists()
    assert "garbled" not in volumes(d)


@pytest.mark.btrfs
def test_diff_starts_a_tenants_snapshot_only_as_that_tenants_uid(
    daemon_factory: DaemonFactory, tmp_path: Path
) -> None:
    """DiffBranch starts the snapshot a branch was cloned from, which for a
    branch of a branch is tenant data: postgresql.auto.conf may run a
    command at start (here ssl_passphrase_command). It must run as the
    branch's own uid, never as the shared postgres user who owns every base."""
    d = daemon_factory()
    marker = Path(tempfile.mkdtemp(prefix="cbt-ssl-", dir="/tmp")) / "uids"
    marker.parent.chmod(0o755)
    marker.touch(mode=0o666)
    marker.chmod(0o666)
    key, cert = tmp_path / "key.pem", tmp_path / "cert.pem"
    subprocess.run(
        [
            "openssl",
            "req",
            "-x509",
            "-newkey",
            "rsa:2048",
            "-keyout",
            str(key),
            "-out",
            str(cert),
            "-days",
            "1",
            "-subj",
            "/CN=tenant",
            "-passout",
            "pass:secretpass",
        ],
        check=True,
        capture_output=True,
    )
    try:
        with d.channel() as ch:
            parent = d.branches(ch).CreateBranch(
                branches_pb2.CreateBranchRequest(parent="bases/demo", branch_id="ssl-parent"),
                timeout=120,
            )
        with psycopg.connect(parent.connection.dsn, autocommit=True) as conn:
            for name, path in (("server.key", key), ("server.crt", cert)):
                # As the tenant would: a program of its own, in its pgdata.
                encoded = base64.b64encode(path.read_bytes()).decode()
                conn.execute(
                    sql.SQL("COPY (SELECT {}) TO PROGRAM {}").format(
                        sql.Literal(encoded),
                        sql.Literal(f"base64 -d > {name} && chmod 600 {name}"),
                    )
                )
            command = f'/bin/sh -c "id -u >> {marker}; echo secretpass"'
            for setting, value in (
                ("ssl", "on"),
                ("ssl_cert_file", "server.crt"),
                ("ssl_key_file", "server.key"),
                ("ssl_passphrase_command", command),
            ):
                conn.execute(
                    sql.SQL("ALTER SYSTEM SET {} = {}").format(
                        sql.Identifier(setting), sql.Literal(value)
                    )
                )
        with d.channel() as ch:
            child = d.branches(ch).CreateBranch(
                branches_pb2.CreateBranchRequest(
                    parent="branches/ssl-parent", branch_id="ssl-child"
                ),
                timeout=120,
            )
            d.branches(ch).DiffBranch(
                branches_pb2.DiffBranchRequest(name="branches/ssl-child"), timeout=120
            )
        child_uid = psutil.Process(_postmaster_pid(child)).uids().real
        ran_as = {int(line) for line in marker.read_text().split()}
        assert child_uid in ran_as  # the child's own start ran it: the attack is live
        assert ran_as == {child_uid}, f"ran as {ran_as}; postgres is {pwd.getpwnam('postgres')}"
    finally:
        shutil.rmtree(marker.parent, ignore_errors=True)
        d.cleanup()


def _postmaster_pid(branch: Branch) -> int:
    for conn in psutil.net_connections("tcp"):
        if conn.laddr and conn.laddr.port == branch.connection.port and conn.status == "LISTEN":
            assert conn.pid is not None
            return conn.pid
    raise AssertionError(f"nothing listens on {branch.connection.port}")
