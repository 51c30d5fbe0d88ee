"""Warm branches: with `daemon.warm_branches`, creates from a base hand out an
already started clone under the requested id; everything else about the
branch is the same as a cold one. On btrfs and on zfs-fuse."""

from __future__ import annotations

import dataclasses
import json
import time
from collections.abc import Callable
from pathlib import Path

import grpc
import psycopg
import pytest

from cowbranchd import postgres
from cowbranchd.config import load_config
from cowbranchd.storage import btrfs as btrfs_module
from cowbranchd.v1 import bases_pb2, branches_pb2
from tests.fix_daemon import DaemonHandle
from tests.fix_storage import branch_volumes, volume_meta

Branch = branches_pb2.Branch


def events(d: DaemonHandle, name: str) -> list[dict[str, object]]:
    found = []
    for line in d.log_path.read_text().splitlines():
        if line.startswith("{"):
            event = json.loads(line)
            if event.get("event") == name:
                found.append(event)
    return found


def wait_warm(d: DaemonHandle, count: int) -> None:
    """Until `count` warm clones have been started in this daemon's life."""
    for _ in range(1200):
        if len(events(d, "warm_ready")) >= count:
            return
        time.sleep(0.05)
    pytest.fail(f"fewer than {count} warm clones after 60 s")


def volumes(d: DaemonHandle) -> set[str]:
    return branch_volumes(d)


def rows(dsn: str) -> list[int]:
    with psycopg.connect(dsn, autocommit=True) as conn:
        return [r[0] for r in conn.execute("SELECT id FROM items ORDER BY id")]


@pytest.fixture
def warm_daemon(pool_daemon_factory: Callable[..., DaemonHandle]) -> DaemonHandle:
    """A daemon of its own with two warm clones ready, on btrfs, then zfs-fuse."""
    d = pool_daemon_factory(start=False)
    d.sections = {"daemon": "warm_branches = 2"}
    d.start()
    wait_warm(d, 2)
    return d


def test_create_hands_out_a_warm_branch(warm_daemon: DaemonHandle) -> None:
    """A create from the base takes a warm clone: it is READY under the asked id,
    answers on its DSN and its socket, isolates writes, resets and deletes like
    any branch, and is never listed while warm."""
    d = warm_daemon
    with d.channel() as ch:
        stub = d.branches(ch)
        a = stub.CreateBranch(
            branches_pb2.CreateBranchRequest(
                parent="bases/demo", branch_id="fast", request_id="r1"
            ),
            timeout=120,
        )
        created = events(d, "branch_created")
        assert [(e["branch"], e["warm"]) for e in created] == [("fast", True)]
        assert a.state == Branch.READY and a.name == "branches/fast"
        assert a.parent == "bases/demo/versions/1"
        assert [b.name for b in stub.ListBranches(branches_pb2.ListBranchesRequest()).branches] == [
            "branches/fast"
        ]
        assert a.connection.socket_dir.endswith("/fast")
        with psycopg.connect(
            host=a.connection.socket_dir,
            port=a.connection.port,
            user=a.connection.user,
            dbname=a.connection.database,
        ) as conn:
            assert conn.execute("SELECT 1").fetchone() == (1,)
        execute = "INSERT INTO items VALUES (9, 'warm')"
        with psycopg.connect(a.connection.dsn, autocommit=True) as conn:
            conn.execute(execute)
        b = stub.CreateBranch(branches_pb2.CreateBranchRequest(parent="bases/demo"), timeout=120)
        assert rows(b.connection.dsn) == [1, 2, 3]
        assert rows(a.connection.dsn) == [1, 2, 3, 9]
        again = stub.CreateBranch(
            branches_pb2.CreateBranchRequest(
                parent="bases/demo", branch_id="fast", request_id="r1"
            ),
            timeout=120,
        )
        assert again.connection == a.connection
        # It lives on in the warm clone's volume (a live data directory is
        # never renamed), whose metadata now names the branch.
        metas = {v: volume_meta(d, v) for v in volumes(d)}
        fast = [v for v, meta in metas.items() if meta.get("id") == "fast"]
        assert len(fast) == 1 and fast[0].startswith("warm_")
        assert metas[fast[0]].get("warm", "") == ""
        pgdata = d.run_dir(fast[0])
        assert postgres.find_postmaster(str(pgdata)) is not None
        stub.ResetBranch(branches_pb2.ResetBranchRequest(name=a.name), timeout=120)
        assert rows(a.connection.dsn) == [1, 2, 3]
        # A reset clones a fresh volume (named after the branch) and drops the old.
        assert fast[0] not in volumes(d)
        assert postgres.find_postmaster(str(pgdata)) is None
        stub.DeleteBranch(branches_pb2.DeleteBranchRequest(name=a.name), timeout=120)
        stub.DeleteBranch(branches_pb2.DeleteBranchRequest(name=b.name), timeout=120)
    assert all(v.startswith("warm_") for v in volumes(d))  # only warm clones are left


