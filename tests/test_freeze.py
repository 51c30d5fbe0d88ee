"""Frozen branches (FreezeBranch): a template's children clone one shared
snapshot of it, own none of it, outlive it, and come from warm clones when
the daemon keeps them. On btrfs and on zfs-fuse."""

from __future__ import annotations

import subprocess
import time
from collections.abc import Callable
from pathlib import Path

import grpc
import psycopg
import pytest

from cowbranchd import postgres
from cowbranchd.v1 import branches_pb2
from tests.fix_daemon import DaemonHandle, code_of
from tests.fix_storage import branch_volumes, volume_meta
from tests.test_warm import events, rows

Branch = branches_pb2.Branch


def create(stub: object, parent: str, branch_id: str) -> Branch:
    request = branches_pb2.CreateBranchRequest(parent=parent, branch_id=branch_id)
    branch: Branch = stub.CreateBranch(request, timeout=120)  # type: ignore[attr-defined]
    return branch


def execute(dsn: str, statement: str) -> None:
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute(statement)


def snapshots_of(d: DaemonHandle, volume: str) -> set[str]:
    return {v.partition("@")[2] for v in branch_volumes(d) if v.startswith(f"{volume}@")}


def take_snapshot(d: DaemonHandle, volume: str, snap: str) -> None:
    """A snapshot made behind the daemon's back, as a crash mid-freeze leaves one."""
    if d.driver == "btrfs":
        folder = Path(d.pool_root) / "branches"
        argv = ["btrfs", "subvolume", "snapshot", "-r"]
        argv += [str(folder / volume), str(folder / f"{volume}@{snap}")]
    else:
        argv = ["zfs", "snapshot", f"{d.pool_root}/branches/{volume}@{snap}"]
    subprocess.run(argv, check=True, capture_output=True)


def test_children_of_a_frozen_branch_share_its_snapshot_and_outlive_it(
    pool_daemon_factory: Callable[..., DaemonHandle],
) -> None:
    """Freezing stops the template cleanly and snapshots it once: children see
    its data as frozen (not what it writes later), take no snapshot of their
    own, reset to it, and keep working after the template is deleted; the
    snapshot goes with the last child. A frozen branch refuses a reset."""
    d = pool_daemon_factory()
    with d.channel() as ch:
        stub = d.branches(ch)
        tpl = create(stub, "bases/demo", "tpl")
        execute(tpl.connection.dsn, "INSERT INTO items VALUES (10, 'migrated')")
        frozen = stub.FreezeBranch(branches_pb2.FreezeBranchRequest(name=tpl.name), timeout=120)
        assert (frozen.state, frozen.frozen) == (Branch.SUSPENDED, True)
        assert frozen.connection == tpl.connection
        (snap,) = snapshots_of(d, "tpl")
        assert snap.startswith("f-") and volume_meta(d, "tpl")["frozen"] == snap
        again = stub.FreezeBranch(branches_pb2.FreezeBranchRequest(name=tpl.name), timeout=120)
        assert again.frozen and snapshots_of(d, "tpl") == {snap}

        a = create(stub, tpl.name, "a")
        b = create(stub, tpl.name, "b")
        assert (a.parent, rows(a.connection.dsn), rows(b.connection.dsn)) == (
            "branches/tpl",
            [1, 2, 3, 10],
            [1, 2, 3, 10],
        )
        assert snapshots_of(d, "tpl") == {snap}  # no `c-a`, no `c-b`
        assert volume_meta(d, "a")["source"] == f"branches/tpl@{snap}"

        # The template still answers on its DSN (resumed), but what it writes
        # now is not what its children get.
        execute(tpl.connection.dsn, "INSERT INTO items VALUES (11, 'after')")
        assert rows(create(stub, tpl.name, "c").connection.dsn) == [1, 2, 3, 10]
        code, message = code_of(stub.ResetBranch, branches_pb2.ResetBranchRequest(name=tpl.name))
        assert code == grpc.StatusCode.FAILED_PRECONDITION and "frozen" in message
        assert rows(tpl.connection.dsn) == [1, 2, 3, 10, 11]

        stub.DeleteBranch(branches_pb2.DeleteBranchRequest(name=a.name), timeout=120)
        assert snapshots_of(d, "tpl") == {snap}
        execute(b.connection.dsn, "DELETE FROM items")
        stub.DeleteBranch(branches_pb2.DeleteBranchRequest(name=tpl.name), timeout=120)
        stub.ResetBranch(branches_pb2.ResetBranchRequest(name=b.name), timeout=120)
        assert rows(b.connection.dsn) == [1, 2, 3, 10]
        for name in ("branches/b", "branches/c"):
            stub.DeleteBranch(branches_pb2.DeleteBranchRequest(name=name), timeout=120)
    # The snapshot outlived its volume for the children; with the last of
    # them gone, start-up's storage gc removes it.
    d.stop()
    d.start()
    assert branch_volumes(d) == set()
    assert d.postmasters() == []


