"""Followed bases: a standby of a server on the pool that keeps replaying,
snapshot every `imports.follow_snapshot_interval`, so a branch can be made
of the server as it was at a time `at` (docs/bases.md, "Point in time").

Each follow snapshot is a version of the base (`v<n>`): crash-consistent,
taken while the standby's replay is paused, its provenance holding the
replay position it shows (`replay_lsn`, and `replay_time`: nothing committed
after it is in the snapshot). A branch `at` T clones the newest snapshot
with replay_time <= T, gets the standby's WAL written since (copied as root,
by descriptor), and recovers to T (or, when T is past the last transaction
replayed, to the standby's replay position) before it is promoted and
started through the normal branch path.

The standby runs as the postgres OS user on a private socket directory with
no TCP listener; its password to the server is in a 0600 file of that user
in the base's volume (never argv, logs or the data directory). The reaper
(`tick`) adopts it after a daemon restart, restarts it if it died, takes
the snapshots and removes those no longer needed for `imports.follow_window`.
DeleteBase stops it (bases.py). No gRPC.
"""

from __future__ import annotations

import contextlib
import os
import pwd
import re
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import psycopg
import structlog

from cowbranchd import postgres
from cowbranchd.errors import (
    FailedPrecondition,
    InvalidArgument,
    PermissionDenied,
)
from cowbranchd.model import BaseRecord, State, now
from cowbranchd.postgres import sources
from cowbranchd.run import run
from cowbranchd.safefs import open_dir, open_regular, replace_file, unlink_if_present
from cowbranchd.storage.base import Kind, SnapshotRef

from .auth import Caller
from .bases import Bases, version_snap
from .inventory import BaseEntry, BranchEntry, Context
from .operations import Operation
from .revert import Revert

__all__ = ["FOLLOW", "Followers", "check_branch", "is_followed", "plan_branch", "socket_dir"]

log = structlog.get_logger("cowbranchd.follow")

FOLLOW = "follow"  # a follow snapshot's provenance source_kind
PASSFILE = "follow.pgpass"  # in the base's volume, beside pgdata: never cloned into a branch
_PORT = 5432  # no TCP: only names the socket file
_PAUSE_WAIT_S = 30.0
_FUTURE_SLACK = timedelta(seconds=5)  # `at` a little ahead of our clock means now
_WAL_NAME = re.compile(r"^[0-9A-F]{24}$|^[0-9A-F]{8}\.history$")
_REDO_FILE = re.compile(r"^Latest checkpoint's REDO WAL file:\s*([0-9A-F]{24})\s*$", re.MULTILINE)
_COPY_CHUNK = 1 << 20


def is_followed(record: BaseRecord) -> bool:
    return any(p.get("source_kind") == FOLLOW for p in record.provenance.values())


def _replay_times(record: BaseRecord) -> list[tuple[int, datetime]]:
    """(version, replay_time) of the base's follow snapshots, oldest first."""
    found = []
    for version, facts in record.provenance.items():
        if facts.get("source_kind") == FOLLOW and version in record.versions:
            found.append((version, datetime.fromisoformat(str(facts["replay_time"]))))
    return sorted(found)


@dataclass(frozen=True)
class _Position:
    lsn: str
    time: datetime | None  # of the last transaction replayed; None: none yet


def socket_dir(ctx: Context, base_id: str) -> Path:
    """The standby's private socket directory. A dot: never a branch id, so
    never a branch's socket directory."""
    return ctx.config.postgres.socket_root / f"follow.{base_id}"


def _dsn(ctx: Context, base_id: str, user: str, database: str) -> str:
    return postgres.dsn(str(socket_dir(ctx, base_id)), _PORT, user, "", database)


def _ids(ctx: Context) -> tuple[int, int]:
    user = pwd.getpwnam(ctx.config.postgres.os_user)
    return user.pw_uid, user.pw_gid


