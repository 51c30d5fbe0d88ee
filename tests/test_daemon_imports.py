"""Production-grade bases through the daemon: ImportBase from a live server
(pg_basebackup) and from a dump (pg_restore), masked by a transform, sealed
with no trace of the originals, long-running (get, wait, cancel), with
provenance, and refreshed into the next version while older branches keep
theirs. The "production" server is a real PostgreSQL of the test's own."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import psutil
import psycopg
import pytest

from cowbranchd import postgres
from cowbranchd.v1 import (
    bases_pb2,
    branches_pb2,
    operations_pb2,
    operations_pb2_grpc,
)
from tests.fix_daemon import DaemonFactory, DaemonHandle
from tests.fix_postgres import OS_USER, PROD_EMAILS, Production

MASK_SQL = """
UPDATE customers SET
    name = 'Customer ' || id,
    email = 'user' || id || '@example.invalid',
    phone = NULL,
    bio = 'masked';
"""

pytestmark = pytest.mark.btrfs


@pytest.fixture(scope="module")
def importing_daemon(daemon_factory: DaemonFactory) -> Iterator[DaemonHandle]:
    d = daemon_factory(start=False)
    d.extra_config = "enabled = false\n"  # [demo]: no demo base
    d.start()
    yield d
    d.cleanup()


def ops(ch: grpc.Channel) -> operations_pb2_grpc.OperationServiceStub:
    return operations_pb2_grpc.OperationServiceStub(ch)


def run_import(
    d: DaemonHandle, request: bases_pb2.ImportBaseRequest, timeout: float = 300
) -> operations_pb2.Operation:
    """ImportBase, then WaitOperation until it is done."""
    with d.channel() as ch:
        op = d.bases(ch).ImportBase(request, timeout=30)
        assert op.name.startswith("operations/") and op.target == f"bases/{request.base_id}"
        end = time.monotonic() + timeout
        while not op.done and time.monotonic() < end:
            op = ops(ch).WaitOperation(
                operations_pb2.WaitOperationRequest(name=op.name), timeout=90
            )
    assert op.done, op
    return op


def files_holding(root: Path, needles: list[bytes]) -> list[str]:
    """Every file under `root` (links not followed) holding any of `needles`."""
    found = []
    for dirpath, _dirs, files in os.walk(root):
        for name in files:
            path = os.path.join(dirpath, name)
            if os.path.islink(path):
                continue
            data = Path(path).read_bytes()
            if any(needle in data for needle in needles):
                found.append(path)
    return found


def branch_of(d: DaemonHandle, parent: str, branch_id: str) -> branches_pb2.Branch:
    with d.channel() as ch:
        return d.branches(ch).CreateBranch(
            branches_pb2.CreateBranchRequest(parent=parent, branch_id=branch_id), timeout=120
        )


def test_import_from_server_masks_and_leaves_no_trace(
    importing_daemon: DaemonHandle, production: Production
) -> None:
    """pg_basebackup of production, masked by a SQL transform: a branch holds
    production's rows, constraints, trigger and RLS policy with masked
    values; no file of the sealed version holds an original email (the same
    search finds them in production's own files: it can fail); the
    version's provenance names the source without its password and the
    transform by hash; a refresh after production changed makes version 2
    with the new rows while a branch of version 1 keeps its data."""
    d = importing_daemon
    assert files_holding(Path(production.pgdata), PROD_EMAILS)  # the search can find them
    op = run_import(
        d,
        bases_pb2.ImportBaseRequest(
            base_id="prod",
            from_server=production.replication_dsn,
            transforms=[bases_pb2.Transform(name="mask.sql", sql=MASK_SQL)],
        ),
    )
    assert (op.error_code, op.error_message, op.result) == (0, "", "bases/prod/versions/1"), (
        op.error_message
    )
    volume = Path(d.pool_root) / "bases" / "prod@v1"
    assert volume.is_dir()
    assert files_holding(volume, PROD_EMAILS) == []
    branch = branch_of(d, "bases/prod", "prod-1")
    with psycopg.connect(branch.connection.dsn) as conn:
        assert conn.execute("SELECT count(*) FROM customers").fetchone() == (200,)
        assert conn.execute("SELECT count(*) FROM orders").fetchone() == (200,)
        emails = {r[0] for r in conn.execute("SELECT email FROM customers")}
        assert all(e.endswith("@example.invalid") for e in emails)
        assert conn.execute(
            "SELECT count(*) FROM pg_policies WHERE policyname = 'tenant_isolation'"
        ).fetchone() == (1,)
        assert conn.execute(
            "SELECT count(*) FROM pg_trigger WHERE tgname = 'customers_touch'"
        ).fetchone() == (1,)
        with pytest.raises(psycopg.errors.CheckViolation):
            conn.execute("INSERT INTO orders (customer_id, total) VALUES (1, -1)")
    with d.channel() as ch:
        base = d.bases(ch).GetBase(bases_pb2.GetBaseRequest(name="bases/prod"))
    facts = base.versions[0].provenance
    assert facts.source_kind == "server"
    assert "replicator" in facts.source and "s3cret" not in facts.source
    assert facts.transforms[0].startswith("mask.sql sha256:")
    assert facts.pg_version == 15 and facts.bytes > 0
    assert base.database == "shop"  # production's only database of its own

    with psycopg.connect(production.dsn, autocommit=True) as conn:
        conn.execute(
            "INSERT INTO customers (name, email) VALUES ('New', 'new-person@prod-example.com')"
        )
    with d.channel() as ch:
        refresh = d.bases(ch).RefreshBase(bases_pb2.RefreshBaseRequest(name="bases/prod"))
        while not refresh.done:
            refresh = ops(ch).WaitOperation(
                operations_pb2.WaitOperationRequest(name=refresh.name), timeout=90
            )
    assert (refresh.error_message, refresh.result) == ("", "bases/prod/versions/2")
    assert files_holding(Path(d.pool_root) / "bases" / "prod@v2", [b"new-person@prod"]) == []
    newer = branch_of(d, "bases/prod", "prod-2")
    with psycopg.connect(newer.connection.dsn) as conn:
        assert conn.execute("SELECT count(*) FROM customers").fetchone() == (201,)
    with psycopg.connect(branch.connection.dsn) as conn:
        assert conn.execute("SELECT count(*) FROM customers").fetchone() == (200,)
    with psycopg.connect(production.dsn, autocommit=True) as conn:
        conn.execute("DELETE FROM customers WHERE email = 'new-person@prod-example.com'")


def test_import_from_dump(importing_daemon: DaemonHandle, production: Production) -> None:
    """A pg_dump custom archive under an import root, restored by pg_restore:
    a branch holds production's rows and schema."""
    d = importing_daemon
    root = tempfile.mkdtemp(prefix="cbt-dump-", dir="/tmp")
    os.chmod(root, 0o755)
    dump = os.path.join(root, "prod.dump")
    try:
        binaries = postgres.find_binaries(15, ["/usr/lib/postgresql/{version}/bin"])
        subprocess.run(
            [os.path.join(binaries.bindir, "pg_dump"), "-Fc", "-f", dump, production.dsn],
            check=True,
            capture_output=True,
        )
        os.chmod(dump, 0o644)
        # app_user is named only by a policy and a grant: a dump does not carry
        # roles, so the request names it (roles also lets branches ask for it).
        request = bases_pb2.ImportBaseRequest(
            base_id="from-dump", from_dump=dump, jobs=2, roles=["app_user"]
        )
        op = run_import(d, request)
        assert (op.error_message, op.result) == ("", "bases/from-dump/versions/1")
        branch = branch_of(d, "bases/from-dump", "dump-1")
        with psycopg.connect(branch.connection.dsn) as conn:
            assert conn.execute("SELECT count(*) FROM customers").fetchone() == (200,)
            assert conn.execute("SELECT count(*) FROM pg_policies").fetchone() == (1,)
    finally:
        shutil.rmtree(root, ignore_errors=True)


def staging_postmasters() -> list[int]:
    """Postgres processes of a staging cluster (its socket directory is a
    private `cowbranchd-staging-*` scratch directory)."""
    return [
        p.pid
        for p in psutil.process_iter(["name", "cmdline", "username"])
        if p.info["name"] == "postgres"
        and p.info["username"] == OS_USER
        and "cowbranchd-staging" in " ".join(p.info["cmdline"] or [])
    ]


def test_failing_transform_seals_nothing_and_names_the_statement(
    importing_daemon: DaemonHandle, production: Production
) -> None:
    """A transform that fails rolls back, seals nothing (no base, no volume)
    and says which file and statement failed."""
    d = importing_daemon
    op = run_import(
        d,
        bases_pb2.ImportBaseRequest(
            base_id="broken",
            from_server=production.replication_dsn,
            transforms=[
                bases_pb2.Transform(name="ok.sql", sql="UPDATE customers SET phone = NULL;"),
                bases_pb2.Transform(name="bad.sql", sql="SELECT 1;\nUPDATE nosuch SET x = 1;"),
            ],
        ),
    )
    assert op.error_code == grpc.StatusCode.FAILED_PRECONDITION.value[0]
    assert "bad.sql" in op.error_message and "nosuch" in op.error_message
    assert not (Path(d.pool_root) / "bases" / "broken").exists()
    assert staging_postmasters() == []
    with d.channel() as ch, pytest.raises(grpc.RpcError) as info:
        d.bases(ch).GetBase(bases_pb2.GetBaseRequest(name="bases/broken"))
    assert info.value.code() == grpc.StatusCode.NOT_FOUND


def test_cancelled_import_leaves_nothing(
    importing_daemon: DaemonHandle, production: Production
) -> None:
    """Cancelled while its transform command runs, an import ends CANCELLED
    with no base, no volume, no staging postmaster and no command left."""
    d = importing_daemon
    marker = f"{100 + os.getpid() % 1000}.5"  # sleep's argument: ours alone
    with d.channel() as ch:
        op = d.bases(ch).ImportBase(
            bases_pb2.ImportBaseRequest(
                base_id="cancelled",
                from_server=production.replication_dsn,
                transform_command=["/bin/sleep", marker],
            ),
            timeout=30,
        )
        end = time.monotonic() + 120
        while op.phase != "transforming" and not op.done and time.monotonic() < end:
            time.sleep(0.1)
            op = ops(ch).GetOperation(operations_pb2.GetOperationRequest(name=op.name))
        assert op.phase == "transforming", op
        ops(ch).CancelOperation(operations_pb2.CancelOperationRequest(name=op.name))
        op = ops(ch).WaitOperation(operations_pb2.WaitOperationRequest(name=op.name), timeout=90)
    assert op.done and op.error_code == grpc.StatusCode.CANCELLED.value[0]
    assert not (Path(d.pool_root) / "bases" / "cancelled").exists()
    sleepers = [
        p for p in psutil.process_iter(["cmdline"]) if p.info["cmdline"] == ["/bin/sleep", marker]
    ]
    assert sleepers == []
    assert staging_postmasters() == []


def test_import_requests_are_checked(importing_daemon: DaemonHandle) -> None:
    """Bad requests are refused at once, naming what is wrong."""
    d = importing_daemon
    with d.channel() as ch:
        stub = d.bases(ch)
        cases = {
            "source": bases_pb2.ImportBaseRequest(base_id="x"),
            "base_id": bases_pb2.ImportBaseRequest(base_id="Bad Id", from_dump="/tmp/x"),
            "from_dump": bases_pb2.ImportBaseRequest(base_id="x", from_dump="/etc/passwd"),
            "jobs": bases_pb2.ImportBaseRequest(base_id="x", from_dump="/tmp/x", jobs=1000),
        }
        for field, request in cases.items():
            with pytest.raises(grpc.RpcError) as info:
                stub.ImportBase(request)
            assert info.value.code() in (
                grpc.StatusCode.INVALID_ARGUMENT,
                grpc.StatusCode.PERMISSION_DENIED,
            ), field
            assert field in (info.value.details() or ""), (field, info.value.details())
        with pytest.raises(grpc.RpcError) as info:
            stub.RefreshBase(bases_pb2.RefreshBaseRequest(name="bases/nosuch"))
        assert info.value.code() == grpc.StatusCode.NOT_FOUND


def test_diff_shows_a_migration_and_row_counts(importing_daemon: DaemonHandle) -> None:
    """After a migration and some writes on a branch, DiffBranch shows the new
    column in a unified schema diff and the rows inserted, updated and
    deleted per table, not what the parent held before; cowbranchctl diff
    prints both."""
    d = importing_daemon
    with d.channel() as ch:
        d.bases(ch).CreateBase(
            bases_pb2.CreateBaseRequest(
                base_id="shop",
                initdb=bases_pb2.InitdbSource(
                    database="shop",
                    init_sql="CREATE TABLE items (id int PRIMARY KEY, name text);"
                    "INSERT INTO items SELECT g, 'item ' || g FROM generate_series(1, 10) g;",
                ),
            ),
            timeout=120,
        )
    branch = branch_of(d, "bases/shop", "migrated")
    with psycopg.connect(branch.connection.dsn, autocommit=True) as conn:
        conn.execute("ALTER TABLE items ADD COLUMN price numeric")
        conn.execute("INSERT INTO items VALUES (11, 'new', 1), (12, 'newer', 2)")
        conn.execute("UPDATE items SET price = 0 WHERE id <= 3")
        conn.execute("DELETE FROM items WHERE id = 10")
    end = time.monotonic() + 30  # counters reach the stats a moment after commit
    while True:
        with d.channel() as ch:
            diff = d.branches(ch).DiffBranch(
                branches_pb2.DiffBranchRequest(name="branches/migrated"), timeout=120
            )
        changes = {(t.schema, t.table): (t.inserted, t.updated, t.deleted) for t in diff.tables}
        if changes.get(("public", "items")) == (2, 3, 1) or time.monotonic() > end:
            break
        time.sleep(0.2)
    assert diff.parent == "bases/shop/versions/1"
    assert "+    price numeric" in diff.schema_diff
    assert diff.schema_diff.startswith("--- bases/shop/versions/1")
    assert changes == {("public", "items"): (2, 3, 1)}
    result = subprocess.run(
        [
            str(Path(sys.executable).parent / "cowbranchctl"),
            "--address",
            d.address,
            "diff",
            "migrated",
        ],
        capture_output=True,
        text=True,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    assert "price numeric" in result.stdout and "shop.public.items" in result.stdout


def test_scheduled_refresh_and_retention(
    daemon_factory: DaemonFactory, production: Production
) -> None:
    """With `imports.refresh = { nightly = "10s" }` the daemon replays the
    recipe on its own; with `keep_versions = 2` versions past the newest two
    go, but not one a branch still uses: it goes once that branch is deleted."""
    d = daemon_factory(start=False)
    d.extra_config = (
        'enabled = false\n\n[imports]\nkeep_versions = 2\nrefresh = { nightly = "10s" }\n'
    )
    d.start()
    try:
        assert (
            run_import(
                d,
                bases_pb2.ImportBaseRequest(
                    base_id="nightly", from_server=production.replication_dsn
                ),
            ).result
            == "bases/nightly/versions/1"
        )
        pinned = branch_of(d, "bases/nightly/versions/1", "pinned")

        def versions() -> list[int]:
            with d.channel() as ch:
                base = d.bases(ch).GetBase(bases_pb2.GetBaseRequest(name="bases/nightly"))
            return [v.version for v in base.versions]

        end = time.monotonic() + 180
        while max(versions()) < 3 and time.monotonic() < end:
            time.sleep(0.5)
        assert versions() == [1, 2, 3]  # 1 is kept: "pinned" uses it
        with d.channel() as ch:
            d.branches(ch).DeleteBranch(branches_pb2.DeleteBranchRequest(name=pinned.name))
        end = time.monotonic() + 60
        while 1 in versions() and time.monotonic() < end:
            time.sleep(0.2)
        assert 1 not in versions() and len(versions()) <= 3
        assert not (Path(d.pool_root) / "bases" / "nightly@v1").exists()
    finally:
        d.cleanup()


def test_ctl_import_shows_phases_and_ctrl_c_cancels(
    importing_daemon: DaemonHandle, production: Production, tmp_path: Path
) -> None:
    """`cowbranchctl base create --from-server --transform` prints each phase
    as it goes and exits 0 with the new version; Ctrl-C (SIGINT) during a
    transform command cancels the operation: exit 130, and no base, volume,
    staging postmaster or command is left."""
    d = importing_daemon
    ctl = str(Path(sys.executable).parent / "cowbranchctl")
    mask = tmp_path / "mask.sql"
    mask.write_text(MASK_SQL)
    done = subprocess.run(
        [
            ctl,
            "--address",
            d.address,
            "--timeout",
            "300",
            "base",
            "create",
            "via-ctl",
            "--from-server",
            production.replication_dsn,
            "--transform",
            str(mask),
        ],
        capture_output=True,
        text=True,
        check=False,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "created bases/via-ctl/versions/1"
    # Not a terminal: one line per phase seen (polled every second, so a quick
    # phase may pass unseen).
    phases = [line.split()[0] for line in done.stderr.splitlines() if line.strip()]
    known = {"queued", "copying", "copy", "recover", "transforming", "scrubbing", "sealing"}
    assert phases and set(phases) <= known, done.stderr
    assert production.replication_dsn.split("password=")[-1] not in done.stderr

    marker = f"{200 + os.getpid() % 1000}.5"
    proc = subprocess.Popen(
        [
            ctl,
            "--address",
            d.address,
            "base",
            "create",
            "ctl-cancelled",
            "--from-server",
            production.replication_dsn,
            "--transform-cmd",
            "/bin/sleep",
            marker,
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    end = time.monotonic() + 120
    while time.monotonic() < end and not any(
        p.info["cmdline"] == ["/bin/sleep", marker] for p in psutil.process_iter(["cmdline"])
    ):
        time.sleep(0.1)
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, (out, err)
    assert "cancelling operations/" in err
    assert not (Path(d.pool_root) / "bases" / "ctl-cancelled").exists()
    assert [
        p for p in psutil.process_iter(["cmdline"]) if p.info["cmdline"] == ["/bin/sleep", marker]
    ] == []
    assert staging_postmasters() == []