def test_a_freeze_cut_short_leaves_nothing_and_a_frozen_branch_survives_a_restart(
    pool_daemon_factory: Callable[..., DaemonHandle],
) -> None:
    """An `f-` snapshot no record names (a crash between snapshot and record)
    is removed at start-up; a frozen branch keeps its snapshot across a
    restart and its children still clone it."""
    d = pool_daemon_factory()
    with d.channel() as ch:
        stub = d.branches(ch)
        create(stub, "bases/demo", "plain")
        tpl = create(stub, "bases/demo", "tpl")
        stub.FreezeBranch(branches_pb2.FreezeBranchRequest(name=tpl.name), timeout=120)
        (snap,) = snapshots_of(d, "tpl")
    d.stop()
    take_snapshot(d, "plain", "f-0a0b0c")
    assert snapshots_of(d, "plain") == {"f-0a0b0c"}
    d.start()
    assert snapshots_of(d, "plain") == set()
    assert snapshots_of(d, "tpl") == {snap}
    with d.channel() as ch:
        stub = d.branches(ch)
        got = stub.GetBranch(branches_pb2.GetBranchRequest(name="branches/tpl"), timeout=60)
        assert (got.frozen, got.state) == (True, Branch.SUSPENDED)
        child = create(stub, "branches/tpl", "child")
        assert rows(child.connection.dsn) == [1, 2, 3]
        assert volume_meta(d, "child")["source"] == f"branches/tpl@{snap}"


