"""A postmaster as a process: the registry of those this daemon spawned (all
reaped by one waiter thread, so none lingers as a zombie), finding one from its
pid file (or, when a tenant broke that, from its working directory), and
stopping one (fast, immediate, then SIGKILL of its process group).

Postmasters adopted after a daemon restart are not our children: they are
signalled and watched through a pidfd, which also rules out signalling a
recycled pid. Nothing here starts postgres (postmaster.py does) or knows about
storage or gRPC.
"""

from __future__ import annotations

import contextlib
import os
import select
import signal
import subprocess
import threading
import time
from dataclasses import dataclass, field

import psutil
import structlog

from cowbranchd.errors import PostgresError
from cowbranchd.safefs import UnsafePath

from .datadir import read_pid_file

__all__ = ["Postmaster", "find_postmaster", "register_child", "stop"]

log = structlog.get_logger("cowbranchd.postgres")

_POLL_INTERVAL = 0.001
_CREATE_TIME_SLACK = 2.0  # postmaster.pid holds whole seconds; psutil derives from boot time


@dataclass(frozen=True)
class _Child:
    proc: subprocess.Popen[bytes]
    exited: threading.Event


# Postmasters this process spawned and has not reaped yet, by pid.
_children: dict[int, _Child] = {}
_children_lock = threading.Lock()


def _reap(child: _Child) -> None:
    try:
        child.proc.wait()
    finally:
        with _children_lock:
            if _children.get(child.proc.pid) is child:
                del _children[child.proc.pid]
        child.exited.set()