def test_settings_go_cold_and_warm_clones_do_not_outlive_the_daemon(
    warm_daemon: DaemonHandle,
) -> None:
    """A create with its own postgres settings is made cold; warm clones are
    destroyed at shutdown and made anew at start, while real branches are
    adopted; deleting the base takes its warm clones with it."""
    d = warm_daemon
    with d.channel() as ch:
        stub = d.branches(ch)
        tuned = stub.CreateBranch(
            branches_pb2.CreateBranchRequest(
                parent="bases/demo", branch_id="tuned", postgres_settings={"work_mem": "8MB"}
            ),
            timeout=120,
        )
        assert [(e["branch"], e["warm"]) for e in events(d, "branch_created")] == [("tuned", False)]
        with psycopg.connect(tuned.connection.dsn) as conn:
            assert conn.execute("SHOW work_mem").fetchone() == ("8MB",)
    warm_before = {v for v in volumes(d) if v.startswith("warm_")}
    assert len(warm_before) == 2
    d.stop()
    assert volumes(d) == {"tuned"}
    d.start()
    wait_warm(d, 4)
    assert {v for v in volumes(d) if v.startswith("warm_")}.isdisjoint(warm_before)
    with d.channel() as ch:
        got = d.branches(ch).GetBranch(branches_pb2.GetBranchRequest(name=tuned.name))
        assert got.state == Branch.READY and got.connection == tuned.connection
        d.bases(ch).DeleteBase(
            bases_pb2.DeleteBaseRequest(name="bases/demo", force=True), timeout=120
        )
        with pytest.raises(grpc.RpcError) as info:
            d.branches(ch).GetBranch(branches_pb2.GetBranchRequest(name=tuned.name))
        assert info.value.code() == grpc.StatusCode.NOT_FOUND
    assert volumes(d) == set()
    assert d.postmasters() == []


def test_a_warm_branch_can_be_branched(warm_daemon: DaemonHandle) -> None:
    """A branch handed out warm takes writes and CHECKPOINT, and its child sees them."""
    d = warm_daemon
    with d.channel() as ch:
        stub = d.branches(ch)
        parent = stub.CreateBranch(
            branches_pb2.CreateBranchRequest(parent="bases/demo", branch_id="p"), timeout=120
        )
        assert [e["warm"] for e in events(d, "branch_created")] == [True]
        with psycopg.connect(parent.connection.dsn, autocommit=True) as conn:
            conn.execute("INSERT INTO items SELECT g, 'x' FROM generate_series(10, 1000) g")
        child = stub.CreateBranch(
            branches_pb2.CreateBranchRequest(parent=parent.name, branch_id="c"), timeout=120
        )
        assert len(rows(child.connection.dsn)) == 3 + 991