def wait_for(what: str, check: Callable[[], bool], timeout: float = 90.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if check():
            return
        time.sleep(0.05)
    pytest.fail(f"not within {timeout:.0f} s: {what}")


def warm_ready(d: DaemonHandle, parent: str) -> list[str]:
    """The volumes of the warm clones of `parent` started so far, in order."""
    return [str(e["branch"]) for e in events(d, "warm_ready") if e["parent"] == parent]


def test_children_of_a_frozen_branch_are_handed_out_warm(
    pool_daemon_factory: Callable[..., DaemonHandle],
) -> None:
    """With warm branches on, a frozen branch gets warm clones as soon as it
    is frozen; a child is handed one (its own password, the template's data),
    and deleting the template destroys its warm clones and their postgres."""
    d = pool_daemon_factory(start=False)
    d.sections = {"daemon": "warm_branches = 1"}
    d.start()
    with d.channel() as ch:
        stub = d.branches(ch)
        tpl = create(stub, "bases/demo", "tpl")
        execute(tpl.connection.dsn, "INSERT INTO items VALUES (10, 'migrated')")
        stub.FreezeBranch(branches_pb2.FreezeBranchRequest(name=tpl.name), timeout=120)
        wait_for("a warm clone of branches/tpl", lambda: len(warm_ready(d, "branches/tpl")) == 1)
        (clone,) = warm_ready(d, "branches/tpl")
        child = create(stub, tpl.name, "child")
        made = [e for e in events(d, "branch_created") if e["branch"] == "child"]
        assert [e["warm"] for e in made] == [True]
        assert volume_meta(d, clone)["id"] == "child"
        assert child.parent == "branches/tpl" and rows(child.connection.dsn) == [1, 2, 3, 10]
        assert child.connection.password != tpl.connection.password
        # The pool makes another for the next child; deleting the template
        # destroys it, postgres and all.
        wait_for("a second warm clone", lambda: len(warm_ready(d, "branches/tpl")) == 2)
        spare = warm_ready(d, "branches/tpl")[1]
        spare_data = d.run_dir(spare)
        assert postgres.find_postmaster(str(spare_data)) is not None
        stub.DeleteBranch(branches_pb2.DeleteBranchRequest(name=tpl.name), timeout=120)
        assert spare not in branch_volumes(d)
        assert postgres.find_postmaster(str(spare_data)) is None
        assert rows(child.connection.dsn) == [1, 2, 3, 10]
        stub.ResetBranch(branches_pb2.ResetBranchRequest(name=child.name), timeout=120)
        assert rows(child.connection.dsn) == [1, 2, 3, 10]


def test_warm_clones_go_to_the_most_recent_templates_only(
    pool_daemon_factory: Callable[..., DaemonHandle],
) -> None:
    """With `daemon.warm_templates = 1`, only the template branched from last
    has warm clones: the other one's child is made cold, and asking for it
    moves the warm clones over."""
    d = pool_daemon_factory(start=False)
    d.sections = {"daemon": "warm_branches = 1\nwarm_templates = 1"}
    d.start()
    with d.channel() as ch:
        stub = d.branches(ch)
        for name in ("one", "two"):
            tpl = create(stub, "bases/demo", name)
            stub.FreezeBranch(branches_pb2.FreezeBranchRequest(name=tpl.name), timeout=120)
        # Frozen first, `one` had a warm clone until `two` was frozen.
        wait_for("a warm clone of branches/two", lambda: len(warm_ready(d, "branches/two")) == 1)
        before = len(warm_ready(d, "branches/one"))
        create(stub, "branches/one", "cold-child")
        wait_for(
            "a new warm clone of branches/one",
            lambda: len(warm_ready(d, "branches/one")) == before + 1,
        )
        create(stub, "branches/one", "warm-child")
        made = {e["branch"]: e["warm"] for e in events(d, "branch_created")}
        assert (made["cold-child"], made["warm-child"]) == (False, True)
        # `one` is the most recent now: `two` has no warm clone left.
        (two,) = warm_ready(d, "branches/two")
        wait_for("branches/two's warm clone destroyed", lambda: two not in branch_volumes(d))


def test_a_template_deleted_under_its_children_can_be_made_again_by_name(
    pool_daemon_factory: Callable[..., DaemonHandle],
) -> None:
    """Deleting a frozen template whose child lives keeps its data for the
    child (on ZFS the dataset's name too, until the child goes); a new
    branch by the same name is made all the same, and both generations'
    children answer with their own parent's data."""
    d = pool_daemon_factory()
    with d.channel() as ch:
        stub = d.branches(ch)
        old = create(stub, "bases/demo", "tpl")
        execute(old.connection.dsn, "INSERT INTO items VALUES (10, 'old')")
        stub.FreezeBranch(branches_pb2.FreezeBranchRequest(name=old.name), timeout=120)
        old_child = create(stub, old.name, "old-child")
        stub.DeleteBranch(branches_pb2.DeleteBranchRequest(name=old.name), timeout=120)
        new = create(stub, "bases/demo", "tpl")
        execute(new.connection.dsn, "INSERT INTO items VALUES (20, 'new')")
        stub.FreezeBranch(branches_pb2.FreezeBranchRequest(name=new.name), timeout=120)
        new_child = create(stub, new.name, "new-child")
        assert rows(new_child.connection.dsn) == [1, 2, 3, 20]
        stub.ResetBranch(branches_pb2.ResetBranchRequest(name=old_child.name), timeout=120)
        assert rows(old_child.connection.dsn) == [1, 2, 3, 10]
        for name in (new.name, "branches/new-child", "branches/old-child"):
            stub.DeleteBranch(branches_pb2.DeleteBranchRequest(name=name), timeout=120)
    d.stop()
    d.start()
    assert branch_volumes(d) == set()
