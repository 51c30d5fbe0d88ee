"""Branches and bases through the gRPC API of a real daemon, on real btrfs and
zfs-fuse pools, with real PostgreSQL behind every DSN."""

from __future__ import annotations

import time
from collections.abc import Iterator

import grpc
import psycopg
import pytest
from google.protobuf import duration_pb2, field_mask_pb2
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from cowbranchd import __version__
from cowbranchd.v1 import bases_pb2, branches_pb2, daemon_pb2, daemon_pb2_grpc
from tests.fix_daemon import DaemonFactory, DaemonHandle

Branch = branches_pb2.Branch


@pytest.fixture(params=["btrfs", "zfs"])
def any_daemon(
    request: pytest.FixtureRequest, daemon: DaemonHandle, daemon_factory: DaemonFactory
) -> DaemonHandle:
    """The shared btrfs daemon, or a daemon on a zfs-fuse pool."""
    if request.param == "btrfs":
        return daemon
    zfs_daemon: DaemonHandle = request.getfixturevalue("zfs_daemon")
    return zfs_daemon


@pytest.fixture(scope="session")
def zfs_daemon(zfs_pool: str, daemon_factory: DaemonFactory) -> DaemonHandle:
    """A daemon on a dataset of the session's zfs-fuse pool."""
    return daemon_factory(driver="zfs", pool_root=f"{zfs_pool}/cbd")


@pytest.fixture
def channel(daemon: DaemonHandle) -> Iterator[grpc.Channel]:
    with daemon.channel() as ch:
        yield ch


def fetch(dsn: str, sql: str) -> list[tuple[object, ...]]:
    with psycopg.connect(dsn, autocommit=True) as conn:
        return conn.execute(sql).fetchall()


def execute(dsn: str, sql: str) -> None:
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute(sql)


def create(d: DaemonHandle, ch: grpc.Channel, **fields: object) -> Branch:
    fields.setdefault("parent", f"bases/{d.base}")
    request = branches_pb2.CreateBranchRequest(**fields)  # type: ignore[arg-type]
    branch: Branch = d.branches(ch).CreateBranch(request, timeout=120)
    return branch


def delete(d: DaemonHandle, ch: grpc.Channel, branch: Branch) -> None:
    d.branches(ch).DeleteBranch(
        branches_pb2.DeleteBranchRequest(name=branch.name, force=True, allow_missing=True),
        timeout=120,
    )


def names(rows: list[tuple[object, ...]]) -> list[object]:
    return [row[0] for row in rows]


def test_branch_sees_base_and_isolates_writes(any_daemon: DaemonHandle) -> None:
    """A branch sees the base's data; its writes reach neither the base nor a sibling;
    reset brings it back to its parent's data on the same port with the same credentials."""
    d = any_daemon
    with d.channel() as ch:
        a = create(d, ch)
        b = create(d, ch)
        try:
            assert a.state == Branch.READY
            assert names(fetch(a.connection.dsn, "SELECT name FROM items ORDER BY id")) == [
                "apple",
                "banana",
                "cherry",
            ]
            execute(a.connection.dsn, "INSERT INTO items VALUES (4, 'durian')")
            execute(a.connection.dsn, "DELETE FROM items WHERE id = 1")
            assert names(fetch(a.connection.dsn, "SELECT id FROM items ORDER BY id")) == [2, 3, 4]
            assert names(fetch(b.connection.dsn, "SELECT id FROM items ORDER BY id")) == [1, 2, 3]
            c = create(d, ch)  # a branch made after the writes still sees the base
            assert names(fetch(c.connection.dsn, "SELECT id FROM items ORDER BY id")) == [1, 2, 3]
            delete(d, ch, c)

            reset = d.branches(ch).ResetBranch(
                branches_pb2.ResetBranchRequest(name=a.name), timeout=120
            )
            assert reset.connection == a.connection
            assert names(fetch(a.connection.dsn, "SELECT id FROM items ORDER BY id")) == [1, 2, 3]
        finally:
            delete(d, ch, a)
            delete(d, ch, b)


