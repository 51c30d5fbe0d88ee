"""Masking a staging cluster: the caller's transforms, then a scrub after which
no original value is left in any file of the data directory.

A staging cluster (`staging`) is a postmaster on a private socket directory
with no TCP listener, so nothing but these steps and the transform command
reach it. Transforms: SQL files (`run_sql_transforms`: psql as the
superuser, each file in one transaction, ON_ERROR_STOP) and a command
(`run_transform_command`: an argument list run as the cluster's OS user with
the staging connection in its environment, see `Staging.environ`). Then
`scrub` rewrites every table and index, refreshes planner statistics, resets
pg_stat_statements and the statistics counters, stops the cluster cleanly,
drops its WAL (`pg_resetwal`) and removes logs and other leftovers; docs/bases.md
("What masking scrubs") says what and why.

Errors: TransformFailed (names the file and the statement, or the command, its
exit code and the tail of its stderr); Cancelled; FailedPrecondition (a
prepared transaction pins old row versions); PostgresError (start/stop).
What this module may not do: open TCP, follow a link in the data directory
as root (removals go through `cowbranchd.safefs`), or keep a server log.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import stat
import tempfile
import threading
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass

import psycopg
import structlog

from cowbranchd.errors import FailedPrecondition
from cowbranchd.run import RunAs, run
from cowbranchd.safefs import open_dir, remove_tree_entries, unlink_if_present

from .cluster import dsn
from .datadir import Binaries, check_clean_shutdown
from .postmaster import start
from .process import Postmaster, stop
from .tools import ImportFailed, run_tool

__all__ = [
    "STAGING_ENV",
    "SqlTransform",
    "Staging",
    "TransformFailed",
    "read_transform",
    "run_sql_transforms",
    "run_transform_command",
    "scrub",
    "scrub_files",
    "scrub_leftovers",
    "staging",
]

log = structlog.get_logger("cowbranchd.postgres")

# The variables a transform command finds its staging database by.
STAGING_ENV = ("PGHOST", "PGPORT", "PGUSER", "PGDATABASE", "COWBRANCHD_STAGING_DSN")
_PORT = 5432  # no TCP (listen_addresses is empty): only names the socket file
# Nothing runs beside the transforms (autovacuum would analyze and leave dead
# pg_statistic rows between the scrub's steps); cheap writes, since a crash
# fails the import anyway and the scrub ends with a clean shutdown.
_STAGING_SETTINGS = {
    "autovacuum": "off",
    "synchronous_commit": "off",
    "full_page_writes": "off",
    "wal_level": "minimal",
    "max_wal_senders": "0",
}
_MAX_TRANSFORM_BYTES = 64 << 20
_IDLE_WAIT_S = 60.0
# Left in PGDATA by a base backup, a recovery or a run; none is needed to start.
_LEFTOVER_FILES = (
    "backup_label", "backup_label.old", "backup_manifest", "tablespace_map",
    "tablespace_map.old", "current_logfiles", "postmaster.opts",
)
_LOG_DIRS = ("log", "pg_log")  # server logs (logging_collector): statements, values
# Runtime state postgres clears at start anyway: NOTIFY payloads, dynamic
# shared memory (parallel query tuples), exported snapshots, temporary stats.
_EMPTIED_DIRS = ("pg_notify", "pg_dynshmem", "pg_snapshots", "pg_stat_tmp")


class TransformFailed(ImportFailed):
    """A transform failed; nothing after it ran and nothing is sealed."""


@dataclass(frozen=True)
class SqlTransform:
    """One transform file: its name (for messages and provenance) and text."""

    name: str
    sql: bytes


@dataclass(frozen=True)
class Staging:
    """A started staging cluster, reachable only through its private socket."""

    pgdata: str
    binaries: Binaries
    os_user: RunAs
    superuser: str
    socket_dir: str
    postmaster: Postmaster

    def dsn(self, database: str) -> str:
        return dsn(self.socket_dir, _PORT, self.superuser, "", database)

    def environ(self, database: str) -> dict[str, str]:
        """What a transform command gets: libpq's PGHOST (the socket
        directory), PGPORT, PGUSER (the superuser), PGDATABASE, and the same
        as one URI in COWBRANCHD_STAGING_DSN. No password: the socket is
        `trust`, and only the cluster's OS user may enter its directory."""
        return {
            "PGHOST": self.socket_dir,
            "PGPORT": str(_PORT),
            "PGUSER": self.superuser,
            "PGDATABASE": database,
            "COWBRANCHD_STAGING_DSN": self.dsn(database),
        }