class Followers:
    """The standbys of followed bases and their snapshots."""

    def __init__(self, ctx: Context, bases: Bases) -> None:
        self.ctx = ctx
        self.bases = bases
        self._standbys: dict[str, postgres.Postmaster] = {}
        self._snapped: dict[str, float] = {}  # base -> monotonic time of its last snapshot
        self._following: set[str] = set()  # followed bases seen in the inventory

    # -- paths -------------------------------------------------------------------

    def socket_dir(self, base_id: str) -> Path:
        return socket_dir(self.ctx, base_id)

    def _log_path(self, base_id: str) -> Path:
        return self.ctx.config.daemon.state_dir / "follow" / f"{base_id}.log"

    def _dsn(self, base_id: str, user: str, database: str) -> str:
        return _dsn(self.ctx, base_id, user, database)

    # -- following ---------------------------------------------------------------

    def run(
        self,
        op: Operation,
        entry: BaseEntry,
        dsn: str,
        database_for: Callable[[sources.Imported], str],
    ) -> int:
        """Copy the server into the new base `entry` (from Bases.begin), start
        its standby and seal its first follow snapshot as version 1. The
        caller abandons the base on failure; the standby is stopped here."""
        pg = self.ctx.config.postgres
        base_id = entry.record.base_id
        pgdata = entry.path / "pgdata"

        def progress(phase: str, done: int, total: int) -> None:
            op.phase, op.bytes_done, op.bytes_total = phase, done, total

        op.progress("copying")
        binaries = sources.standby_copy(
            dsn,
            str(pgdata),
            passfile=str(entry.path / PASSFILE),
            bin_dirs=pg.bin_dirs,
            os_user=pg.os_user,
            progress=progress,
            cancel=op.cancelled,
        )
        op.check()
        op.progress("starting standby")
        user = str(psycopg.conninfo.conninfo_to_dict(dsn).get("user") or pg.os_user)
        with Revert() as undo:
            self._start(base_id, pgdata, binaries, user)
            undo.add("stop standby", lambda: self._stop(base_id))
            with psycopg.connect(self._dsn(base_id, user, "template1"), autocommit=True) as conn:
                row = conn.execute("SELECT rolname FROM pg_roles WHERE oid = 10").fetchone()
                databases = tuple(
                    r[0]
                    for r in conn.execute(
                        "SELECT datname FROM pg_database "
                        "WHERE datallowconn AND NOT datistemplate ORDER BY datname"
                    )
                )
            assert row is not None
            imported = sources.Imported(binaries.major, str(row[0]), databases)
            entry.record = entry.record.evolve(
                pg_version=binaries.major, user=imported.superuser, database=database_for(imported)
            )
            op.progress("snapshot")
            self._snapshot(entry, 1, source=_without_password(dsn))
            undo.success()
        return 1

    def _start(
        self, base_id: str, pgdata: Path, binaries: postgres.Binaries, user: str
    ) -> postgres.Postmaster:
        pg = self.ctx.config.postgres
        log_path = self._log_path(base_id)
        log_path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        pg.socket_root.mkdir(mode=0o755, parents=True, exist_ok=True)
        pm = postgres.start(
            str(pgdata),
            binaries=binaries,
            os_user=pg.os_user,
            port=_PORT,
            socket_dir=str(self.socket_dir(base_id)),
            listen_addresses="",
            settings={
                "hot_standby": "on",
                "wal_keep_size": self.ctx.config.imports.follow_wal_keep,
            },
            log_path=str(log_path),
            ready_dsn=self._dsn(base_id, user, "template1"),
            ready_timeout=pg.start_timeout.total_seconds(),
            standby=True,
        )
        self._standbys[base_id] = pm
        log.info("standby_started", base=base_id, pid=pm.pid)
        return pm

    def _stop(self, base_id: str) -> None:
        pm = self._standbys.pop(base_id, None)
        if pm is not None:
            postgres.stop(pm, fast_timeout=0)

    def _snapshot(self, entry: BaseEntry, version: int, *, source: str) -> None:
        """Snapshot the running standby as `version`, with replay paused so
        the position recorded is exactly the snapshot's."""
        record = entry.record
        base_id = record.base_id
        started = now()
        with psycopg.connect(
            self._dsn(base_id, record.user, record.database), autocommit=True
        ) as conn:
            conn.execute("SELECT pg_wal_replay_pause()")
            try:
                until = time.monotonic() + _PAUSE_WAIT_S
                while (
                    conn.execute("SELECT pg_get_wal_replay_pause_state()").fetchone()
                    != ("paused",)
                ):
                    if time.monotonic() > until:
                        raise FailedPrecondition(f"the standby of bases/{base_id} did not pause")
                    time.sleep(0.01)
                row = conn.execute(
                    "SELECT pg_last_wal_replay_lsn()::text, pg_last_xact_replay_timestamp(), "
                    "clock_timestamp()"
                ).fetchone()
                assert row is not None
                # Before any transaction is replayed, the snapshot holds only
                # what was committed before now.
                replay_time: datetime = row[1] or row[2]
                self.bases.seal(
                    entry,
                    version,
                    pg_version=record.pg_version,
                    user=record.user,
                    database=record.database,
                    size=0,
                    provenance={
                        "source_kind": FOLLOW,
                        "source": source,
                        "transforms": [],
                        "transform_command": "",
                        "start_time": started.isoformat(),
                        "end_time": now().isoformat(),
                        "bytes": 0,
                        "pg_version": record.pg_version,
                        "replay_lsn": str(row[0]),
                        "replay_time": replay_time.isoformat(),
                    },
                )
            finally:
                conn.execute("SELECT pg_wal_replay_resume()")
        self._snapped[base_id] = time.monotonic()

    # -- the reaper ----------------------------------------------------------------

    def tick(self) -> None:
        """Keep each followed base's standby running (adopted after a daemon
        restart), snapshot it when due, and drop snapshots past the window."""
        with self.ctx.inventory.lock:
            entries = dict(self.ctx.inventory.bases)
        # Gone since the last tick (DeleteBase stopped its standby); a base
        # still being made is not in the inventory yet, and is left alone.
        for base_id in [b for b in self._following if b not in entries]:
            self._following.discard(base_id)
            self._standbys.pop(base_id, None)
            self._snapped.pop(base_id, None)
            shutil.rmtree(self.socket_dir(base_id), ignore_errors=True)
            with contextlib.suppress(FileNotFoundError):
                self._log_path(base_id).unlink()
        interval = self.ctx.config.imports.follow_snapshot_interval.total_seconds()
        for base_id, entry in entries.items():
            if entry.record.state is not State.READY or not is_followed(entry.record):
                continue
            self._following.add(base_id)
            if not entry.lock.acquire(blocking=False):
                continue  # an import or a delete holds it
            try:
                if entry.record.state is not State.READY:
                    continue
                self._keep_running(entry)
                last = self._snapped.get(base_id)
                if last is None or time.monotonic() - last >= interval:
                    if last is None:
                        self._snapped[base_id] = time.monotonic()  # a restart: wait one interval
                    else:
                        version = (entry.record.latest_version or 0) + 1
                        source = str(entry.record.provenance[_replay_times(entry.record)[-1][0]]
                                      .get("source", ""))
                        self._snapshot(entry, version, source=source)
                self._prune(entry)
            finally:
                entry.lock.release()

    def _keep_running(self, entry: BaseEntry) -> None:
        base_id = entry.record.base_id
        pm = self._standbys.get(base_id)
        if pm is not None and pm.alive():
            return
        pgdata = entry.path / "pgdata"
        found = postgres.find_postmaster(str(pgdata))
        if found is not None:
            self._standbys[base_id] = found
            log.info("standby_adopted", base=base_id, pid=found.pid)
        else:
            postgres.prepare_clone(pgdata)  # a stale pid file; standby.signal stays
            binaries = postgres.find_binaries(
                entry.record.pg_version, self.ctx.config.postgres.bin_dirs
            )
            with open_dir(pgdata) as fd:
                replace_file(fd, "standby.signal", b"", uid=self._uid()[0], gid=self._uid()[1])
            self._start(base_id, pgdata, binaries, entry.record.user)
        with psycopg.connect(
            self._dsn(base_id, entry.record.user, entry.record.database), autocommit=True
        ) as conn:
            conn.execute("SELECT pg_wal_replay_resume()")  # a pause a crash left behind

    def _uid(self) -> tuple[int, int]:
        return _ids(self.ctx)

    def _prune(self, entry: BaseEntry) -> None:
        """Keep the follow snapshots a branch `at` any time in the window
        needs (those in it, and the newest one before it), and any a branch
        was made of."""
        record = entry.record
        times = _replay_times(record)
        start = now() - self.ctx.config.imports.follow_window
        before = [n for n, t in times if t < start]
        old = before[:-1]
        with self.ctx.inventory.lock:
            used = {
                child.source.snap
                for child in self.ctx.inventory.children_of(Kind.BASES, record.base_id)
                if child.source is not None
            }
        removed = [n for n in old if version_snap(n) not in used]
        if not removed:
            return
        for n in removed:
            snap = SnapshotRef(Kind.BASES, record.base_id, version_snap(n))
            self.ctx.driver.destroy_snapshot(snap)
        record = record.evolve(
            versions={n: t for n, t in record.versions.items() if n not in removed},
            provenance={n: p for n, p in record.provenance.items() if n not in removed},
        )
        self.ctx.driver.set_meta(Kind.BASES, record.base_id, record.to_meta())
        entry.record = record
        log.info("follow_snapshots_removed", base=record.base_id, versions=removed)