def test_branch_from_branch_carries_parent_writes(any_daemon: DaemonHandle) -> None:
    """A branch of a branch starts with the writes its parent made before the call,
    and later writes on either side stay apart."""
    d = any_daemon
    with d.channel() as ch:
        parent = create(d, ch)
        try:
            execute(parent.connection.dsn, "INSERT INTO items VALUES (10, 'from-parent')")
            child = create(d, ch, parent=parent.name)
            assert child.parent == parent.name
            assert names(fetch(child.connection.dsn, "SELECT id FROM items ORDER BY id")) == [
                1,
                2,
                3,
                10,
            ]
            execute(parent.connection.dsn, "INSERT INTO items VALUES (11, 'later')")
            execute(child.connection.dsn, "INSERT INTO items VALUES (12, 'child')")
            assert names(fetch(child.connection.dsn, "SELECT id FROM items ORDER BY id")) == [
                1,
                2,
                3,
                10,
                12,
            ]
            # Resetting the child goes back to the parent's state at branch time.
            d.branches(ch).ResetBranch(branches_pb2.ResetBranchRequest(name=child.name))
            assert names(fetch(child.connection.dsn, "SELECT id FROM items ORDER BY id")) == [
                1,
                2,
                3,
                10,
            ]
            delete(d, ch, child)
        finally:
            delete(d, ch, parent)


def test_create_is_idempotent_by_request_id(daemon: DaemonHandle, channel: grpc.Channel) -> None:
    """The same request_id returns the same branch; the same id with another
    request_id is ALREADY_EXISTS."""
    first = create(daemon, channel, branch_id="idem", request_id="req-1")
    try:
        again = create(daemon, channel, branch_id="idem", request_id="req-1")
        assert again.name == first.name
        assert again.connection == first.connection
        generated = create(daemon, channel, request_id="req-2")
        assert create(daemon, channel, request_id="req-2").name == generated.name
        delete(daemon, channel, generated)
        with pytest.raises(grpc.RpcError) as info:
            create(daemon, channel, branch_id="idem", request_id="req-3")
        assert info.value.code() == grpc.StatusCode.ALREADY_EXISTS
    finally:
        delete(daemon, channel, first)


def test_list_filters_by_labels_and_pages(daemon: DaemonHandle, channel: grpc.Channel) -> None:
    """ListBranches applies the label selector and pages with page_token."""
    made = [create(daemon, channel, labels={"suite": "paging", "n": str(i)}) for i in range(3)]
    other = create(daemon, channel, labels={"suite": "other"})
    try:
        stub = daemon.branches(channel)
        seen: list[str] = []
        token = ""
        while True:
            page = stub.ListBranches(
                branches_pb2.ListBranchesRequest(
                    label_selector="suite=paging", page_size=2, page_token=token
                )
            )
            assert len(page.branches) <= 2
            seen += [b.name for b in page.branches]
            token = page.next_page_token
            if not token:
                break
        assert seen == sorted(b.name for b in made)
        rest = stub.ListBranches(branches_pb2.ListBranchesRequest(label_selector="suite!=paging"))
        assert other.name in [b.name for b in rest.branches]
        assert not {b.name for b in made} & {b.name for b in rest.branches}
    finally:
        for branch in [*made, other]:
            delete(daemon, channel, branch)


def test_update_and_ttl_expiry(daemon: DaemonHandle, channel: grpc.Channel) -> None:
    """UpdateBranch changes labels, protection and ttl; an expired branch is
    destroyed by the daemon, a protected one is kept."""
    stub = daemon.branches(channel)
    keep = create(daemon, channel, ttl=duration_pb2.Duration(seconds=1), protected=True)
    gone = create(daemon, channel, labels={"a": "1"})
    updated = stub.UpdateBranch(
        branches_pb2.UpdateBranchRequest(
            branch=Branch(name=gone.name, labels={"b": "2"}),
            update_mask=field_mask_pb2.FieldMask(paths=["labels", "ttl"]),
            ttl=duration_pb2.Duration(seconds=1),
        )
    )
    assert dict(updated.labels) == {"b": "2"}
    assert updated.HasField("expire_time")
    for _ in range(600):
        try:
            stub.GetBranch(branches_pb2.GetBranchRequest(name=gone.name))
        except grpc.RpcError as exc:
            assert exc.code() == grpc.StatusCode.NOT_FOUND
            break
        time.sleep(0.1)
    else:
        pytest.fail("expired branch was not reaped")
    kept = stub.GetBranch(branches_pb2.GetBranchRequest(name=keep.name))
    assert kept.protected and kept.state == Branch.READY
    with pytest.raises(grpc.RpcError) as info:
        stub.DeleteBranch(branches_pb2.DeleteBranchRequest(name=keep.name))
    assert info.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    stub.UpdateBranch(
        branches_pb2.UpdateBranchRequest(
            branch=Branch(name=keep.name, protected=False),
            update_mask=field_mask_pb2.FieldMask(paths=["protected"]),
        )
    )
    stub.DeleteBranch(branches_pb2.DeleteBranchRequest(name=keep.name))


