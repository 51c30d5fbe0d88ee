"""A branch's runtime: its connection facts, and starting and stopping its
postgres. Shared by branches.py (create, reset, restart, delete) and warm.py
(warm clones); no locks here: callers hold the branch's own lock.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import pwd
import shutil
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psycopg
import structlog
from psycopg import sql

from cowbranchd import deadline, postgres
from cowbranchd.errors import (
    AlreadyExists,
    CowbranchError,
    FailedPrecondition,
    InvalidArgument,
    PostgresError,
    StorageError,
)
from cowbranchd.model import META_WARM
from cowbranchd.safefs import fsync_dir
from cowbranchd.storage import idmap
from cowbranchd.storage.base import Kind, SnapshotRef, StorageDriver, Volume

from .branch_logs import remove_logs
from .inventory import BranchEntry, Context
from .revert import Revert

__all__ = [
    "Connection",
    "claim",
    "clone_or_clean_up",
    "connection",
    "dismantle",
    "forget_hand_over",
    "open_session",
    "prepare_hand_over",
    "present",
    "present_as",
    "record_hand_over",
    "remove_runtime_files",
    "replay_hand_overs",
    "socket_dsn",
    "start_postmaster",
    "stop_postmaster",
    "withdraw",
]

log = structlog.get_logger("cowbranchd.branches")

# How often start is retried on another port when postgres finds its port
# taken (by something that bound it after our bind check).
PORT_ATTEMPTS = 5
CLONE_VISIBLE_S = 5.0
# Waits between tries to unmount a branch's data directory while something
# still holds it; None: give up (MountBusy).
UNMOUNT_RETRIES_S = (0.05, 0.1, 0.2, 0.4, 0.8, 1.6, 3.2, None)


@dataclass(frozen=True)
class Connection:
    host: str
    port: int
    user: str
    password: str
    database: str
    socket_dir: str
    dsn: str


def _credentials(ctx: Context, entry: BranchEntry) -> tuple[str, str, str, str]:
    """(role, password, database, superuser) of the branch: the role it hands
    out (its base's branch role unless it asked for another), a password of
    the branch's own, derived from its identity (so it survives resets and
    restarts and is never stored), its base's database, and the superuser
    the daemon itself connects as."""
    with ctx.inventory.lock:
        base_entry = ctx.inventory.bases.get(entry.record.base_id)
    base = base_entry.record if base_entry else None
    password = ctx.secrets.branch_password(entry.branch_id, entry.record.create_time)
    if base is None:
        return entry.record.role or "postgres", password, "postgres", "postgres"
    role = entry.record.role or base.branch_role or base.user
    return role, password, base.database, base.user


def connection(ctx: Context, entry: BranchEntry) -> Connection:
    """Where and how to reach the branch: its own password, its port."""
    pg = ctx.config.postgres
    user, password, database, _ = _credentials(ctx, entry)
    return Connection(
        host=pg.host,
        port=entry.record.port,
        user=user,
        password=password,
        database=database,
        socket_dir=str(ctx.socket_dir(entry.branch_id)),
        dsn=postgres.dsn(pg.host, entry.record.port, user, password, database),
    )


def socket_dsn(ctx: Context, entry: BranchEntry) -> str:
    """The daemon's own way in: the branch's socket (trusted, no password)."""
    _, _, database, superuser = _credentials(ctx, entry)
    return postgres.dsn(
        str(ctx.socket_dir(entry.branch_id)), entry.record.port, superuser, "", database
    )


# Options of the daemon's own sessions: nothing they run is in the branch's
# log, whatever its log_statement says (a password verifier is not for logs).
QUIET_SESSION = "-c log_statement=none -c log_min_duration_statement=-1"


def _password_statement(ctx: Context, entry: BranchEntry) -> tuple[str, sql.Composed]:
    """(role, ALTER ROLE giving it the branch's own password)."""
    user, password, _, _ = _credentials(ctx, entry)
    verifier = postgres.scram_verifier(password)
    return user, sql.SQL("ALTER ROLE {} PASSWORD {}").format(
        sql.Identifier(user), sql.Literal(verifier)
    )


def _no_role(entry: BranchEntry, user: str) -> FailedPrecondition:
    return FailedPrecondition(
        f"role {user!r} does not exist in bases/{entry.record.base_id}: create it in "
        "the base (init_sql, or before its next version) or ask for another role"
    )


def _give_password(ctx: Context, entry: BranchEntry) -> postgres.OnReady:
    """Set the branch's own password on its role, over the daemon's socket
    connection: a clone comes with its parent's (a base's or another
    branch's), which must open only the parent."""
    user, statement = _password_statement(ctx, entry)

    def apply(conn: psycopg.Connection[Any]) -> None:
        # Not in the branch's log, whatever its log_statement says.
        conn.execute("SET log_statement = 'none'")
        conn.execute("SET log_min_duration_statement = -1")
        try:
            conn.execute(statement)
        except psycopg.errors.UndefinedObject as exc:
            raise _no_role(entry, user) from exc

    return apply


def present(ctx: Context, entry: BranchEntry) -> Path:
    """The directory the branch's postmaster runs on. With a uid of its own,
    the clone's pgdata is mounted there idmapped: files owned on disk by
    os_user appear as the branch's, and what it writes lands as os_user, so no
    chown ever, and no other branch (another uid) can reach it."""
    run_dir = ctx.run_dir(entry)
    uid = entry.record.uid
    if uid and not (run_dir.exists() and idmap.is_idmapped_mount(run_dir)):
        present_as(ctx, entry.pgdata, run_dir, uid)
    return run_dir


def present_as(ctx: Context, pgdata: Path, run_dir: Path, uid: int) -> None:
    """Mount `pgdata` idmapped at `run_dir` (under ctx.mount_root; `withdraw`
    takes it away): its on-disk os_user files appear as `uid`'s."""
    disk = pwd.getpwnam(ctx.config.postgres.os_user)
    ctx.mount_root.mkdir(mode=0o711, parents=True, exist_ok=True)
    idmap.idmapped_mount(
        pgdata, run_dir, disk_uid=disk.pw_uid, disk_gid=disk.pw_gid, uid=uid, gid=uid
    )


def withdraw(ctx: Context, volume: str) -> None:
    """Unmount what `present` mounted for `volume` (nothing there is fine);
    before its volume is destroyed, and after its postmaster stopped."""
    target = ctx.mount_root / volume
    if not target.exists():
        return
    # A postmaster killed from outside leaves dying backends (and, adopted,
    # a zombie init has not reaped yet) holding the mount a moment longer.
    for delay in UNMOUNT_RETRIES_S:
        try:
            idmap.unmount(target)
            break
        except idmap.MountBusy:
            if delay is None:
                raise
            time.sleep(delay)
    with contextlib.suppress(OSError):
        target.rmdir()


def start_postmaster(ctx: Context, entry: BranchEntry, *, allow_new_port: bool) -> None:
    """Start the branch's postgres on its port (another one if that port
    turns out taken and `allow_new_port`), as its own uid where it has one,
    and wait for SELECT 1 (its own password set on that connection)."""
    pg = ctx.config.postgres
    binaries = postgres.find_binaries(postgres.pg_version(entry.pgdata), pg.bin_dirs)
    settings = {**pg.settings, **entry.record.settings}
    ctx.log_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
    run_dir = present(ctx, entry)
    uid = entry.record.uid
    for attempt in range(PORT_ATTEMPTS):
        try:
            entry.postmaster = postgres.start(
                str(run_dir),
                binaries=binaries,
                os_user=(uid, uid) if uid else pg.os_user,
                port=entry.record.port,
                socket_dir=str(ctx.socket_dir(entry.branch_id)),
                listen_addresses=pg.listen_addresses,
                settings=settings,
                log_path=str(ctx.log_path(entry.branch_id)),
                ready_dsn=socket_dsn(ctx, entry),
                on_ready=_give_password(ctx, entry),
                ready_timeout=deadline.bounded(
                    pg.start_timeout.total_seconds(), "postgres to answer"
                )
                or 0.0,
            )
            return
        except postgres.PortInUse:
            if not allow_new_port or attempt == PORT_ATTEMPTS - 1:
                raise
        except PostgresError as exc:
            raise _client_setting_error(entry.record.settings, exc) or exc from None
        old = entry.record.port
        new = ctx.ports.allocate(exclude=(old,))
        entry.record = entry.record.evolve(port=new)
        ctx.ports.release(old)
        log.info("port_taken_retrying", branch=entry.branch_id, port=old, new_port=new)


def stop_postmaster(ctx: Context, entry: BranchEntry, *, discard: bool = False) -> None:
    """Stop the branch's postgres. With `discard` the data is about to be
    destroyed, so skip the shutdown checkpoint (immediate shutdown)."""
    master = entry.postmaster or postgres.find_postmaster(str(ctx.run_dir(entry)))
    if master is not None:
        postgres.stop(master, fast_timeout=0 if discard else 10.0)
    entry.postmaster = None


def materialise(
    ctx: Context,
    entry: BranchEntry,
    source: SnapshotRef,
    meta: Mapping[str, str],
    undo: Revert,
    *,
    allow_new_port: bool,
    release: bool = True,
    before_start: Callable[[BranchEntry], None] | None = None,
) -> float:
    """The one way a volume becomes a running branch or warm clone: clone
    `source` as `entry.volume` with `meta` (and the record's size limit),
    register its `dismantle` on `undo` at once, make the clone startable, and
    start its postgres (own uid, own password, `SELECT 1` answered). Create,
    reset and the warm pool compose it. Returns when the clone was done
    (perf_counter), for the create's timing log."""
    entry.path = clone_or_clean_up(
        ctx.driver, source, entry.volume, meta, max_bytes=entry.record.max_bytes
    )
    undo.add("dismantle", lambda: dismantle(ctx, entry, release=release))
    cloned = time.perf_counter()
    postgres.prepare_clone(entry.pgdata)
    # Whatever the parent allowed: TCP only from the networks postgres listens on.
    pg = ctx.config.postgres
    postgres.write_hba(entry.pgdata, pg.os_user, postgres.client_networks(pg.listen_addresses))
    if before_start is not None:  # after prepare_clone: it may write recovery.signal
        before_start(entry)
    start_postmaster(ctx, entry, allow_new_port=allow_new_port)
    return cloned


def dismantle(ctx: Context, entry: BranchEntry, *, release: bool = True) -> None:
    """The one teardown of a branch, a warm clone or a leftover volume: stop
    its postgres (immediate: the data goes), unmount, destroy its volume, and
    with `release` give back its port and uid and remove its socket directory
    and log (not for a volume a reset superseded: those are still the
    branch's). Idempotent."""
    # A suspended branch's port is held by the daemon's acceptor, not postgres.
    ctx.acceptor.disarm(entry.branch_id)
    stop_postmaster(ctx, entry, discard=True)
    withdraw(ctx, entry.volume)
    ctx.driver.destroy(Kind.BRANCHES, entry.volume)
    forget_hand_over(ctx, entry.volume)
    if not release:
        return
    ctx.ports.release(entry.record.port)
    if ctx.uids is not None and entry.record.uid:
        ctx.uids.release(entry.record.uid)
    remove_runtime_files(ctx, entry.branch_id)


def clone_or_clean_up(
    driver: StorageDriver,
    source: SnapshotRef,
    branch_id: str,
    meta: Mapping[str, str],
    *,
    max_bytes: int = 0,
) -> Path:
    """driver.clone, destroying whatever a failed clone may have left under
    the branch's name (a clone made but not mounted, say). AlreadyExists means
    the name was someone else's: that is left alone. `max_bytes` limits the
    clone where the driver can; where it cannot (btrfs without simple quotas)
    the reaper watches the branch instead (Branches.check_size_limits)."""
    limit = max_bytes if max_bytes and driver.limits_bytes else 0
    try:
        path = driver.clone(source, Kind.BRANCHES, branch_id, meta, max_bytes=limit)
        _wait_for_pgdata(path)
    except AlreadyExists:
        raise
    except BaseException:
        with contextlib.suppress(CowbranchError):
            driver.destroy(Kind.BRANCHES, branch_id)
        raise
    return path


def _wait_for_pgdata(path: Path) -> None:
    """Every clone of a base holds pgdata/. zfs-fuse has been seen to report a
    fresh clone mounted a moment before its files show through FUSE: give it
    that moment (one stat when all is well), bounded."""
    started = time.monotonic()
    waited = False
    while not (path / "pgdata" / "PG_VERSION").exists():
        if time.monotonic() - started > CLONE_VISIBLE_S:
            raise StorageError(f"clone at {path} shows no pgdata/ after {CLONE_VISIBLE_S}s")
        waited = True
        time.sleep(0.005)
    if waited:
        log.warning(
            "clone_slow_to_show", path=str(path), ms=round((time.monotonic() - started) * 1000, 1)
        )


def _client_setting_error(
    settings: Mapping[str, str], exc: PostgresError
) -> InvalidArgument | None:
    """postgres alone knows which values it accepts: a start failure that
    names one of the client's own settings is the client's bad input."""
    rejected = [name for name in settings if f'parameter "{name}"' in exc.log_tail]
    if not rejected:
        return None
    error = InvalidArgument(
        "postgres_settings", f"postgres rejected {', '.join(rejected)}: {exc.message}"
    )
    error.__cause__ = exc
    return error


def remove_runtime_files(ctx: Context, branch_id: str) -> None:
    """The branch's socket directory and postgres logs, once it is gone (after
    a warm hand-over they were renamed away, and this is a no-op)."""
    shutil.rmtree(ctx.socket_dir(branch_id), ignore_errors=True)
    remove_logs(ctx, branch_id)


def open_session(
    ctx: Context, entry: BranchEntry, timeout: float = 10.0
) -> psycopg.Connection[Any]:
    """The daemon's own connection to a running clone, over its socket (trusted,
    no password), kept out of its log: the warm pool opens one per clone as
    it starts, so a hand-out does not wait for a backend to start."""
    try:
        return psycopg.connect(
            socket_dsn(ctx, entry),
            connect_timeout=max(1, int(timeout)),
            autocommit=True,
            options=QUIET_SESSION,
        )
    except psycopg.Error as exc:
        raise PostgresError(f"branches/{entry.branch_id} does not answer: {exc}") from exc


def claim(
    ctx: Context,
    entry: BranchEntry,
    timeout: float = 10.0,
    *,
    session: psycopg.Connection[Any] | None = None,
    durable: bool = True,
    steps: dict[str, float] | None = None,
) -> None:
    """Make a running clone the branch it was handed to: `SELECT 1` answered
    (as CreateBranch promises) and its own password set, in one round trip
    over `session` (an `open_session`) if it still works, else over a new
    one; closed after, so the daemon holds no backend of a branch.

    Without `durable`, the password's commit does not wait for its WAL flush
    (the WAL writer flushes it within wal_writer_delay, and the client's own
    first commit flushes it too). Only for a role whose password before was
    the warm clone's own, which nobody was ever given: a postgres crash in
    that window loses the branch's password (its DSN fails until the daemon
    next starts it, which sets it again), never lets another one in.

    With `steps`, ms per step go there (for the create's timing log)."""
    timing = steps if steps is not None else {}
    user, password = _password_statement(ctx, entry)
    batch = sql.SQL("; ").join(
        [sql.SQL("SELECT 1")]
        + ([] if durable else [sql.SQL("SET synchronous_commit = off")])
        + [password]
    )

    def run(conn: psycopg.Connection[Any]) -> None:
        # No parameters: one simple query, one round trip. The session's own
        # options keep it out of the log (a SET here would come too late:
        # postgres logs a simple query before running any of it).
        t0 = time.perf_counter()
        try:
            conn.execute(batch)
        except psycopg.errors.UndefinedObject as exc:
            raise _no_role(entry, user) from exc
        timing["claim_sql"] = (time.perf_counter() - t0) * 1000

    try:
        if session is not None:
            with session:
                try:
                    run(session)
                    return
                except psycopg.OperationalError as exc:  # its backend went away meanwhile
                    log.warning("warm_session_lost", branch=entry.branch_id, error=str(exc))
        t0 = time.perf_counter()
        conn = open_session(ctx, entry, timeout)
        timing["connect"] = (time.perf_counter() - t0) * 1000
        with conn:
            run(conn)
    except psycopg.Error as exc:
        raise PostgresError(f"branches/{entry.branch_id} does not answer SELECT 1: {exc}") from exc


# -- hand-over records ----------------------------------------------------------
#
# A warm hand-over rewrites the clone's metadata (its id, times, labels; no
# longer warm). On a loop-file pool that fsync is most of the hand-out, so the
# patch is first made durable in a small file of the daemon's state directory
# (one fsync on the host filesystem), and the volume's metadata is written
# without waiting for its own flush. A crash before the pool's next commit can
# leave the volume as it was (a warm clone, which start-up would destroy):
# start-up replays the record first, so every branch handed out comes back.
# A record goes with its volume (`dismantle`); one whose volume is gone is
# dropped at start-up.


def _hand_overs_dir(ctx: Context) -> Path:
    return ctx.config.daemon.state_dir / "handovers"


def prepare_hand_over(ctx: Context, volume: str) -> None:
    """When warm volume `volume` is made: its hand-over record, empty, with
    its directory entry durable, so the hand-over itself costs one write and
    one fdatasync (record_hand_over). An empty record means no hand-over."""
    folder = _hand_overs_dir(ctx)
    folder.mkdir(mode=0o700, parents=True, exist_ok=True)
    fd = os.open(
        folder / f"{volume}.json", os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW, 0o600
    )
    os.close(fd)
    fsync_dir(folder)


def record_hand_over(ctx: Context, volume: str, meta: Mapping[str, str]) -> None:
    """Make the hand-over of warm volume `volume` durable: the metadata patch
    that turns it into its branch, written into its prepared record and
    synced before it is applied. A crash mid-write leaves a torn record,
    which start-up reads as no hand-over: the call had not answered yet."""
    folder = _hand_overs_dir(ctx)
    body = json.dumps({"volume": volume, "meta": dict(meta)}).encode()
    try:
        fd = os.open(folder / f"{volume}.json", os.O_WRONLY | os.O_NOFOLLOW)
    except FileNotFoundError:  # not prepared (made by an older daemon): the long way
        prepare_hand_over(ctx, volume)
        fd = os.open(folder / f"{volume}.json", os.O_WRONLY | os.O_NOFOLLOW)
    try:
        os.write(fd, body)
        os.fdatasync(fd)
    finally:
        os.close(fd)


def forget_hand_over(ctx: Context, volume: str) -> None:
    """Drop the hand-over record of `volume`, if any (with the volume)."""
    with contextlib.suppress(FileNotFoundError):
        (_hand_overs_dir(ctx) / f"{volume}.json").unlink()


def replay_hand_overs(ctx: Context, volumes: list[Volume]) -> list[Volume]:
    """Start-up: `volumes` with every recorded hand-over applied (durably)
    to a volume still marked warm; records of volumes that are gone are
    dropped, unreadable ones logged and kept for a person to look at."""
    folder = _hand_overs_dir(ctx)
    if not folder.is_dir():
        return volumes
    records: dict[str, dict[str, str]] = {}
    for path in sorted(folder.glob("*.json")):
        recorded = path.name.removesuffix(".json")
        try:
            text = path.read_text()
            if not text:
                records[recorded] = {}  # prepared, never handed over
                continue
            body = json.loads(text)
            records[recorded] = {str(k): str(v) for k, v in body["meta"].items()}
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
            # Torn by a crash mid-write: that hand-over never answered.
            records[recorded] = {}
            log.warning("hand_over_record_torn", path=str(path), error=str(exc))
    present = {v.name for v in volumes if v.kind is Kind.BRANCHES}
    for name in sorted(set(records) - present):
        forget_hand_over(ctx, name)
    out = []
    for volume in volumes:
        patch = records.get(volume.name) if volume.kind is Kind.BRANCHES else None
        if not patch or volume.meta.get(META_WARM) != "1":
            out.append(volume)
            continue
        ctx.driver.set_meta(Kind.BRANCHES, volume.name, patch)
        merged = {k: v for k, v in {**volume.meta, **patch}.items() if v != ""}
        out.append(dataclasses.replace(volume, meta=merged))
        log.warning("hand_over_replayed", volume=volume.name)
    return out
