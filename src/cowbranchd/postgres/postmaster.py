"""Starting a postmaster: spawn `postgres` on a data directory as the branch's
OS user and wait until it answers.

Nothing here knows about storage or gRPC. `postgres` is started directly (not
pg_ctl, whose wait loop sleeps 100 ms) and watched without coarse sleeps: the
postmaster's own status line in postmaster.pid says when it is ready, a waiter
thread per child (process.py) says at once when it died, and `SELECT 1`
confirms. The public names are re-exported by `cowbranchd.postgres`.
"""

from __future__ import annotations

import os
import subprocess
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import psutil
import psycopg
import structlog

from cowbranchd.errors import PostgresError
from cowbranchd.ports import port_free
from cowbranchd.run import RunAs, as_user, clean_env, ids_of
from cowbranchd.safefs import open_dir, unlink_if_present

from .datadir import Binaries, read_pid_file, validate_settings
from .process import Postmaster, register_child, stop

__all__ = ["OnReady", "PortInUse", "start"]

log = structlog.get_logger("cowbranchd.postgres")

_POLL_INTERVAL = 0.001  # postmaster.pid is re-read this often while starting
_LOG_TAIL_LINES = 30
_CREATE_TIME_SLACK = 2.0  # postmaster.pid holds whole seconds; psutil derives from boot time
# Defaults a branch may override: they change cost, never query semantics.
_START_DEFAULTS = {
    # A crash-consistent clone (snapshot of a running branch) otherwise fsyncs
    # every file of the data directory before redo; syncfs is one call.
    "recovery_init_sync_method": "syncfs",
}
_ADDRESS_IN_USE = "Address already in use"  # strerror(EADDRINUSE), as postgres logs it
_NO_TCP_SOCKETS = "could not create any TCP/IP sockets"


class PortInUse(PostgresError):
    """The postmaster could not listen on its port; retry on another one."""


def _child_env() -> dict[str, str]:
    # A clean environment: systemd's notify/socket-activation/watchdog
    # variables belong to the daemon, libpq's PG* variables would leak into the
    # server's own connections (dblink, fdw), and a tenant's superuser could
    # read anything else through `COPY ... TO PROGRAM 'env'`.
    return clean_env()


def _ensure_socket_dir(socket_dir: str, uid: int, gid: int, port: int) -> None:
    # Local connections are trusted: this directory's mode is the access gate.
    # Its parent (postgres.socket_root) is the daemon's own, so the last
    # component is the only one a tenant could have swapped for a link.
    os.makedirs(socket_dir, mode=0o750, exist_ok=True)
    with open_dir(socket_dir) as fd:
        os.fchown(fd, uid, gid)
        os.fchmod(fd, 0o750)
        # The directory is this branch's alone and no postmaster of it runs
        # now (we are starting one), so a socket lock left by a killed one is
        # stale; postgres would refuse it while that pid is still a zombie.
        for name in (f".s.PGSQL.{port}.lock", f".s.PGSQL.{port}"):
            unlink_if_present(fd, name)


def _read_log(log_path: str, offset: int) -> str:
    try:
        with open(log_path, "rb") as f:
            size = os.fstat(f.fileno()).st_size
            f.seek(max(offset, size - 65536))
            return f.read().decode(errors="replace")
    except OSError:
        return ""


def _tail(text: str) -> str:
    return "\n".join(text.rstrip("\n").split("\n")[-_LOG_TAIL_LINES:])


def _port_bound_elsewhere(listen_addresses: str, port: int) -> bool:
    # No TCP at all (a private start on a socket) cannot be a port clash.
    return bool(listen_addresses.strip()) and not port_free(listen_addresses, port)


OnReady = Callable[["psycopg.Connection[Any]"], None]


def _probe(
    ready_dsn: str, exited: threading.Event, deadline: float, on_ready: OnReady | None
) -> None:
    """Run SELECT 1 through `ready_dsn`, retrying only while the server is
    starting; then `on_ready` on the same connection (no second one)."""
    while True:
        timeout = max(2, int(deadline - time.monotonic()) + 1)
        try:
            with psycopg.connect(ready_dsn, connect_timeout=timeout, autocommit=True) as conn:
                conn.execute("SELECT 1").fetchone()
                if on_ready is not None:
                    on_ready(conn)
            return
        except psycopg.OperationalError as exc:
            # 57P03 cannot_connect_now: still starting; no sqlstate: not reachable yet.
            if exc.sqlstate not in (None, "57P03") or time.monotonic() > deadline:
                raise
        if exited.wait(_POLL_INTERVAL):
            return  # the caller sees the exit