@contextlib.contextmanager
def staging(
    pgdata: str,
    binaries: Binaries,
    *,
    os_user: RunAs,
    superuser: str,
    settings: Mapping[str, str] | None = None,
) -> Iterator[Staging]:
    """Start `pgdata` as `os_user` on a private socket (no TCP) and stop it
    (fast, clean) when the block ends. Its log lives in a private scratch
    directory and is deleted with it: it may quote values."""
    scratch = tempfile.mkdtemp(prefix="cowbranchd-staging-")
    try:
        os.chmod(scratch, 0o711)  # the socket directory inside is os_user's, 0750
        socket_dir = os.path.join(scratch, "socket")
        pm = start(
            pgdata,
            binaries=binaries,
            os_user=os_user,
            port=_PORT,
            socket_dir=socket_dir,
            listen_addresses="",
            settings={**_STAGING_SETTINGS, **(settings or {})},
            log_path=os.path.join(scratch, "postgres.log"),
            ready_dsn=dsn(socket_dir, _PORT, superuser, "", "template1"),
        )
        try:
            yield Staging(pgdata, binaries, os_user, superuser, socket_dir, pm)
        finally:
            stop(pm)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


def read_transform(path: str, *, import_user: str) -> SqlTransform:
    """A transform file read with `import_user`'s rights (never root's)."""
    try:
        proc = run(["head", "-c", str(_MAX_TRANSFORM_BYTES + 1), "--", path],
                   user=import_user, check=False, timeout=60)
    except UnicodeDecodeError:
        raise ImportFailed(f"transform {path}: not UTF-8 text") from None
    if proc.returncode != 0:
        raise ImportFailed(f"transform {path}: cannot be read by {import_user!r}: "
                           f"{proc.stderr.strip()[-300:]}")
    data = proc.stdout.encode()
    if len(data) > _MAX_TRANSFORM_BYTES:
        raise ImportFailed(f"transform {path}: larger than {_MAX_TRANSFORM_BYTES} bytes")
    return SqlTransform(os.path.basename(path), data)


def run_sql_transforms(
    stage: Staging,
    transforms: Sequence[SqlTransform],
    *,
    database: str,
    cancel: threading.Event | None = None,
) -> None:
    """Run each file in order, as the superuser, in one transaction each
    (psql --single-transaction, ON_ERROR_STOP): a failing file changes
    nothing and stops the rest. A file that COMMITs itself breaks that
    promise; psql runs as the cluster's OS user, so `\\!` gets no more."""
    for transform in transforms:
        result = run_tool(
            [stage.binaries.psql, "-X", "-q", "-v", "ON_ERROR_STOP=1", "--single-transaction",
             "-d", stage.dsn(database), "-f", "-"],
            user=stage.os_user,
            input=transform.sql,
            cancel=cancel,
        )
        if result.returncode != 0:
            # psql says "psql:<stdin>:LINE: ERROR: ..." and quotes the statement.
            detail = result.stderr_tail.replace("psql:<stdin>:", f"{transform.name}:")
            raise TransformFailed(
                f"transform {transform.name} failed (rolled back, nothing after it ran): "
                f"{detail[-3000:]}"
            )
        log.info("transform applied", transform=transform.name)


def run_transform_command(
    stage: Staging,
    argv: Sequence[str],
    *,
    database: str,
    timeout: float = 3600.0,
    cancel: threading.Event | None = None,
) -> None:
    """Run `argv` (no shell) as the cluster's OS user with `Staging.environ`,
    from `/`; a non-zero exit is TransformFailed with its code and stderr tail."""
    if not argv:
        raise ImportFailed("transform command: empty argument list")
    result = run_tool(list(argv), user=stage.os_user, env=stage.environ(database),
                      timeout=timeout, cancel=cancel)
    if result.returncode != 0:
        raise TransformFailed(
            f"transform command {argv[0]} exited {result.returncode}: "
            f"{result.stderr_tail[-3000:] or '(no stderr)'}"
        )


def _databases(stage: Staging) -> list[str]:
    with psycopg.connect(stage.dsn("template1"), autocommit=True) as conn:
        rows = conn.execute(
            "SELECT datname FROM pg_database WHERE datallowconn ORDER BY datname"
        ).fetchall()
        prepared = conn.execute("SELECT gid FROM pg_prepared_xacts").fetchall()
    if prepared:
        raise FailedPrecondition(
            f"prepared transactions ({', '.join(r[0] for r in prepared)[:300]}) hold old row "
            "versions; COMMIT PREPARED or ROLLBACK PREPARED them in the transform"
        )
    return [r[0] for r in rows]


