"""UpdateBranch on branches whose volume is not named after them (after a
reset, after a warm hand-over), on btrfs and zfs-fuse, across a restart."""

from __future__ import annotations

import itertools
from collections.abc import Iterator

import pytest
from google.protobuf import duration_pb2, field_mask_pb2

from cowbranchd.v1 import branches_pb2
from tests.fix_daemon import DaemonFactory, DaemonHandle

_datasets = itertools.count()


@pytest.fixture(params=["btrfs", "zfs"])
def warm_daemon(
    request: pytest.FixtureRequest, daemon_factory: DaemonFactory
) -> Iterator[DaemonHandle]:
    """A daemon of its own with one warm clone per base, on either driver;
    stopped with its postmasters at the end (the zfs-fuse pool may go first)."""
    if request.param == "btrfs":
        d = daemon_factory(start=False)
    else:
        zfs_pool: str = request.getfixturevalue("zfs_pool")
        d = daemon_factory(driver="zfs", pool_root=f"{zfs_pool}/upd{next(_datasets)}", start=False)
    d.sections = {"daemon": "warm_branches = 1"}
    d.start()
    yield d
    d.cleanup()


def update(d: DaemonHandle, name: str, labels: dict[str, str], ttl_s: int) -> None:
    with d.channel() as ch:
        d.branches(ch).UpdateBranch(
            branches_pb2.UpdateBranchRequest(
                branch=branches_pb2.Branch(name=name, labels=labels, protected=True),
                ttl=duration_pb2.Duration(seconds=ttl_s),
                update_mask=field_mask_pb2.FieldMask(paths=["labels", "ttl", "protected"]),
            ),
            timeout=60,
        )


def test_update_after_warm_hand_over_and_reset_survives_a_restart(
    warm_daemon: DaemonHandle,
) -> None:
    """A branch handed out warm, then reset, takes label, TTL and protection
    updates each time (it used to be NOT_FOUND), and keeps them across a
    daemon restart."""
    d = warm_daemon
    with d.channel() as ch:
        stub = d.branches(ch)
        branch = stub.CreateBranch(
            branches_pb2.CreateBranchRequest(parent="bases/demo", branch_id="qa"), timeout=120
        )
    update(d, branch.name, {"stage": "handed-out"}, 3600)
    with d.channel() as ch:
        d.branches(ch).ResetBranch(branches_pb2.ResetBranchRequest(name=branch.name), timeout=120)
    update(d, branch.name, {"stage": "reset"}, 7200)
    d.stop()
    d.start()
    with d.channel() as ch:
        got = d.branches(ch).GetBranch(branches_pb2.GetBranchRequest(name=branch.name))
        assert (dict(got.labels), got.protected, got.state) == (
            {"stage": "reset"},
            True,
            branches_pb2.Branch.READY,
        )
        remaining = got.expire_time.ToSeconds() - got.create_time.ToSeconds()
        assert remaining > 7000
        d.branches(ch).DeleteBranch(
            branches_pb2.DeleteBranchRequest(name=branch.name, force=True), timeout=120
        )