def test_bases_lifecycle(daemon: DaemonHandle, channel: grpc.Channel) -> None:
    """A base made by initdb gets version 1; a new version is N+1; deleting a base
    with branches is FAILED_PRECONDITION unless forced, which removes them too."""
    bases = daemon.bases(channel)
    base = bases.CreateBase(
        bases_pb2.CreateBaseRequest(
            base_id="shop",
            initdb=bases_pb2.InitdbSource(database="shop", init_sql="CREATE TABLE t (x int);"),
        ),
        timeout=120,
    )
    assert base.name == "bases/shop" and [v.version for v in base.versions] == [1]
    assert base.pg_version >= 13
    assert base.size_bytes > 10 * 2**20  # an initdb'ed cluster is tens of MB
    version = bases.CreateBaseVersion(bases_pb2.CreateBaseVersionRequest(parent="bases/shop"))
    assert version.name == "bases/shop/versions/2"
    branch = create(daemon, channel, parent="bases/shop/versions/1")
    assert branch.parent == "bases/shop/versions/1"
    assert branch.connection.database == "shop"
    assert fetch(branch.connection.dsn, "SELECT count(*) FROM t") == [(0,)]
    listed = bases.ListBases(bases_pb2.ListBasesRequest())
    assert {"bases/demo", "bases/shop"} <= {b.name for b in listed.bases}
    shop = bases.GetBase(bases_pb2.GetBaseRequest(name="bases/shop"))
    assert [(v.version, v.branch_count) for v in shop.versions] == [(1, 1), (2, 0)]
    with pytest.raises(grpc.RpcError) as info:
        bases.DeleteBase(bases_pb2.DeleteBaseRequest(name="bases/shop"))
    assert info.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert "branches/" in (info.value.details() or "")
    bases.DeleteBase(bases_pb2.DeleteBaseRequest(name="bases/shop", force=True), timeout=120)
    with pytest.raises(grpc.RpcError) as info:
        daemon.branches(channel).GetBranch(branches_pb2.GetBranchRequest(name=branch.name))
    assert info.value.code() == grpc.StatusCode.NOT_FOUND


def test_status_health_and_reflection(daemon: DaemonHandle, channel: grpc.Channel) -> None:
    """GetStatus reports version, driver and pool usage; health is SERVING for every
    service; reflection lists the services so generic tools work."""
    status = daemon_pb2_grpc.DaemonServiceStub(channel).GetStatus(daemon_pb2.GetStatusRequest())
    assert (status.version, status.driver, status.pool) == (__version__, "btrfs", daemon.pool_root)
    assert 0 < status.pool_used_bytes < status.pool_total_bytes
    assert (status.port_range_first, status.port_range_last) == daemon.ports
    assert status.base_count >= 1
    for service in ("", "cowbranchd.v1.BranchService", "cowbranchd.v1.BaseService"):
        assert daemon.health(service) == "SERVING"
    stub = reflection_pb2_grpc.ServerReflectionStub(channel)
    responses = stub.ServerReflectionInfo(
        iter([reflection_pb2.ServerReflectionRequest(list_services="")])
    )
    names = {s.name for r in responses for s in r.list_services_response.service}
    assert {
        "cowbranchd.v1.BranchService",
        "cowbranchd.v1.BaseService",
        "cowbranchd.v1.DaemonService",
        "grpc.health.v1.Health",
    } <= names
