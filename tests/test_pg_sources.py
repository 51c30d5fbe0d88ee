"""Imports from a running server (pg_basebackup) and from dumps (pg_restore,
psql) against a real "production" PostgreSQL: the result is a cleanly shut
down cluster holding production's rows, schema, constraints, triggers and
row-level security policies, and nothing of the source's replication set-up."""

from __future__ import annotations

import os
import subprocess
import threading
import time
from collections.abc import Callable, Iterator

import psutil
import psycopg
import pytest

from cowbranchd import postgres
from cowbranchd.errors import InvalidArgument, NotFound
from cowbranchd.ports import PortAllocator
from cowbranchd.postgres import masking, sources
from cowbranchd.postgres.tools import Cancelled, ImportFailed
from cowbranchd.run import as_user, clean_env, run
from tests.fix_postgres import (
    BIN_DIRS,
    OS_USER,
    PASSWORD,
    PROD_DATABASE,
    PROD_SUPERUSER,
    REPLICATION_PASSWORD,
    REPLICATION_USER,
    SUPERUSER,
    Production,
)

MakeDir = Callable[[], str]


def check_production_shape(pgdata: str, binaries: postgres.Binaries, superuser: str) -> None:
    """Start the import privately and see production's rows, constraints,
    trigger and policy at work."""
    with (
        masking.staging(pgdata, binaries, os_user=OS_USER, superuser=superuser) as stage,
        psycopg.connect(stage.dsn(PROD_DATABASE), autocommit=True) as conn,
    ):
            assert conn.execute("SELECT count(*), min(email) FROM customers").fetchone() == (
                200, "person100@prod-example.com"
            )
            assert conn.execute("SELECT sum(total) FROM orders").fetchone() == (30150,)
            with pytest.raises(psycopg.errors.CheckViolation):
                conn.execute("INSERT INTO customers (name, email) VALUES ('x', 'no-at-sign')")
            with pytest.raises(psycopg.errors.UniqueViolation):
                conn.execute(
                    "INSERT INTO customers (name, email) VALUES ('x', 'person1@prod-example.com')"
                )
            with pytest.raises(psycopg.errors.ForeignKeyViolation):
                conn.execute("INSERT INTO orders (customer_id, total) VALUES (9999, 1)")
            with conn.transaction(force_rollback=True):
                conn.execute("UPDATE customers SET phone = 'x' WHERE id = 5")
                row = conn.execute("SELECT updated_at IS NOT NULL FROM customers WHERE id = 5")
                assert row.fetchone() == (True,)  # the trigger ran
                conn.execute("SET ROLE app_user")
                conn.execute("SELECT set_config('app.tenant', 'acme', true)")
                # The policy: app_user sees its tenant's half only.
                assert conn.execute("SELECT count(*) FROM customers").fetchone() == (100,)
            policies = conn.execute("SELECT policyname FROM pg_policies").fetchall()
            assert policies == [("tenant_isolation",)]


def test_from_server_copies_production_into_a_cluster_of_its_own(
    production: Production, pg_binaries: postgres.Binaries, postgres_dir: MakeDir
) -> None:
    """pg_basebackup as a replication role gives a cleanly shut down cluster
    with production's data and no replication settings; the password was in
    no process's argv and is in no file of the copy."""
    target = postgres_dir()
    phases: list[tuple[str, int, int]] = []
    seen_in_argv: list[str] = []

    def progress(phase: str, done: int, total: int) -> None:
        phases.append((phase, done, total))
        for proc in psutil.process_iter(["cmdline"]):
            if REPLICATION_PASSWORD in " ".join(proc.info["cmdline"] or []):
                seen_in_argv.append(" ".join(proc.info["cmdline"]))

    imported = sources.from_server(
        production.replication_dsn, target, bin_dirs=BIN_DIRS, os_user=OS_USER, progress=progress
    )
    assert imported == sources.Imported(15, PROD_SUPERUSER, ("postgres", PROD_DATABASE))
    copy = [p for p in phases if p[0] == "copy"]
    assert copy and copy[-1][1] == copy[-1][2] > 0
    assert phases[-1] == ("recover", 0, 0)
    assert seen_in_argv == []
    postgres.check_clean_shutdown(target, pg_binaries, os_user=OS_USER)
    names = set(os.listdir(target))
    assert not names & {"standby.signal", "recovery.signal", "backup_label", "backup_label.old"}
    with open(os.path.join(target, "postgresql.auto.conf"), "rb") as f:
        assert f.read() == b""
    for dirpath, _dirs, files in os.walk(target):
        for name in files:
            with open(os.path.join(dirpath, name), "rb") as f:
                assert REPLICATION_PASSWORD.encode() not in f.read(), name
    check_production_shape(target, pg_binaries, PROD_SUPERUSER)


