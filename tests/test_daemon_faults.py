"""Bugs found under load and faults, each shown fixed by a real run: a reset
source outliving its parent, a failed clean-up after a reset, a refresh that
fails halfway, a base deleted while branches of it are being created."""

from __future__ import annotations

import os
import signal
import subprocess
import threading
from pathlib import Path

import grpc
import psycopg
import pytest

from cowbranchd import postgres
from cowbranchd.v1 import bases_pb2, branches_pb2
from tests.fix_daemon import DaemonFactory, DaemonHandle
from tests.fix_postgres import ImportSource

Branch = branches_pb2.Branch


def rows(dsn: str, sql: str) -> list[tuple[object, ...]]:
    with psycopg.connect(dsn, autocommit=True) as conn:
        return conn.execute(sql).fetchall()


def execute(dsn: str, sql: str) -> None:
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute(sql)


@pytest.mark.parametrize("driver", ["btrfs", "zfs"])
def test_reset_of_a_child_whose_parent_branch_was_deleted(
    request: pytest.FixtureRequest, daemon_factory: DaemonFactory, driver: str
) -> None:
    """A child branch keeps its reset source when its parent branch is deleted:
    reset brings back the parent's data as of the child's creation."""
    if driver == "zfs":
        zfs_pool: str = request.getfixturevalue("zfs_pool")
        d = daemon_factory(driver="zfs", pool_root=f"{zfs_pool}/faults")
    else:
        d = daemon_factory()
    try:
        with d.channel() as ch:
            stub = d.branches(ch)
            parent = stub.CreateBranch(
                branches_pb2.CreateBranchRequest(parent="bases/demo", branch_id="parent"),
                timeout=120,
            )
            execute(parent.connection.dsn, "INSERT INTO items VALUES (40, 'from parent')")
            child = stub.CreateBranch(
                branches_pb2.CreateBranchRequest(parent="branches/parent", branch_id="child"),
                timeout=120,
            )
            execute(child.connection.dsn, "DELETE FROM items")
            stub.DeleteBranch(branches_pb2.DeleteBranchRequest(name="branches/parent"), timeout=120)
            reset = stub.ResetBranch(
                branches_pb2.ResetBranchRequest(name="branches/child"), timeout=120
            )
            assert reset.state == Branch.READY
            assert rows(reset.connection.dsn, "SELECT count(*) FROM items WHERE id = 40") == [(1,)]
            stub.DeleteBranch(branches_pb2.DeleteBranchRequest(name="branches/child"), timeout=120)
            listed = stub.ListBranches(branches_pb2.ListBranchesRequest()).branches
            assert list(listed) == []
    finally:
        d.cleanup()


def test_a_reset_whose_clean_up_failed_does_not_resurrect_a_deleted_branch(
    daemon_factory: DaemonFactory,
) -> None:
    """Reset could not destroy the old volume (the trash directory was made
    immutable); the branch is then deleted; after a restart it stays deleted
    and the old volume is gone."""
    d = daemon_factory()
    pool = Path(d.pool_root)
    with d.channel() as ch:
        stub = d.branches(ch)
        stub.CreateBranch(
            branches_pb2.CreateBranchRequest(parent="bases/demo", branch_id="ghost"), timeout=120
        )
        subprocess.run(["chattr", "+i", str(pool / ".trash")], check=True)
        try:
            reset = stub.ResetBranch(
                branches_pb2.ResetBranchRequest(name="branches/ghost"), timeout=120
            )
        finally:
            subprocess.run(["chattr", "-i", str(pool / ".trash")], check=True)
        assert reset.state == Branch.READY
        assert "ghost" in {p.name for p in (pool / "branches").iterdir()}  # the old volume
        stub.DeleteBranch(branches_pb2.DeleteBranchRequest(name="branches/ghost"), timeout=120)
    d.stop()
    d.start()
    with d.channel() as ch:
        listed = d.branches(ch).ListBranches(branches_pb2.ListBranchesRequest()).branches
    assert [b.name for b in listed] == []
    assert not [p.name for p in (pool / "branches").iterdir() if p.name.startswith("ghost")]


@pytest.fixture
def source(import_source: ImportSource) -> Path:
    """A clean data directory under /tmp (an import root), owned by postgres."""
    return import_source(
        superuser="postgres", init_sql="CREATE TABLE t (x int); INSERT INTO t VALUES (1);"
    )