def _alone(conn: psycopg.Connection[tuple[object, ...]]) -> None:
    """End every other client session and wait until they are gone: a
    session's statistics reach shared memory when it exits, and one still
    open could hold back what VACUUM may remove."""
    deadline = time.monotonic() + _IDLE_WAIT_S
    query = ("SELECT pid FROM pg_stat_activity WHERE backend_type = 'client backend' "
             "AND pid <> pg_backend_pid()")
    while others := conn.execute(query).fetchall():
        for (pid,) in others:
            conn.execute("SELECT pg_terminate_backend(%s, 10000)", (pid,))
        if time.monotonic() > deadline:
            raise FailedPrecondition(f"sessions {others} did not end")
        time.sleep(0.01)


def scrub(stage: Staging) -> None:
    """Leave no original value in any file of the staging cluster, and stop it.

    In every connectable database: ANALYZE (pg_statistic gets new samples),
    then VACUUM FULL of every table, catalogs included (heap, TOAST and
    indexes rewritten from live rows only; the dead pg_statistic rows go
    too); pg_stat_statements_reset where the module is loaded; pg_stat_reset
    last, so branches start with zero counters. Then a clean stop and
    `scrub_files`. Every table, not only those the transform changed: the
    counters that would say which can be lost (a crash restart drops them)
    and do not see every way to change a page; see docs/bases.md.
    """
    databases = _databases(stage)
    for database in databases:
        with psycopg.connect(stage.dsn(database), autocommit=True) as conn:
            _alone(conn)
            conn.execute("ANALYZE")
            conn.execute("VACUUM (FULL)")
            has_pgss = conn.execute(
                "SELECT to_regproc('pg_stat_statements_reset') IS NOT NULL"
            ).fetchone()
            if has_pgss and has_pgss[0]:
                with contextlib.suppress(psycopg.errors.ObjectNotInPrerequisiteState):
                    conn.execute("SELECT pg_stat_statements_reset()")  # not preloaded: no texts
    for database in databases:
        with psycopg.connect(stage.dsn(database), autocommit=True) as conn:
            _alone(conn)  # the VACUUM session's counters are in before they are reset
            conn.execute("SELECT pg_stat_reset()")
    stop(stage.postmaster)
    scrub_files(stage.pgdata, stage.binaries, os_user=stage.os_user)
    log.info("scrubbed", pgdata=stage.pgdata, databases=databases)


def scrub_files(pgdata: str, binaries: Binaries, *, os_user: RunAs) -> None:
    """On a cleanly shut down cluster: drop its WAL (pg_resetwal writes one
    fresh segment holding only a checkpoint; nothing is lost after a clean
    shutdown) and remove server logs, backup leftovers, `*.old` files,
    pg_stat_statements' saved texts and runtime state postgres clears at start."""
    check_clean_shutdown(pgdata, binaries, os_user=os_user)
    run([os.path.join(binaries.bindir, "pg_resetwal"), "-D", pgdata], user=os_user,
        env={"LC_ALL": "C"})
    scrub_leftovers(pgdata)
    check_clean_shutdown(pgdata, binaries, os_user=os_user)


def scrub_leftovers(pgdata: str) -> None:
    """Remove, by descriptor, what a stopped cluster does not need and may
    hold values: server logs, backup leftovers, `*.old` files, pg_stat_statements'
    saved texts, spill files and runtime state postgres clears at start."""
    with open_dir(pgdata) as root:
        with os.scandir(root) as entries:
            olds = [e.name for e in entries if e.name.endswith(".old")]
        for name in (*_LEFTOVER_FILES, *olds, *_LOG_DIRS):
            _remove(root, name)
        for name in _EMPTIED_DIRS:
            shown = os.path.join(pgdata, name)
            with contextlib.suppress(FileNotFoundError), \
                    open_dir(name, dir_fd=root, shown=shown) as fd:
                remove_tree_entries(fd, shown)
        shown = os.path.join(pgdata, "pg_stat")
        with contextlib.suppress(FileNotFoundError), \
                open_dir("pg_stat", dir_fd=root, shown=shown) as fd:
            unlink_if_present(fd, "pg_stat_statements.stat")
        shown = os.path.join(pgdata, "base")
        with contextlib.suppress(FileNotFoundError), \
                open_dir("base", dir_fd=root, shown=shown) as fd:
            _remove(fd, "pgsql_tmp")  # sort and hash spill files


def _remove(dir_fd: int, name: str) -> None:
    """Remove `name` from `dir_fd`, a directory tree by descriptor (links inside
    are unlinked, never followed), anything else unlinked."""
    try:
        st = os.lstat(name, dir_fd=dir_fd)
    except FileNotFoundError:
        return
    if stat.S_ISDIR(st.st_mode):
        shutil.rmtree(name, dir_fd=dir_fd)
    else:
        unlink_if_present(dir_fd, name)
