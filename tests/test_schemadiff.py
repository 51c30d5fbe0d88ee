"""What a branch changed: normalised schema dumps are deterministic, their
diff shows a migration, and row counters count inserts, updates and deletes."""

from __future__ import annotations

import time

import psycopg

from cowbranchd import postgres
from cowbranchd.postgres import schemadiff
from tests.fix_postgres import OS_USER, PgDir, StartPg

COUNTER_WAIT_S = 30.0  # a bound, not a timing assert: counters arrive as sessions end


def test_schema_dump_is_deterministic_and_free_of_noise(
    pg_dir: PgDir, start_pg: StartPg, pg_binaries: postgres.Binaries
) -> None:
    """Two dumps of the same schema are equal and hold no comments, SET lines
    or restrict guards, one section per database."""
    running = start_pg(pg_dir)
    first = schemadiff.schema_dump(running.socket_dsn, binaries=pg_binaries, os_user=OS_USER)
    second = schemadiff.schema_dump(running.socket_dsn, binaries=pg_binaries, os_user=OS_USER)
    assert first == second
    lines = first.splitlines()
    assert [line for line in lines if line.startswith("-- ")] == [
        "-- database: app",
        "-- database: postgres",
    ]
    assert not [line for line in lines if line.startswith(("SET ", "\\", "SELECT pg_catalog"))]
    assert "\n\n\n" not in first
    assert "CREATE TABLE public.greeting (\n    word text\n);" in first


def test_diff_after_a_migration_shows_the_new_column(
    pg_dir: PgDir, start_pg: StartPg, pg_binaries: postgres.Binaries
) -> None:
    """ALTER TABLE ... ADD COLUMN shows as exactly that column added."""
    running = start_pg(pg_dir)
    before = schemadiff.schema_dump(running.socket_dsn, binaries=pg_binaries, os_user=OS_USER)
    with psycopg.connect(running.socket_dsn, autocommit=True) as conn:
        conn.execute("ALTER TABLE greeting ADD COLUMN lang text NOT NULL DEFAULT 'en'")
    after = schemadiff.schema_dump(running.socket_dsn, binaries=pg_binaries, os_user=OS_USER)
    diff = schemadiff.unified_diff(before, after, old_name="bases/app", new_name="branches/b1")
    changed = [line for line in diff.splitlines() if line[:1] in "+-"]
    assert changed == [
        "--- bases/app",
        "+++ branches/b1",
        "-    word text",
        "+    word text,",
        "+    lang text DEFAULT 'en'::text NOT NULL",
    ]
    assert schemadiff.unified_diff(after, after) == ""


def test_row_changes_count_inserts_updates_and_deletes(
    pg_dir: PgDir, start_pg: StartPg
) -> None:
    """After a stats reset, the counters say what each table went through."""
    running = start_pg(pg_dir)
    with psycopg.connect(running.socket_dsn, autocommit=True) as conn:
        conn.execute("SELECT pg_stat_reset()")
        assert schemadiff.row_changes(conn) == []
    with psycopg.connect(running.socket_dsn, autocommit=True) as conn:
        conn.execute("CREATE TABLE other (n int)")
        conn.execute("INSERT INTO greeting SELECT 'w' || g FROM generate_series(1, 3) g")
        conn.execute("UPDATE greeting SET word = upper(word) WHERE word IN ('w1', 'w2')")
        conn.execute("DELETE FROM greeting WHERE word = 'hello'")
    expected = [schemadiff.RowChange("public", "greeting", 3, 2, 1)]
    deadline = time.monotonic() + COUNTER_WAIT_S
    with psycopg.connect(running.socket_dsn, autocommit=True) as conn:
        while (changes := schemadiff.row_changes(conn)) != expected:
            assert time.monotonic() < deadline, changes  # the writer's counters never came
            time.sleep(0.05)