@dataclass
class _Starting:
    """A postmaster between spawn and ready, with what a failure report needs."""

    pm: Postmaster
    proc: subprocess.Popen[bytes]
    log_path: str
    log_offset: int  # where this start's output begins in the log
    listen_addresses: str

    def log_text(self) -> str:
        return _read_log(self.log_path, self.log_offset)

    def fail(self, problem: str, error: type[PostgresError] = PostgresError) -> PostgresError:
        """Stop it (immediate) and return the error to raise, with the log tail."""
        stop(self.pm, fast_timeout=0)
        message = f"postgres on {self.pm.pgdata} port {self.pm.port}: {problem}"
        return error(message, _tail(self.log_text()))

    def exit_error(self) -> PostgresError:
        text = self.log_text()
        in_use = _ADDRESS_IN_USE in text or _NO_TCP_SOCKETS in text
        problem = f"exited with code {self.proc.returncode} while starting"
        if in_use or _port_bound_elsewhere(self.listen_addresses, self.pm.port):
            return self.fail(problem, PortInUse)
        return self.fail(problem)

    def wait_ready(
        self,
        ready_dsn: str,
        ready_timeout: float,
        on_ready: OnReady | None = None,
        statuses: tuple[str, ...] = ("ready",),
    ) -> float:
        """Wait for one of `statuses` in postmaster.pid, then SELECT 1; return
        when the pid file said so."""
        exited = self.proc_exited
        deadline = time.monotonic() + ready_timeout
        while True:
            # The wait is the poll interval, and it wakes at once if postgres exits.
            if exited.wait(_POLL_INTERVAL):
                raise self.exit_error()
            status = read_pid_file(self.pm.pgdata)
            if status is not None and status.pid == self.pm.pid and status.status in statuses:
                break
            if time.monotonic() > deadline:
                raise self.fail(f"not ready within {ready_timeout}s")
        pid_ready = time.perf_counter()
        try:
            _probe(ready_dsn, exited, deadline, on_ready)
        except psycopg.Error as exc:
            raise self.fail(f"SELECT 1 failed: {exc}") from exc
        if exited.is_set():
            raise self.exit_error()
        # With several listen addresses postgres starts if any one binds; a
        # client could then reach whoever holds the others.
        if _ADDRESS_IN_USE in self.log_text():
            raise self.fail("could not bind every listen address", PortInUse)
        return pid_ready

    @property
    def proc_exited(self) -> threading.Event:
        assert self.pm._exited is not None
        return self.pm._exited


def start(
    pgdata: str,
    *,
    binaries: Binaries,
    os_user: RunAs,
    port: int,
    socket_dir: str,
    listen_addresses: str,
    settings: Mapping[str, str],
    log_path: str,
    ready_dsn: str,
    ready_timeout: float = 60.0,
    on_ready: OnReady | None = None,
    standby: bool = False,
) -> Postmaster:
    """Spawn postgres on `pgdata` and return once `SELECT 1` through `ready_dsn`
    worked, and `on_ready` ran on that connection. With `standby` a hot
    standby that accepts read-only connections counts as started (its pid
    file says "standby", never "ready").

    Raises PortInUse if it could not listen on `port`, PostgresError (with the
    tail of `log_path`) if it exited or was not ready within `ready_timeout`;
    in both cases nothing is left running.
    """
    validate_settings(settings)
    uid, gid = ids_of(os_user)
    _ensure_socket_dir(socket_dir, uid, gid, port)
    overrides = {
        **_START_DEFAULTS,
        **settings,
        "port": str(port),
        "unix_socket_directories": socket_dir,
        "listen_addresses": listen_addresses,
        "archive_mode": "off",
        "max_logical_replication_workers": "0",
    }
    # setpriv drops to the OS user and execs postgres. Passing user/group to
    # Popen instead makes CPython fork the whole daemon rather than vfork
    # (measured: ~2.5 ms versus ~0.2 ms, more under load).
    argv = [*as_user((uid, gid)), binaries.postgres, "-D", pgdata]
    for name, value in overrides.items():
        argv += ["-c", f"{name}={value}"]
    started = time.perf_counter()
    # The daemon (root) opens the log; postgres only inherits the descriptor.
    # 0600: a log can hold statements, and so one tenant's data.
    log_fd = os.open(log_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_CLOEXEC, 0o600)
    with open(log_fd, "ab") as log_file:
        offset = log_file.tell()
        try:
            proc = subprocess.Popen(
                argv,
                stdin=subprocess.DEVNULL,
                stdout=log_file,
                stderr=subprocess.STDOUT,
                cwd="/",
                env=_child_env(),
                start_new_session=True,  # own process group: killpg reaches every backend
            )
        except OSError as exc:
            raise PostgresError(f"could not run {binaries.postgres}: {exc}") from exc
    exited = register_child(proc)
    spawned = time.perf_counter()

    try:
        ctime = psutil.Process(proc.pid).create_time()
    except psutil.Error:
        ctime = time.time()  # already gone; the wait reports the exit
    pm = Postmaster(proc.pid, ctime, port, socket_dir, pgdata, exited)
    starting = _Starting(pm, proc, log_path, offset, listen_addresses)
    try:
        pid_ready = starting.wait_ready(
            ready_dsn, ready_timeout, on_ready, ("ready", "standby") if standby else ("ready",)
        )
    except PostgresError:
        raise  # already stopped
    except BaseException:
        stop(pm, fast_timeout=0)
        raise
    log.debug(
        "postgres started",
        pgdata=pgdata,
        pid=proc.pid,
        port=port,
        spawn_ms=round((spawned - started) * 1000, 2),
        pidfile_ready_ms=round((pid_ready - started) * 1000, 2),
        select1_ms=round((time.perf_counter() - started) * 1000, 2),
    )
    return pm


