"""What a branch changed: its schema against another's as a unified diff of
normalised `pg_dump --schema-only` output, and the rows inserted, updated and
deleted per table since the statistics counters were last reset.

A schema dump covers every connectable, non-template database of the cluster
(each under a `-- database: NAME` line, in name order), so a migration that
creates a database or touches a second one shows. Normalising drops what
changes while the schema does not: pg_dump's comments and version header,
`SET` lines, the search_path reset, `\\restrict` guards (their key is random)
and runs of blank lines. Owners and privileges stay (a changed GRANT is a
schema change) unless `privileges=False`.

The counters come from pg_stat_user_tables. A sealed base version has them
at zero (masking's scrub resets them last), so on a branch they count what
happened since it was made. They count rows of rolled-back transactions too,
and a session's counts reach them when it goes idle (at most about a second
later) or ends. Nothing here writes to the cluster.
"""

from __future__ import annotations

import difflib
import re
from dataclasses import dataclass
from typing import Any

import psycopg
from psycopg import conninfo as libpq

from cowbranchd.errors import CommandError
from cowbranchd.run import RunAs

from .datadir import Binaries
from .tools import run_tool

__all__ = ["RowChange", "normalise", "row_changes", "schema_dump", "unified_diff"]

_DROPPED = re.compile(
    r"^(--.*"
    r"|SET [a-z_]+ = .*;"
    r"|SELECT pg_catalog\.set_config\('search_path', '', false\);"
    r"|\\(un)?restrict .*)$"
)
_DUMP_TIMEOUT_S = 600.0


@dataclass(frozen=True)
class RowChange:
    """Rows a table saw inserted, updated and deleted since the last reset."""

    schema: str
    table: str
    inserted: int
    updated: int
    deleted: int


def normalise(dump: str) -> str:
    """pg_dump output without comments, SET lines, restrict guards and blank
    runs: the same schema gives the same text."""
    lines: list[str] = []
    for raw in dump.splitlines():
        line = raw.rstrip()
        if _DROPPED.match(line):
            continue
        if not line and (not lines or not lines[-1]):
            continue
        lines.append(line)
    while lines and not lines[-1]:
        lines.pop()
    return "\n".join(lines) + "\n" if lines else ""


def _split(dsn: str) -> tuple[dict[str, Any], dict[str, str]]:
    params = libpq.conninfo_to_dict(dsn)
    password = str(params.pop("password", "") or "")
    env = {"PGPASSFILE": "/nonexistent"}
    if password:
        env["PGPASSWORD"] = password
    return params, env


def schema_dump(
    dsn: str,
    *,
    binaries: Binaries,
    os_user: RunAs,
    database: str | None = None,
    privileges: bool = True,
) -> str:
    """The normalised schema of every connectable, non-template database the
    server at `dsn` has (or of `database` alone), dumped with pg_dump as
    `os_user` (the password, if any, in its environment only)."""
    params, env = _split(dsn)
    if database is not None:
        databases = [database]
    else:
        with psycopg.connect(dsn, autocommit=True) as conn:
            databases = [r[0] for r in conn.execute(
                "SELECT datname FROM pg_database WHERE datallowconn AND NOT datistemplate "
                "ORDER BY datname")]
    flags = [] if privileges else ["--no-owner", "--no-privileges"]
    parts = []
    for name in databases:
        argv = [f"{binaries.bindir}/pg_dump", "--schema-only", "--no-password", *flags,
                "-d", libpq.make_conninfo(**{**params, "dbname": name})]
        result = run_tool(argv, user=os_user, env=env, capture_stdout=True,
                          timeout=_DUMP_TIMEOUT_S)
        if result.returncode != 0:
            raise CommandError(argv[:-1], result.returncode, result.stderr_tail)
        parts.append(f"-- database: {name}\n\n{normalise(result.stdout)}")
    return "\n".join(parts)


def unified_diff(old: str, new: str, *, old_name: str = "parent", new_name: str = "branch") -> str:
    """A unified diff of two schema dumps; empty when they are the same."""
    return "".join(difflib.unified_diff(
        old.splitlines(keepends=True), new.splitlines(keepends=True),
        fromfile=old_name, tofile=new_name,
    ))


def row_changes(conn: psycopg.Connection[Any]) -> list[RowChange]:
    """Tables of `conn`'s database with rows inserted, updated or deleted since
    the counters were last reset, by schema and name."""
    rows = conn.execute(
        "SELECT schemaname, relname, n_tup_ins, n_tup_upd, n_tup_del "
        "FROM pg_stat_user_tables WHERE n_tup_ins + n_tup_upd + n_tup_del > 0 "
        "ORDER BY schemaname, relname"
    ).fetchall()
    return [RowChange(str(s), str(t), int(i), int(u), int(d)) for s, t, i, u, d in rows]