def test_a_hand_over_the_pool_lost_in_a_crash_comes_back_from_its_record(
    warm_daemon: DaemonHandle,
) -> None:
    """A warm hand-out whose volume metadata the pool had not flushed when the
    host went down (the volume reads as the warm clone again) is the branch
    again after a restart: same name, connection, labels and data; deleting it
    removes its hand-over record."""
    d = warm_daemon
    if d.driver != "btrfs":
        pytest.skip("only btrfs writes a hand-over's volume metadata without waiting for it")
    before = {v: volume_meta(d, v) for v in volumes(d)}
    with d.channel() as ch:
        kept = d.branches(ch).CreateBranch(
            branches_pb2.CreateBranchRequest(
                parent="bases/demo", branch_id="kept", labels={"team": "db"}
            ),
            timeout=120,
        )
    assert [e["warm"] for e in events(d, "branch_created")] == [True]
    with psycopg.connect(kept.connection.dsn, autocommit=True) as conn:
        conn.execute("INSERT INTO items VALUES (7, 'kept')")
    [volume] = [v for v in volumes(d) if volume_meta(d, v).get("id") == "kept"]
    record = d.workdir / "state" / "handovers" / f"{volume}.json"
    assert json.loads(record.read_text())["meta"]["id"] == "kept"
    d.kill()
    # What a power loss before the pool's commit leaves: the clone's metadata.
    sidecar = Path(d.pool_root) / "branches" / volume / btrfs_module.SIDECAR
    body = json.loads(sidecar.read_text())
    sidecar.write_text(json.dumps({**body, "meta": before[volume]}))
    assert volume_meta(d, volume)["warm"] == "1"
    d.start()
    with d.channel() as ch:
        stub = d.branches(ch)
        got = stub.GetBranch(branches_pb2.GetBranchRequest(name="branches/kept"))
        assert (got.state, got.connection, dict(got.labels)) == (
            Branch.READY,
            kept.connection,
            {"team": "db"},
        )
        assert rows(got.connection.dsn) == [1, 2, 3, 7]
        assert volume_meta(d, volume).get("warm", "") == ""
        stub.DeleteBranch(branches_pb2.DeleteBranchRequest(name=got.name), timeout=120)
    assert not record.exists()


def test_a_hand_over_cut_short_is_no_hand_over(warm_daemon: DaemonHandle) -> None:
    """Each warm clone has an empty hand-over record prepared; a crash that
    tore the record's write (the create had not answered) leaves no branch:
    start-up destroys the warm volumes and drops their records."""
    d = warm_daemon
    handovers = d.workdir / "state" / "handovers"
    warm = sorted(v for v in volumes(d) if volume_meta(d, v).get("warm") == "1")
    assert len(warm) == 2
    assert [(handovers / f"{v}.json").read_text() for v in warm] == ["", ""]
    d.kill()
    (handovers / f"{warm[0]}.json").write_text('{"volume": "' + warm[0] + '", "meta": {"id": "to')
    d.start()
    with d.channel() as ch:
        listed = d.branches(ch).ListBranches(branches_pb2.ListBranchesRequest()).branches
    assert list(listed) == []
    assert not set(warm) & volumes(d)
    assert not any((handovers / f"{v}.json").exists() for v in warm)


def test_a_warm_clone_whose_session_ended_is_still_handed_out(warm_daemon: DaemonHandle) -> None:
    """The daemon's open session to a warm clone may end meanwhile (a base's
    idle_session_timeout, an administrator): the hand-out opens a new one and
    the branch is READY, warm, with its own password."""
    d = warm_daemon
    with d.channel() as ch:
        base = d.bases(ch).GetBase(bases_pb2.GetBaseRequest(name="bases/demo"))
    ended = 0
    for volume in volumes(d):
        with psycopg.connect(
            host=str(d.workdir / "pg" / volume),
            port=int(volume_meta(d, volume)["port"]),
            user=base.user,
            dbname=base.database,
            autocommit=True,
        ) as conn:
            ended += len(
                conn.execute(
                    "SELECT pg_terminate_backend(pid) FROM pg_stat_activity"
                    " WHERE pid <> pg_backend_pid() AND backend_type = 'client backend'"
                ).fetchall()
            )
    assert ended == 2  # one session per warm clone
    with d.channel() as ch:
        got = d.branches(ch).CreateBranch(
            branches_pb2.CreateBranchRequest(parent="bases/demo", branch_id="after-loss"),
            timeout=120,
        )
    assert [(e["branch"], e["warm"]) for e in events(d, "branch_created")] == [
        ("after-loss", True)
    ]
    assert [e["branch"] for e in events(d, "warm_session_lost")] == ["after-loss"]
    assert rows(got.connection.dsn) == [1, 2, 3]


def test_the_quickstart_runs_with_warm_branches() -> None:
    """`bash .ci/dev daemon` passes .ci/quickstart.toml: warm branches on, and
    otherwise the built-in defaults (the loop-file pool, the demo base)."""
    quickstart = load_config(Path(__file__).resolve().parent.parent / ".ci" / "quickstart.toml")
    defaults = load_config(None)
    assert quickstart.daemon.warm_branches == 2
    assert defaults.daemon.warm_branches == 0
    assert dataclasses.replace(quickstart.daemon, warm_branches=0) == defaults.daemon
    assert (quickstart.storage, quickstart.demo) == (defaults.storage, defaults.demo)