def test_from_server_refuses_dsn_keywords_that_name_files_or_sockets(postgres_dir: MakeDir) -> None:
    """A DSN may not name a passfile or a Unix socket (the tool could reach a branch's)."""
    with pytest.raises(InvalidArgument, match="passfile"):
        sources.from_server("host=127.0.0.1 passfile=/etc/shadow", postgres_dir(),
                            bin_dirs=BIN_DIRS, os_user=OS_USER)
    with pytest.raises(InvalidArgument, match="Unix-socket"):
        sources.from_server("host=/run/cowbranchd-pg/x port=5432", postgres_dir(),
                            bin_dirs=BIN_DIRS, os_user=OS_USER)


def test_from_server_with_a_wrong_password_names_the_failure(
    production: Production, postgres_dir: MakeDir
) -> None:
    """A refused login is ImportFailed with the server's message, not a hang."""
    dsn = production.replication_dsn.replace("s3cret", "wrong")
    with pytest.raises(ImportFailed, match="password authentication failed"):
        sources.from_server(dsn, postgres_dir(), bin_dirs=BIN_DIRS, os_user=OS_USER)


@pytest.fixture
def dumps(production: Production, postgres_dir: MakeDir) -> Iterator[Callable[[str], str]]:
    """pg_dump of production in a format (c, d, t, p), written as the postgres user."""
    where = postgres_dir()

    def dump(fmt: str) -> str:
        path = os.path.join(where, f"shop.{fmt}")
        run([f"{BIN_DIRS[0].format(version=15)}/pg_dump", f"--format={fmt}", "-f", path,
             "-d", postgres.dsn("127.0.0.1", production.port, PROD_SUPERUSER, "", PROD_DATABASE)],
            user=OS_USER, env={"PGPASSWORD": PASSWORD})
        return path

    yield dump


@pytest.mark.parametrize("fmt", ["c", "d", "t", "p"])
def test_from_dump_restores_production(
    fmt: str, dumps: Callable[[str], str], pg_binaries: postgres.Binaries, postgres_dir: MakeDir
) -> None:
    """Custom, directory and tar archives (pg_restore -j) and a plain SQL file
    (psql) restore production's shape into a fresh cluster."""
    path = dumps(fmt)
    info = sources.dump_info(path, bin_dirs=BIN_DIRS, os_user=OS_USER)
    expected_format = {"c": "custom", "d": "directory", "t": "tar", "p": "plain"}[fmt]
    assert (info.format, info.major) == (expected_format, 15)
    target = postgres_dir()
    phases: list[str] = []
    imported = sources.from_dump(
        path, target, bin_dirs=BIN_DIRS, os_user=OS_USER, superuser=SUPERUSER,
        password=PASSWORD, jobs=2, database=PROD_DATABASE, roles=["app_user"],
        progress=lambda phase, done, total: phases.append(phase),
    )
    assert imported == sources.Imported(15, SUPERUSER, ("postgres", PROD_DATABASE))
    assert phases[0] == "initdb" and phases[-1] == "analyze"
    postgres.check_clean_shutdown(target, pg_binaries, os_user=OS_USER)
    check_production_shape(target, pg_binaries, SUPERUSER)


