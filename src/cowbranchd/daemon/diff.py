"""DiffBranch: what a branch changed since it was made. The schema as a
unified diff of normalised `pg_dump --schema-only` of the branch against
the snapshot it was cloned from, and rows inserted, updated and deleted per
table: the branch's `pg_stat_user_tables` counters minus those its parent
held (a clean shutdown keeps them in the snapshot). The parent's side comes
from a private, throwaway clone of that snapshot started on a socket alone,
and is cached per snapshot. No gRPC.
"""

from __future__ import annotations

import secrets
import threading
from dataclasses import dataclass
from pathlib import Path

import psycopg
import structlog

from cowbranchd import postgres
from cowbranchd.errors import FailedPrecondition
from cowbranchd.model import State
from cowbranchd.postgres import masking, schemadiff
from cowbranchd.run import RunAs
from cowbranchd.storage.base import Kind, SnapshotRef

from .auth import Caller
from .branches import Branches
from .inventory import BranchEntry
from .lifecycle import present_as, socket_dsn, withdraw

__all__ = ["Differ", "TableChange"]

log = structlog.get_logger("cowbranchd.diff")

CACHED_PARENTS = 64

Counts = dict[tuple[str, str, str], tuple[int, int, int]]


@dataclass(frozen=True)
class TableChange:
    database: str
    schema: str
    table: str
    inserted: int
    updated: int
    deleted: int


@dataclass(frozen=True)
class _Parent:
    schema: str
    counts: Counts


class Differ:
    def __init__(self, branches: Branches) -> None:
        self.branches = branches
        self.ctx = branches.ctx
        self._lock = threading.Lock()
        self._parents: dict[str, _Parent] = {}

    def diff(self, branch_id: str, caller: Caller) -> tuple[str, str, list[TableChange]]:
        """(parent, unified schema diff, changed tables) of the branch."""
        entry = self.branches.get(branch_id, caller)
        if self.branches.state(entry) is not State.READY:
            raise FailedPrecondition(
                f"branches/{branch_id} is {self.branches.state(entry).name}: only a running "
                "branch can be diffed"
            )
        source = entry.source
        if source is None:
            raise FailedPrecondition(f"branches/{branch_id} has no source snapshot to diff against")
        parent = self._parent(entry, source)
        binaries = postgres.find_binaries(self._major(entry), self.ctx.config.postgres.bin_dirs)
        dsn = socket_dsn(self.ctx, entry)
        runner = (entry.record.uid, entry.record.uid) if entry.record.uid else None
        schema = schemadiff.schema_dump(
            dsn, binaries=binaries, os_user=runner or self.ctx.config.postgres.os_user
        )
        counts = _counts(dsn)
        changes = []
        for key, (ins, upd, dele) in sorted(counts.items()):
            base_ins, base_upd, base_del = parent.counts.get(key, (0, 0, 0))
            # A crash restart of the branch resets its counters: never below zero.
            row = (max(0, ins - base_ins), max(0, upd - base_upd), max(0, dele - base_del))
            if any(row):
                changes.append(TableChange(*key, *row))
        diff = schemadiff.unified_diff(
            parent.schema, schema, old_name=entry.record.parent, new_name=f"branches/{branch_id}"
        )
        return entry.record.parent, diff, changes

    def _major(self, entry: BranchEntry) -> int:
        with self.ctx.inventory.lock:
            base = self.ctx.inventory.bases.get(entry.record.base_id)
        if base is None:
            raise FailedPrecondition(f"bases/{entry.record.base_id} is gone")
        return base.record.pg_version

    def _parent(self, entry: BranchEntry, source: SnapshotRef) -> _Parent:
        key = str(source)
        with self._lock:
            cached = self._parents.get(key)
        if cached is not None:
            return cached
        parent = self._read_parent(entry, source)
        with self._lock:
            if len(self._parents) >= CACHED_PARENTS:
                self._parents.pop(next(iter(self._parents)))
            self._parents[key] = parent
        return parent

    def _read_parent(self, entry: BranchEntry, source: SnapshotRef) -> _Parent:
        """Clone the snapshot, start it on a private socket (no TCP), read
        its schema and counters, destroy the clone."""
        pg = self.ctx.config.postgres
        driver = self.ctx.driver
        with self.ctx.inventory.lock:
            base = self.ctx.inventory.bases[entry.record.base_id].record
        binaries = postgres.find_binaries(base.pg_version, pg.bin_dirs)
        name = f"diff-{secrets.token_hex(4)}"
        # "creating": a daemon dying meanwhile leaves a leftover reconcile removes.
        path = driver.clone(source, Kind.BRANCHES, name, {"state": "creating", "id": name})
        try:
            pgdata = path / "pgdata"
            postgres.prepare_clone(pgdata)
            # A branch's snapshot is its tenant's data (postgresql.auto.conf can
            # run commands at start): it runs as that branch's uid, as the
            # branch itself does, never as the os_user who owns every base.
            uid = entry.record.uid
            run_dir: Path = pgdata
            runner: RunAs = pg.os_user
            if uid:
                run_dir = self.ctx.mount_root / name
                present_as(self.ctx, pgdata, run_dir, uid)
                runner = (uid, uid)
            with masking.staging(
                str(run_dir), binaries, os_user=runner, superuser=base.user
            ) as stage:
                dsn = stage.dsn(base.database)
                schema = schemadiff.schema_dump(dsn, binaries=binaries, os_user=runner)
                counts = _counts(dsn)
        finally:
            withdraw(self.ctx, name)
            driver.destroy(Kind.BRANCHES, name)
        return _Parent(schema, counts)


def _counts(dsn: str) -> Counts:
    """Counters of every connectable non-template database, by (database,
    schema, table)."""
    counts: Counts = {}
    with psycopg.connect(dsn, autocommit=True) as conn:
        databases = [
            str(r[0])
            for r in conn.execute(
                "SELECT datname FROM pg_database WHERE datallowconn AND NOT datistemplate "
                "ORDER BY datname"
            )
        ]
    for database in databases:
        with psycopg.connect(dsn, dbname=database, autocommit=True) as conn:
            for change in schemadiff.row_changes(conn):
                counts[(database, change.schema, change.table)] = (
                    change.inserted,
                    change.updated,
                    change.deleted,
                )
    return counts