def test_a_refresh_that_fails_halfway_leaves_the_base_as_it_was(
    daemon: DaemonHandle, source: Path
) -> None:
    """CreateBaseVersion(data_directory) copies beside the live data and swaps
    only when complete: a copy refused halfway (a link deep in the source)
    adds no version, and branches of the base still get its data."""
    with daemon.channel() as ch:
        bases, branches = daemon.bases(ch), daemon.branches(ch)
        bases.CreateBase(
            bases_pb2.CreateBaseRequest(base_id="refreshed", data_directory=str(source)),
            timeout=120,
        )
        (source / "pg_xact" / "zz-link").symlink_to("/etc/hostname")
        with pytest.raises(grpc.RpcError) as failed:
            bases.CreateBaseVersion(
                bases_pb2.CreateBaseVersionRequest(
                    parent="bases/refreshed", data_directory=str(source)
                ),
                timeout=120,
            )
        assert failed.value.code() == grpc.StatusCode.FAILED_PRECONDITION
        assert "pg_xact/zz-link" in (failed.value.details() or "")
        base = bases.GetBase(bases_pb2.GetBaseRequest(name="bases/refreshed"))
        assert [v.version for v in base.versions] == [1]
        volume = Path(daemon.pool_root) / "bases" / "refreshed"
        assert sorted(p.name for p in volume.iterdir()) == ["cowbranch.json", "pgdata"]
        version = bases.CreateBaseVersion(
            bases_pb2.CreateBaseVersionRequest(parent="bases/refreshed"), timeout=120
        )
        assert version.version == 2
        branch = branches.CreateBranch(
            branches_pb2.CreateBranchRequest(parent="bases/refreshed"), timeout=120
        )
        assert rows(branch.connection.dsn, "SELECT x FROM t") == [(1,)]
        bases.DeleteBase(
            bases_pb2.DeleteBaseRequest(name="bases/refreshed", force=True), timeout=120
        )


def test_deleting_a_base_while_branches_of_it_are_created_orphans_none(
    daemon_factory: DaemonFactory,
) -> None:
    """DeleteBase(force) racing eight CreateBranch calls: every create either
    fails or its branch is deleted with the base; no branch or volume is left."""
    d = daemon_factory()
    with d.channel() as ch:
        d.bases(ch).CreateBase(bases_pb2.CreateBaseRequest(base_id="doomed"), timeout=120)
    start = threading.Barrier(9)
    outcomes: list[grpc.StatusCode] = []

    def create() -> None:
        with d.channel() as ch:
            start.wait()
            try:
                d.branches(ch).CreateBranch(
                    branches_pb2.CreateBranchRequest(parent="bases/doomed"), timeout=120
                )
                outcomes.append(grpc.StatusCode.OK)
            except grpc.RpcError as exc:
                outcomes.append(exc.code())

    threads = [threading.Thread(target=create) for _ in range(8)]
    for thread in threads:
        thread.start()
    with d.channel() as ch:
        start.wait()
        d.bases(ch).DeleteBase(
            bases_pb2.DeleteBaseRequest(name="bases/doomed", force=True), timeout=120
        )
        for thread in threads:
            thread.join(120)
        listed = d.branches(ch).ListBranches(branches_pb2.ListBranchesRequest()).branches
    assert len(outcomes) == 8
    assert set(outcomes) <= {
        grpc.StatusCode.OK,
        grpc.StatusCode.FAILED_PRECONDITION,
        grpc.StatusCode.NOT_FOUND,
    }
    assert [b.name for b in listed] == []
    pool = Path(d.pool_root)
    assert sorted(p.name for p in (pool / "branches").iterdir()) == []
    assert "doomed" not in {p.name.split("@")[0] for p in (pool / "bases").iterdir()}


def test_reset_right_after_an_adopted_postmaster_was_killed(daemon_factory: DaemonFactory) -> None:
    """A branch adopted after a daemon restart loses its postmaster (SIGKILL,
    no time for init to reap it); a reset at once still brings it back READY:
    the dead postmaster's socket lock does not block the new one. (Found by
    the model-based test.)"""
    d = daemon_factory()
    with d.channel() as ch:
        branch = d.branches(ch).CreateBranch(
            branches_pb2.CreateBranchRequest(parent="bases/demo", branch_id="adopted"), timeout=120
        )
    d.kill(signal.SIGKILL)
    d.start()
    master = postgres.find_postmaster(str(d.run_dir("adopted")))
    assert master is not None
    os.kill(master.pid, signal.SIGKILL)
    with d.channel() as ch:
        reset = d.branches(ch).ResetBranch(
            branches_pb2.ResetBranchRequest(name=branch.name), timeout=120
        )
    assert reset.state == Branch.READY
    assert rows(reset.connection.dsn, "SELECT count(*) FROM items") == [(3,)]
    d.cleanup()