def test_a_failing_restore_names_the_item(
    dumps: Callable[[str], str], postgres_dir: MakeDir
) -> None:
    """Without the role its policy names, pg_restore stops at that TOC entry
    and says so."""
    with pytest.raises(ImportFailed) as failed:
        sources.from_dump(dumps("c"), postgres_dir(), bin_dirs=BIN_DIRS, os_user=OS_USER,
                          superuser=SUPERUSER, password=PASSWORD)
    assert 'role "app_user" does not exist' in failed.value.message
    assert "POLICY" in failed.value.message


def write_as_postgres(path: str, text: str) -> None:
    run(["tee", path], input=text, user=OS_USER)


def test_a_failing_plain_file_names_file_line_and_statement(postgres_dir: MakeDir) -> None:
    """psql stops at the first error and reports the file, line and statement."""
    path = os.path.join(postgres_dir(), "broken.sql")
    write_as_postgres(path, "-- Dumped from database version 15.3\nCREATE TABLE t (a int);\n"
                            "INSERT INTO t VALUES (1);\nINSERT INTO t VALUES ('not a number');\n")
    with pytest.raises(ImportFailed) as failed:
        sources.from_dump(path, postgres_dir(), bin_dirs=BIN_DIRS, os_user=OS_USER,
                          superuser=SUPERUSER, password=PASSWORD)
    assert f"{path}:4: ERROR:  invalid input syntax for type integer" in failed.value.message


def test_a_dump_of_a_missing_major_version_is_refused(postgres_dir: MakeDir) -> None:
    """A dump from a PostgreSQL that is not installed is NotFound, naming both."""
    path = os.path.join(postgres_dir(), "old.sql")
    write_as_postgres(path, "-- Dumped from database version 11.2\nSELECT 1;\n")
    with pytest.raises(NotFound, match=r"PostgreSQL 11 is needed .*installed: 15"):
        sources.from_dump(path, postgres_dir(), bin_dirs=BIN_DIRS, os_user=OS_USER,
                          superuser=SUPERUSER, password=PASSWORD)


def test_a_cancelled_restore_leaves_nothing_running(postgres_dir: MakeDir) -> None:
    """Cancelling while psql waits on the server kills psql, and the private
    postmaster is stopped: no process of the import is left."""
    path = os.path.join(postgres_dir(), "slow.sql")
    write_as_postgres(path, "-- Dumped from database version 15.3\nSELECT pg_sleep(600);\n")
    target = postgres_dir()
    cancel = threading.Event()
    seen: list[psutil.Process] = []

    def progress(phase: str, done: int, total: int) -> None:
        if phase != "restore" or cancel.is_set():
            return
        for proc in psutil.process_iter(["name", "cmdline"]):
            cmdline = proc.info["cmdline"] or []
            if proc.info["name"] == "psql" and path in cmdline:
                seen.append(proc)
        postmaster = postgres.find_postmaster(target)
        children = psutil.Process(postmaster.pid).children() if postmaster else []
        backends = [p for p in children if "SELECT" in " ".join(p.cmdline())]
        if seen and backends:
            seen.extend(backends)
            cancel.set()

    with pytest.raises(Cancelled):
        sources.from_dump(path, target, bin_dirs=BIN_DIRS, os_user=OS_USER, superuser=SUPERUSER,
                          password=PASSWORD, progress=progress, cancel=cancel)
    assert seen
    assert [p.pid for p in seen if p.is_running() and p.status() != psutil.STATUS_ZOMBIE] == []
    assert postgres.find_postmaster(target) is None


