"""Point in time: a base that follows a live server (a standby on the pool,
snapshot as it replays) gives branches of that server as it was at a time
`at`; only admins and the tenants the config names may branch it, and
DeleteBase stops its standby. The followed server is a real PostgreSQL of
the test's own ("production")."""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path

import grpc
import psutil
import psycopg
import pytest
from google.protobuf import timestamp_pb2

from cowbranchd import postgres
from cowbranchd.v1 import bases_pb2, branches_pb2
from tests.fix_daemon import DaemonFactory, DaemonHandle, code_of
from tests.fix_postgres import PROD_SUPERUSER, Production
from tests.test_daemon_imports import run_import
from tests.test_owners import TOKENS, as_tenant, write_token

pytestmark = pytest.mark.btrfs

ALICE, BOB = as_tenant(TOKENS["alice"]), as_tenant(TOKENS["bob"])


@pytest.fixture(scope="module")
def follow_daemon(daemon_factory: DaemonFactory) -> Iterator[DaemonHandle]:
    """A daemon that snapshots followed bases every 2s and lets alice (not
    bob) branch them."""
    d = daemon_factory(start=False)
    tokens_dir = d.workdir / "tokens"
    tokens_dir.mkdir(mode=0o700)
    for tenant, token in TOKENS.items():
        write_token(tokens_dir, tenant, token)
    d.extra_config = f"""enabled = false
[tenants]
tokens_dir = "{tokens_dir}"
[imports]
follow_snapshot_interval = "2s"
follow_branchers = ["alice"]
"""
    d.sections = {"daemon": "warm_branches = 1"}
    d.start()
    yield d
    d.cleanup()


def _rows(dsn: str) -> set[str]:
    with psycopg.connect(dsn) as conn:
        return {r[0] for r in conn.execute("SELECT note FROM follow_marks")}


def _standby_replayed(d: DaemonHandle, base: str, since: datetime) -> bool:
    socket_dir = d.workdir / "pg" / f"follow.{base}"
    dsn = postgres.dsn(str(socket_dir), 5432, PROD_SUPERUSER, "", "shop")
    with psycopg.connect(dsn) as conn:
        row = conn.execute("SELECT pg_last_xact_replay_timestamp()").fetchone()
    return row is not None and row[0] is not None and row[0] >= since


def _standby_pids(d: DaemonHandle, base: str) -> list[int]:
    found = []
    for proc in psutil.process_iter(["name", "cmdline"]):
        cmdline = proc.info["cmdline"] or []
        if proc.info["name"] == "postgres" and any(
            str(d.pool_root) in arg and f"bases/{base}" in arg for arg in cmdline
        ):
            found.append(proc.pid)
    return found


def _warm_clones_of(d: DaemonHandle, base: str) -> list[Path]:
    """Warm clones (volumes `warm_*`) cloned from a version of `base`."""
    found = []
    for volume in (Path(d.pool_root) / "branches").glob("warm_*"):
        with contextlib.suppress(OSError):  # one going away meanwhile
            if f'"bases/{base}@v' in (volume / "cowbranch.json").read_text():
                found.append(volume)
    return found


def _versions(d: DaemonHandle, base: str) -> list[int]:
    with d.channel() as ch:
        got = d.bases(ch).GetBase(bases_pb2.GetBaseRequest(name=f"bases/{base}"), timeout=30)
    return [v.version for v in got.versions]


def test_branch_at_a_time_holds_what_was_committed_before_it(
    follow_daemon: DaemonHandle, production: Production
) -> None:
    """Rows committed on the followed server before T are in a branch at=T,
    rows after T are not; a branch without `at` (now) holds both; bob, not
    named in imports.follow_branchers, is refused; DeleteBase stops the
    standby."""
    d = follow_daemon
    with psycopg.connect(production.dsn, autocommit=True) as conn:
        conn.execute("CREATE TABLE IF NOT EXISTS follow_marks (note text)")
        conn.execute("TRUNCATE follow_marks")
    op = run_import(
        d, bases_pb2.ImportBaseRequest(base_id="live", follow=production.replication_dsn)
    )
    assert not op.error_message, op.error_message
    assert op.result == "bases/live/versions/1"
    with psycopg.connect(production.dsn, autocommit=True) as conn:
        conn.execute("INSERT INTO follow_marks VALUES ('before')")
        time.sleep(0.5)
        at = conn.execute("SELECT clock_timestamp()").fetchone()
        assert at is not None
        time.sleep(0.5)
        # Read before the insert: its commit, the newest the standby can
        # replay while nothing else commits, is later than this.
        last = conn.execute("SELECT clock_timestamp()").fetchone()
        conn.execute("INSERT INTO follow_marks VALUES ('after')")
    assert last is not None
    end = time.monotonic() + 60
    while not _standby_replayed(d, "live", last[0]) or len(_versions(d, "live")) < 2:
        assert time.monotonic() < end, "the standby did not replay and snapshot in time"
        time.sleep(0.2)

    # The warm pool keeps started clones of other bases, never of a followed
    # one (its branches recover to a time): a plain base gets one meanwhile.
    with d.channel() as ch:
        d.bases(ch).CreateBase(bases_pb2.CreateBaseRequest(base_id="plain"), timeout=120)
    end = time.monotonic() + 60
    while not _warm_clones_of(d, "plain") and time.monotonic() < end:
        time.sleep(0.2)
    assert _warm_clones_of(d, "plain") and _warm_clones_of(d, "live") == []

    stamp = timestamp_pb2.Timestamp()
    stamp.FromDatetime(at[0].astimezone(UTC))
    with d.channel() as ch:
        then = d.branches(ch).CreateBranch(
            branches_pb2.CreateBranchRequest(parent="bases/live", branch_id="live-then", at=stamp),
            timeout=120,
        )
        current = d.branches(ch).CreateBranch(
            branches_pb2.CreateBranchRequest(parent="bases/live", branch_id="live-now"),
            timeout=120,
        )
        assert _rows(then.connection.dsn) == {"before"}
        assert _rows(current.connection.dsn) == {"before", "after"}

        refused = code_of(
            d.branches(ch).CreateBranch,
            branches_pb2.CreateBranchRequest(parent="bases/live", branch_id="bob-live"),
            metadata=BOB,
        )
        assert refused[0] is grpc.StatusCode.PERMISSION_DENIED, refused
        allowed = d.branches(ch).CreateBranch(
            branches_pb2.CreateBranchRequest(parent="bases/live", branch_id="alice-live"),
            timeout=120,
            metadata=ALICE,
        )
        assert _rows(allowed.connection.dsn) == {"before", "after"}

        future = timestamp_pb2.Timestamp()
        future.FromDatetime(datetime(2999, 1, 1, tzinfo=UTC))
        code, details = code_of(
            d.branches(ch).CreateBranch,
            branches_pb2.CreateBranchRequest(parent="bases/live", at=future),
        )
        assert code is grpc.StatusCode.INVALID_ARGUMENT and "covers" in details, details

        assert _standby_pids(d, "live")
        d.bases(ch).DeleteBase(
            bases_pb2.DeleteBaseRequest(name="bases/live", force=True), timeout=120
        )
    assert _standby_pids(d, "live") == []
    with psycopg.connect(production.dsn, autocommit=True) as conn:
        conn.execute("DROP TABLE follow_marks")  # production is shared by the session