def check_branch(
    ctx: Context, record: BaseRecord, version: int | None, at: datetime | None, owner: Caller
) -> None:
    """Who may branch a followed base, and how (at once, before any work)."""
    if not is_followed(record):
        if at is not None:
            raise InvalidArgument("at", f"bases/{record.base_id} is not a followed base")
        return
    if not (owner.admin or owner.name in ctx.config.imports.follow_branchers):
        raise PermissionDenied(
            f"bases/{record.base_id} follows a server and is not masked: only admins and "
            "the tenants in imports.follow_branchers may branch it"
        )
    if version is not None:
        raise InvalidArgument(
            "parent", f"branch a followed base as bases/{record.base_id}, with `at`"
        )

def plan_branch(
    ctx: Context, base: BaseEntry, at: datetime | None
) -> tuple[SnapshotRef, Callable[[BranchEntry], None]]:
    """The follow snapshot a branch at `at` (None: now) clones, and what
    makes that clone recover to `at` (run between prepare_clone and the
    start: it writes recovery.signal, which prepare_clone removes)."""
    record = base.record
    times = _replay_times(record)
    current = now()
    target = at or current
    window = (
        f"{times[0][1].isoformat()} .. now" if times else "none yet"
    )
    if target > current + _FUTURE_SLACK:
        raise InvalidArgument("at", f"is in the future; bases/{record.base_id} covers {window}")
    eligible = [n for n, t in times if t <= target]
    if not eligible:
        raise FailedPrecondition(
            f"bases/{record.base_id} has no follow snapshot at or before {target.isoformat()}: "
            f"it covers {window}"
        )
    version = eligible[-1]
    live = _position(ctx, record)
    stop: dict[str, str]
    if at is not None and live.time is not None and target < live.time:
        stop = {"recovery_target_time": target.isoformat()}
    else:
        # Nothing newer than `at` replayed yet: to the end of the WAL copied
        # (a target past the last record would fail the recovery).
        stop = {}
    live_pgdata = base.path / "pgdata"
    uid, gid = _ids(ctx)
    binaries = postgres.find_binaries(record.pg_version, ctx.config.postgres.bin_dirs)

    def recover(entry: BranchEntry) -> None:
        _copy_wal(live_pgdata, entry.pgdata, binaries, ctx.config.postgres.os_user)
        conf = {
            "restore_command": "/bin/false",  # required; the WAL is in pg_wal already
            "recovery_target_action": "promote",
            # No connection before the promotion is done: the branch's
            # readiness step writes (its own password).
            "hot_standby": "off",
            **stop,
        }
        text = "".join(f"{k} = '{v}'\n" for k, v in conf.items())
        with open_dir(entry.pgdata) as fd:
            replace_file(fd, "postgresql.auto.conf", text.encode(), uid=uid, gid=gid)
            replace_file(fd, "recovery.signal", b"", uid=uid, gid=gid)
        with open_dir(entry.path) as fd:
            unlink_if_present(fd, PASSFILE)

    log.info("follow_branch_plan", base=record.base_id, version=version, **stop)
    return SnapshotRef(Kind.BASES, record.base_id, version_snap(version)), recover

