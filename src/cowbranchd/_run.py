"""The one way cowbranchd runs an external command: an argument list, never a
shell string; argv logged at debug level; failure raises CommandError carrying
argv, exit code and stderr."""

from __future__ import annotations

import subprocess
import time
from collections.abc import Mapping, Sequence

import structlog

from .errors import CommandError

__all__ = ["run"]

log = structlog.get_logger("cowbranchd.run")


def run(
    argv: Sequence[str],
    *,
    check: bool = True,
    input: str | None = None,
    env: Mapping[str, str] | None = None,
    timeout: float | None = 300.0,
    user: str | None = None,
    cwd: str | None = None,
) -> subprocess.CompletedProcess[str]:
    """Run `argv` and return its completed process (stdout/stderr as text).

    `user` runs the command as that OS user (the daemon runs as root; postgres
    tools refuse to). With `check`, a non-zero exit raises CommandError.
    """
    started = time.perf_counter()
    try:
        proc = subprocess.run(
            list(argv),
            input=input,
            capture_output=True,
            text=True,
            env=dict(env) if env is not None else None,
            timeout=timeout,
            user=user,
            cwd=cwd,
            check=False,
        )
    except FileNotFoundError as exc:
        raise CommandError(argv, 127, f"{argv[0]}: not found ({exc.strerror})") from exc
    except subprocess.TimeoutExpired as exc:
        raise CommandError(argv, -1, f"timed out after {timeout}s") from exc
    log.debug(
        "command",
        argv=list(argv),
        returncode=proc.returncode,
        ms=round((time.perf_counter() - started) * 1000, 2),
    )
    if check and proc.returncode != 0:
        raise CommandError(argv, proc.returncode, proc.stderr)
    return proc