def test_a_cancelled_server_import_leaves_no_pg_basebackup(
    production: Production, postgres_dir: MakeDir
) -> None:
    """Cancelling during the copy ends pg_basebackup and its WAL streamer (or,
    if the copy won the race, stops before recovery): Cancelled, and no
    process of the import is left."""
    target = postgres_dir()
    cancel = threading.Event()
    tools: list[psutil.Process] = []

    def progress(phase: str, done: int, total: int) -> None:
        if phase == "copy" and not cancel.is_set():
            tools.extend(p for p in psutil.process_iter(["name", "cmdline"])
                         if p.info["name"] == "pg_basebackup" and target in p.info["cmdline"])
            cancel.set()

    with pytest.raises(Cancelled):
        sources.from_server(production.replication_dsn, target, bin_dirs=BIN_DIRS,
                            os_user=OS_USER, progress=progress, cancel=cancel)
    assert [p.pid for p in tools if p.is_running() and p.status() != psutil.STATUS_ZOMBIE] == []
    assert postgres.find_postmaster(target) is None


def test_a_directory_archive_with_a_link_is_refused(
    dumps: Callable[[str], str], postgres_dir: MakeDir
) -> None:
    """A link inside a directory archive (to a file the import user may read)
    is refused before anything is restored."""
    path = dumps("d")
    data = sorted(n for n in os.listdir(path) if n.endswith(".dat.gz"))[0]
    run(["ln", "-sf", "/etc/passwd", os.path.join(path, data)], user=OS_USER)
    with pytest.raises(ImportFailed, match="holds only regular files"):
        sources.from_dump(path, postgres_dir(), bin_dirs=BIN_DIRS, os_user=OS_USER,
                          superuser=SUPERUSER, password=PASSWORD)


@pytest.fixture
def standby(
    production: Production, pg_binaries: postgres.Binaries, pg_ports: PortAllocator,
    postgres_dir: MakeDir,
) -> Iterator[int]:
    """A hot standby of production, streaming from it; yields its port."""
    pgdata = postgres_dir()
    run([f"{pg_binaries.bindir}/pg_basebackup", "-d",
         f"host=127.0.0.1 port={production.port} user={REPLICATION_USER}",
         "-D", pgdata, "-X", "stream", "-R", "--checkpoint=fast"],
        user=OS_USER, env={"PGPASSWORD": REPLICATION_PASSWORD})
    port = pg_ports.allocate()
    # Started by hand: postgres.start waits for "ready", a standby says "standby".
    proc = subprocess.Popen(
        [*as_user(OS_USER), pg_binaries.postgres, "-D", pgdata, "-c", f"port={port}",
         "-c", "listen_addresses=127.0.0.1", "-c", f"unix_socket_directories={pgdata}"],
        stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        env=clean_env(), start_new_session=True,
    )
    try:
        dsn = postgres.dsn("127.0.0.1", port, PROD_SUPERUSER, PASSWORD, PROD_DATABASE)
        deadline = time.monotonic() + 60
        while True:
            try:
                with psycopg.connect(dsn, connect_timeout=5) as conn:
                    assert conn.execute("SELECT pg_is_in_recovery()").fetchone() == (True,)
                break
            except psycopg.OperationalError:
                assert proc.poll() is None and time.monotonic() < deadline, "standby did not start"
                time.sleep(0.05)
        yield port
    finally:
        postgres.stop(proc.pid, fast_timeout=0)
        proc.wait()
        pg_ports.release(port)


def test_from_server_copies_a_standby(
    standby: int, pg_binaries: postgres.Binaries, postgres_dir: MakeDir
) -> None:
    """A standby is a source too: the copy is a primary of its own, with none
    of the standby's replication set-up (its primary_conninfo holds a password)."""
    target = postgres_dir()
    dsn = postgres.dsn("127.0.0.1", standby, REPLICATION_USER, REPLICATION_PASSWORD,
                       PROD_DATABASE)
    imported = sources.from_server(dsn, target, bin_dirs=BIN_DIRS, os_user=OS_USER)
    assert imported == sources.Imported(15, PROD_SUPERUSER, ("postgres", PROD_DATABASE))
    assert not {"standby.signal", "recovery.signal"} & set(os.listdir(target))
    for dirpath, _dirs, files in os.walk(target):
        for name in files:
            with open(os.path.join(dirpath, name), "rb") as f:
                assert REPLICATION_PASSWORD.encode() not in f.read(), name
    check_production_shape(target, pg_binaries, PROD_SUPERUSER)