class _Reaper:
    """One thread that waits on the pidfds of all our children (readable once
    a child exits) and reaps each at once. Not a thread per child: starting
    one blocks its starter until the scheduler runs it, ~2 ms of every
    postgres start while the new postgres takes a CPU."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._epoll: select.epoll | None = None
        self._waiting: dict[int, _Child] = {}  # by pidfd

    def add(self, child: _Child) -> None:
        try:
            # Our child, not reaped yet (only we reap it): its pid is its own.
            pidfd = os.pidfd_open(child.proc.pid)
        except OSError:
            # No descriptor to spare (EMFILE, say): a thread of its own.
            threading.Thread(
                target=_reap, args=(child,), name=f"reap-{child.proc.pid}", daemon=True
            ).start()
            return
        with self._lock:
            if self._epoll is None:
                self._epoll = select.epoll()
                threading.Thread(
                    target=self._run, args=(self._epoll,), name="reaper", daemon=True
                ).start()
            self._waiting[pidfd] = child
            self._epoll.register(pidfd, select.EPOLLIN)

    def _run(self, epoll: select.epoll) -> None:
        while True:
            for pidfd, _ in epoll.poll():
                with self._lock:
                    child = self._waiting.pop(pidfd)
                    epoll.unregister(pidfd)
                os.close(pidfd)
                try:
                    _reap(child)
                except Exception:  # its event is set; the other children still need us
                    log.exception("reaping postgres failed", pid=child.proc.pid)


_reaper = _Reaper()


@dataclass(frozen=True)
class Postmaster:
    """A running postmaster: ours (spawned here) or adopted from postmaster.pid."""

    pid: int
    create_time: float  # psutil's, to tell this process from a later one with its pid
    port: int
    socket_dir: str
    pgdata: str
    # Set by the reaper thread once our child is gone and reaped; None if adopted.
    _exited: threading.Event | None = field(default=None, compare=False, repr=False)

    @property
    def is_child(self) -> bool:
        return self._exited is not None

    def alive(self) -> bool:
        """Still this very process, running: our child until the reaper saw it
        exit; an adopted one while its pid is no zombie with our start time."""
        if self._exited is not None:
            return not self._exited.is_set()
        try:
            proc = psutil.Process(self.pid)
            return proc.status() != psutil.STATUS_ZOMBIE and _same_process(self)
        except psutil.Error:
            return False


def register_child(proc: subprocess.Popen[bytes]) -> threading.Event:
    """Track a postmaster just spawned: the waiter thread reaps it and sets
    the returned event the moment it exits."""
    child = _Child(proc, threading.Event())
    with _children_lock:
        _children[proc.pid] = child
    _reaper.add(child)
    return child.exited


def find_postmaster(pgdata: str) -> Postmaster | None:
    """The live postmaster that postmaster.pid in `pgdata` names, or None if stale.

    Live means: the pid exists and is not a zombie, the process is postgres,
    its working directory is `pgdata` and it started when the pid file says.
    """
    try:
        status = read_pid_file(pgdata)
    except UnsafePath:
        # A tenant replaced the pid file; its postmaster may still run, and
        # must not be missed (a volume is never destroyed under one).
        return _find_by_cwd(pgdata)
    except OSError:
        return None
    if status is None:
        return None
    try:
        proc = psutil.Process(status.pid)
        with proc.oneshot():
            name = proc.name()
            state = proc.status()
            ctime = proc.create_time()
            cwd = proc.cwd()
    except psutil.Error:
        return None
    if (
        state == psutil.STATUS_ZOMBIE
        or name not in ("postgres", "postmaster")
        or abs(ctime - status.start_time) > _CREATE_TIME_SLACK
        or os.path.realpath(cwd) != os.path.realpath(pgdata)
    ):
        return None
    with _children_lock:
        child = _children.get(status.pid)
    exited = child.exited if child is not None else None
    return Postmaster(status.pid, ctime, status.port, status.socket_dir, pgdata, exited)


def _find_by_cwd(pgdata: str) -> Postmaster | None:
    """The postmaster running on `pgdata`, found without its pid file: the
    postgres process whose working directory it is and whose parent is not."""
    target = os.path.realpath(pgdata)
    found: dict[int, psutil.Process] = {}
    for proc in psutil.process_iter(["name", "cwd", "ppid"]):
        info = proc.info
        if info["name"] in ("postgres", "postmaster") and info["cwd"] == target:
            found[proc.pid] = proc
    for pid, proc in found.items():
        if proc.info["ppid"] not in found:
            with _children_lock:
                child = _children.get(pid)
            try:
                ctime = proc.create_time()
            except psutil.Error:
                continue
            exited = child.exited if child is not None else None
            return Postmaster(pid, ctime, 0, "", pgdata, exited)
    return None


def _postmaster_for_pid(pid: int) -> Postmaster | None:
    with _children_lock:
        child = _children.get(pid)
    try:
        proc = psutil.Process(pid)
        ctime = proc.create_time()
        if child is None and proc.name() not in ("postgres", "postmaster"):
            return None
    except psutil.Error:
        ctime = 0.0  # gone (or a zombie child: its reaper finishes it)
        if child is None:
            return None
    exited = child.exited if child is not None else None
    return Postmaster(pid, ctime, 0, "", "", exited)


def _wait_gone(pm: Postmaster, pidfd: int, timeout: float) -> bool:
    if pm._exited is not None:
        return pm._exited.wait(timeout)
    poller = select.poll()
    poller.register(pidfd, select.POLLIN)
    return bool(poller.poll(max(0, int(timeout * 1000))))


def stop(
    postmaster: Postmaster | int,
    *,
    fast_timeout: float = 10.0,
    immediate_timeout: float = 10.0,
    kill_timeout: float = 10.0,
) -> None:
    """Stop a postmaster and return once it is gone (and reaped, if ours).

    Fast shutdown (SIGINT, a shutdown checkpoint, clean state) for up to
    `fast_timeout` (0 skips it), then immediate (SIGQUIT), then SIGKILL of its
    whole process group. A postmaster that is already gone is success.
    """
    pm = postmaster if isinstance(postmaster, Postmaster) else _postmaster_for_pid(postmaster)
    if pm is None:
        return
    if pm._exited is not None and pm._exited.is_set():
        # Ours and reaped. If something else killed it (OOM killer, SIGKILL),
        # its backends may linger in its process group: end them, or a restart
        # on this data directory would run beside them.
        _drain_group(pm.pid, kill_timeout)
        return
    try:
        pidfd = os.pidfd_open(pm.pid)
    except ProcessLookupError:
        if pm._exited is not None:
            pm._exited.wait()
        # Killed by someone else: its backends may outlive it for a moment,
        # still attached to its shared memory, in its process group (which
        # keeps the group id from being reused). The data must not be
        # destroyed or restarted under them.
        _drain_group(pm.pid, kill_timeout)
        return
    try:
        # The pidfd pins whatever process has this pid now; make sure it is ours.
        if pm._exited is not None:
            if pm._exited.is_set():
                return  # reaped before the pidfd was opened: the pid may be recycled
        elif not _same_process(pm):
            return
        try:
            own_group = os.getpgid(pm.pid) == pm.pid
        except ProcessLookupError:
            own_group = False
        steps = [(signal.SIGINT, fast_timeout)] if fast_timeout > 0 else []
        steps += [(signal.SIGQUIT, immediate_timeout), (signal.SIGKILL, kill_timeout)]
        for sig, timeout in steps:
            if _wait_gone(pm, pidfd, 0):
                return
            with contextlib.suppress(ProcessLookupError):
                if sig == signal.SIGKILL and own_group:
                    # Backends outlive a SIGKILLed postmaster for a moment; they
                    # share its process group (started with a new session).
                    os.killpg(pm.pid, signal.SIGKILL)
                else:
                    signal.pidfd_send_signal(pidfd, sig)
            if _wait_gone(pm, pidfd, timeout):
                if sig == signal.SIGKILL and own_group:
                    _drain_group(pm.pid, kill_timeout)
                log.debug("postgres stopped", pid=pm.pid, signal=sig.name)
                return
        raise PostgresError(f"postgres pid {pm.pid} survived SIGKILL for {kill_timeout}s")
    finally:
        os.close(pidfd)


def _same_process(pm: Postmaster) -> bool:
    try:
        ctime = psutil.Process(pm.pid).create_time()
    except psutil.Error:
        return False
    return not pm.create_time or abs(ctime - pm.create_time) < 1.0


def _drain_group(pgid: int, timeout: float) -> None:
    """SIGKILL what is left of a dead postmaster's process group and wait for it."""
    # Safe from pid reuse: a pid is not handed out again while it names a group.
    deadline = time.monotonic() + timeout
    sig: int = signal.SIGKILL
    while True:
        try:
            os.killpg(pgid, sig)
        except (ProcessLookupError, PermissionError):
            return
        sig = 0  # then only probe; zombies count until their new parent reaps them
        if time.monotonic() > deadline:
            log.warning("postgres backends linger", pgid=pgid)
            return
        time.sleep(_POLL_INTERVAL)