def _position(ctx: Context, record: BaseRecord) -> _Position:
    try:
        with psycopg.connect(
            _dsn(ctx, record.base_id, record.user, record.database),
            autocommit=True,
            connect_timeout=10,
        ) as conn:
            row: Any = conn.execute(
                "SELECT pg_last_wal_replay_lsn()::text, pg_last_xact_replay_timestamp()"
            ).fetchone()
    except psycopg.Error as exc:
        raise FailedPrecondition(
            f"the standby of bases/{record.base_id} does not answer: {exc}"
        ) from exc
    return _Position(str(row[0]), row[1])


def _without_password(dsn: str) -> str:
    parts = psycopg.conninfo.conninfo_to_dict(dsn)
    parts.pop("password", None)
    return psycopg.conninfo.make_conninfo(**{k: str(v) for k, v in parts.items()})


def _copy_wal(live: Path, clone: Path, binaries: postgres.Binaries, os_user: str) -> None:
    """The live standby's WAL from the clone's redo point on, into the clone's
    pg_wal, as root by descriptor (no link followed, no special file opened),
    owned by `os_user` like the rest of the clone on disk."""
    out = run(
        [binaries.pg_controldata, "-D", str(clone)], env={"LC_ALL": "C"}, user=os_user, timeout=60
    ).stdout
    match = _REDO_FILE.search(out)
    if match is None:
        raise FailedPrecondition(f"{clone}: pg_controldata shows no REDO WAL file")
    redo = match.group(1)
    user = pwd.getpwnam(os_user)
    with open_dir(live / "pg_wal") as src, open_dir(clone / "pg_wal") as dst:
        names = sorted(n for n in os.listdir(src) if _WAL_NAME.match(n))
        for name in names:
            if not name.endswith(".history") and name < redo:
                continue
            fd_in = open_regular(src, name, shown=str(live / "pg_wal" / name))
            if fd_in is None:
                continue  # removed meanwhile
            try:
                _copy_file(fd_in, dst, name, user.pw_uid, user.pw_gid)
            finally:
                os.close(fd_in)


def _copy_file(fd_in: int, dst: int, name: str, uid: int, gid: int) -> None:
    tmp = f".{name}.cowbranchd-tmp"
    with contextlib.suppress(FileNotFoundError):
        os.unlink(tmp, dir_fd=dst)
    fd_out = os.open(
        tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600, dir_fd=dst
    )
    try:
        os.fchown(fd_out, uid, gid)
        while os.sendfile(fd_out, fd_in, None, _COPY_CHUNK):
            pass
    finally:
        os.close(fd_out)
    os.rename(tmp, name, src_dir_fd=dst, dst_dir_fd=dst)
