"""Masking a copy of production: transforms run in order, each in one
transaction, a failure names the file and statement (or the command), and
after the scrub no original value is left in any file of the data directory."""

from __future__ import annotations

import os
import pwd
from collections.abc import Callable

import psycopg
import pytest

from cowbranchd import postgres
from cowbranchd.postgres import masking, sources
from tests.fix_postgres import (
    BIN_DIRS,
    OS_USER,
    PROD_DATABASE,
    PROD_EMAILS,
    PROD_SUPERUSER,
    Production,
)

MakeDir = Callable[[], str]

MASK = masking.SqlTransform(
    "01-mask.sql",
    b"UPDATE customers SET email = 'user' || id || '@masked.invalid', name = 'Name ' || id,\n"
    b"    phone = NULL, bio = 'masked bio';\n",
)


def files_holding(pgdata: str, needles: list[bytes]) -> dict[bytes, list[str]]:
    """Every needle found in any file under `pgdata`, with the files holding it."""
    found: dict[bytes, list[str]] = {}
    for dirpath, _dirs, files in os.walk(pgdata):
        for name in files:
            path = os.path.join(dirpath, name)
            with open(path, "rb") as f:
                data = f.read()
            for needle in needles:
                if needle in data:
                    found.setdefault(needle, []).append(os.path.relpath(path, pgdata))
    return found


@pytest.fixture
def copy(production: Production, postgres_dir: MakeDir) -> str:
    """A fresh pg_basebackup of production (its WAL and statistics included)."""
    target = postgres_dir()
    sources.from_server(production.replication_dsn, target, bin_dirs=BIN_DIRS, os_user=OS_USER)
    return target


def test_scrub_leaves_no_original_value_in_any_file(
    copy: str, pg_binaries: postgres.Binaries
) -> None:
    """Before the scrub the original emails are still in the files (heap,
    TOAST, indexes, WAL, statistics: the search can fail); after it, in none,
    while the masked values, fresh statistics and zero counters are there."""
    # Like many masking scripts, this one passes the originals through a work
    # table: WAL and that table's dead rows hold them too.
    work = [
        masking.SqlTransform("00-table.sql", b"CREATE TABLE work (email text);\n"),
        masking.SqlTransform(
            "01-work.sql", b"INSERT INTO work SELECT email FROM customers; DELETE FROM work;\n"
        ),
    ]
    with masking.staging(copy, pg_binaries, os_user=OS_USER, superuser=PROD_SUPERUSER) as stage:
        masking.run_sql_transforms(stage, [*work, MASK], database=PROD_DATABASE)
        with psycopg.connect(stage.dsn(PROD_DATABASE), autocommit=True) as conn:
            conn.execute("CHECKPOINT")  # the masked pages on disk too: old versions stay
        before = files_holding(copy, PROD_EMAILS)
        assert sorted(before) == sorted(PROD_EMAILS)
        assert any(f.startswith("pg_wal/") for f in before[PROD_EMAILS[0]])
        masking.scrub(stage)
    assert files_holding(copy, PROD_EMAILS) == {}
    postgres.check_clean_shutdown(copy, pg_binaries, os_user=OS_USER)
    assert not {"log", "backup_label.old", "backup_manifest"} & set(os.listdir(copy))
    # pg_resetwal left one fresh segment, and the cluster starts on it.
    assert len([n for n in os.listdir(os.path.join(copy, "pg_wal")) if len(n) == 24]) == 1
    with (
        masking.staging(copy, pg_binaries, os_user=OS_USER, superuser=PROD_SUPERUSER) as stage,
        psycopg.connect(stage.dsn(PROD_DATABASE), autocommit=True) as conn,
    ):
        assert conn.execute(
            "SELECT count(*), min(email), count(phone), min(bio) FROM customers"
        ).fetchone() == (200, "user100@masked.invalid", 0, "masked bio")
        assert conn.execute(
            "SELECT n_distinct FROM pg_stats WHERE tablename = 'customers' AND attname = 'email'"
        ).fetchone() == (-1.0,)
        counters = conn.execute(
            "SELECT relname, n_tup_ins, n_tup_upd, n_tup_del FROM pg_stat_user_tables "
            "ORDER BY relname"
        ).fetchall()
        # Every counter zero (production is shared: other tests may add tables).
        assert {"customers", "orders", "work"} <= {name for name, *_ in counters}
        assert [c for c in counters if c[1:] != (0, 0, 0)] == []


def test_a_failing_transform_names_file_and_statement_and_stops(
    copy: str, pg_binaries: postgres.Binaries
) -> None:
    """Files run in order, each in one transaction: the failing one is rolled
    back whole, later ones never run, and the error names file, line and the
    server's message."""
    files = [
        masking.SqlTransform("01-ok.sql", b"UPDATE customers SET phone = 'masked';\n"),
        masking.SqlTransform(
            "02-bad.sql",
            b"UPDATE customers SET name = 'gone';\nUPDATE customers\n   SET nosuchcol = 1;\n",
        ),
        masking.SqlTransform("03-never.sql", b"CREATE TABLE never (a int);\n"),
    ]
    with masking.staging(copy, pg_binaries, os_user=OS_USER, superuser=PROD_SUPERUSER) as stage:
        with pytest.raises(masking.TransformFailed) as failed:
            masking.run_sql_transforms(stage, files, database=PROD_DATABASE)
        assert "transform 02-bad.sql failed" in failed.value.message
        assert (
            '02-bad.sql:3: ERROR:  column "nosuchcol" of relation "customers" does not exist'
            in failed.value.message
        )
        assert "SET nosuchcol = 1" in failed.value.message  # the statement, quoted
        with psycopg.connect(stage.dsn(PROD_DATABASE), autocommit=True) as conn:
            assert conn.execute(
                "SELECT count(*) FILTER (WHERE phone = 'masked'), count(*) FILTER "
                "(WHERE name = 'gone'), to_regclass('never') FROM customers"
            ).fetchone() == (200, 0, None)


def test_a_transform_command_reaches_staging_unprivileged(
    copy: str, pg_binaries: postgres.Binaries
) -> None:
    """The command finds the staging database through PGHOST/PGPORT/PGUSER/
    PGDATABASE, runs as the cluster's OS user with no_new_privs; a failing one
    reports its exit code and stderr."""
    postgres_uid = pwd.getpwnam(OS_USER).pw_uid
    with masking.staging(copy, pg_binaries, os_user=OS_USER, superuser=PROD_SUPERUSER) as stage:
        masking.run_transform_command(
            stage,
            ["sh", "-c",
             f'test "$(id -u)" = {postgres_uid} && grep -q "^NoNewPrivs:.*1" /proc/self/status'
             f' && {pg_binaries.psql} -X -q -c "UPDATE customers SET bio = \'by command\'"'
             ' && test -n "$COWBRANCHD_STAGING_DSN"'],
            database=PROD_DATABASE,
        )
        with psycopg.connect(stage.dsn(PROD_DATABASE), autocommit=True) as conn:
            assert conn.execute("SELECT DISTINCT bio FROM customers").fetchall() == [
                ("by command",)
            ]
        with pytest.raises(masking.TransformFailed) as failed:
            masking.run_transform_command(
                stage, ["sh", "-c", "echo broken-tool-output >&2; exit 7"], database="shop"
            )
        assert failed.value.message == "transform command sh exited 7: broken-tool-output"
