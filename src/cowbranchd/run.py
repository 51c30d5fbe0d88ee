"""The one way cowbranchd runs an external command: an argument list, never a
shell string; argv logged at debug level; failure raises CommandError carrying
argv, exit code and stderr.

It is also the one place that drops root for a child (`as_user`): every
process the daemon starts as another user gets that user's uid and primary
gid only (no supplementary groups, so never root's group 0), no_new_privs (no
setuid program can give privileges back) and a clean environment.
"""

from __future__ import annotations

import pwd
import shutil
import subprocess
import threading
import time
from collections.abc import Mapping, Sequence

import structlog

from .deadline import bounded
from .errors import CommandError, DeadlineExceeded

__all__ = ["RunAs", "as_user", "clean_env", "ids_of", "run", "stuck_commands"]

log = structlog.get_logger("cowbranchd.run")

SETPRIV = shutil.which("setpriv") or "/usr/bin/setpriv"  # util-linux
# What a child running as another user inherits; everything else of the
# daemon's environment (credentials, systemd's sockets, libpq's PG*) stays.
_SAFE_PATH = "/usr/local/bin:/usr/bin:/bin"


RunAs = str | pwd.struct_passwd | tuple[int, int]


def ids_of(user: RunAs) -> tuple[int, int]:
    """(uid, gid) of a user name, a passwd entry or an explicit pair (a
    branch's own ids need no passwd entry)."""
    if isinstance(user, str):
        user = pwd.getpwnam(user)
    if isinstance(user, pwd.struct_passwd):  # itself a tuple: test it first
        return user.pw_uid, user.pw_gid
    return user


def as_user(user: RunAs) -> list[str]:
    """The argv prefix that runs the rest as `user`, least privileged.

    setpriv execs in place, so a vfork-spawned child stays cheap (Popen's own
    user=/group= switch makes CPython fork the whole daemon instead)."""
    uid, gid = ids_of(user)
    return [
        SETPRIV,
        f"--reuid={uid}",
        f"--regid={gid}",
        "--clear-groups",
        "--no-new-privs",
        "--",
    ]


def clean_env(extra: Mapping[str, str] | None = None) -> dict[str, str]:
    """A minimal environment for a child that runs as another user."""
    return {"PATH": _SAFE_PATH, "LC_ALL": "C", **(extra or {})}


def run(
    argv: Sequence[str],
    *,
    check: bool = True,
    input: str | None = None,
    env: Mapping[str, str] | None = None,
    timeout: float | None = 300.0,
    user: RunAs | None = None,
    cwd: str | None = None,
) -> subprocess.CompletedProcess[str]:
    """Run `argv` and return its completed process (stdout/stderr as text).

    `user` runs the command as that OS user through `as_user` (the daemon
    runs as root; postgres tools refuse to), with `clean_env(env)` and `/` as
    the default working directory. With `check`, a non-zero exit raises
    CommandError. The wait is bounded by `timeout` and by the call's deadline
    (DeadlineExceeded when that is what ran out). A command that outlives its
    time is killed; one that cannot be killed (uninterruptible sleep in a
    hung FUSE server, say) is left to a watcher and reported by
    `stuck_commands()`, never waited for.
    """
    started = time.perf_counter()
    full = list(argv)
    child_env = dict(env) if env is not None else None
    if user is not None:
        full = [*as_user(user), *full]
        child_env = clean_env(env)
        cwd = cwd or "/"
    limit = bounded(timeout, f"running {argv[0]}")
    try:
        proc = subprocess.Popen(
            full,
            stdin=subprocess.PIPE if input is not None else subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=child_env,
            cwd=cwd,
        )
    except FileNotFoundError as exc:
        raise CommandError(argv, 127, f"{argv[0]}: not found ({exc.strerror})") from exc
    try:
        stdout, stderr = proc.communicate(input, timeout=limit)
    except subprocess.TimeoutExpired:
        proc.kill()
        try:
            proc.communicate(timeout=_KILL_GRACE_S)
        except subprocess.TimeoutExpired:
            _watch_stuck(proc, argv)
            raise CommandError(
                argv, -1, f"timed out after {limit:.1f}s and could not be killed "
                "(uninterruptible sleep: the storage backend may hang)"
            ) from None
        if timeout is None or (limit is not None and limit < timeout):
            raise DeadlineExceeded(
                f"{argv[0]} did not finish before the call's deadline ({limit:.1f}s)"
            ) from None
        raise CommandError(argv, -1, f"timed out after {limit:.1f}s") from None
    log.debug(
        "command",
        argv=list(argv),
        user=user if user is None or isinstance(user, str) else ids_of(user),
        returncode=proc.returncode,
        ms=round((time.perf_counter() - started) * 1000, 2),
    )
    if check and proc.returncode != 0:
        raise CommandError(argv, proc.returncode, stderr)
    return subprocess.CompletedProcess(full, proc.returncode, stdout, stderr)


# Commands that outlived their time and SIGKILL: pid -> (argv, monotonic start).
_stuck: dict[int, tuple[tuple[str, ...], float]] = {}
_stuck_lock = threading.Lock()
_KILL_GRACE_S = 5.0


def _watch_stuck(proc: subprocess.Popen[str], argv: Sequence[str]) -> None:
    with _stuck_lock:
        _stuck[proc.pid] = (tuple(argv), time.monotonic())
    log.error("command_stuck", argv=list(argv), pid=proc.pid)

    def reap() -> None:
        proc.wait()  # whenever the kernel lets it go
        with _stuck_lock:
            _stuck.pop(proc.pid, None)
        log.warning("command_unstuck", argv=list(argv), pid=proc.pid)

    threading.Thread(target=reap, name=f"stuck-{proc.pid}", daemon=True).start()


def stuck_commands() -> list[tuple[tuple[str, ...], float]]:
    """Commands that could not be killed, with how long ago they started."""
    now = time.monotonic()
    with _stuck_lock:
        return [(argv, now - since) for argv, since in _stuck.values()]
