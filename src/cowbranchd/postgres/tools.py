"""Long-running PostgreSQL client tools (pg_basebackup, pg_restore, psql -f,
pg_dump): run as an unprivileged user, cancellable, their stderr read line by
line as it comes (progress) and kept as a bounded tail (errors).

`cowbranchd.run.run` is the helper for short commands; an import can take
hours, so it needs what `run` has no way to offer: a cancel event that kills
the tool's whole process group at once (pg_basebackup's WAL streamer and
pg_restore's workers are forked children), and a view of its output while it
runs. Privileges are dropped the same way (`as_user`, `clean_env`).

Errors::

    CowbranchError
    ├── Cancelled (CANCELLED)          the caller's cancel event was set; the tool is gone
    └── FailedPrecondition
        └── ImportFailed               the source or a transform is at fault (tool output)
"""

from __future__ import annotations

import contextlib
import os
import re
import signal
import subprocess
import tempfile
import threading
import time
from collections import deque
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import structlog

from cowbranchd.errors import Cancelled, FailedPrecondition
from cowbranchd.run import RunAs, as_user, clean_env

__all__ = ["Cancelled", "ImportFailed", "Progress", "ToolResult", "run_tool"]

log = structlog.get_logger("cowbranchd.postgres")

# (phase, bytes done, bytes total or 0 when unknown)
Progress = Callable[[str, int, int], None]

_TAIL_LINES = 40
_WAIT_SLICE_S = 0.1  # how often cancel and the tick run while a tool works
_KILL_WAIT_S = 30.0
_STDOUT_LIMIT = 256 << 20  # a schema dump of many tables


class ImportFailed(FailedPrecondition):
    """A source or transform could not be used; the message names the failing
    item, statement or command with the tool's own words."""


@dataclass(frozen=True)
class ToolResult:
    returncode: int
    stderr_tail: str
    stdout: str  # only with capture_stdout (at most _STDOUT_LIMIT bytes)


def _lines(stream: object, tail: deque[str], on_line: Callable[[str], None] | None) -> None:
    # pg_basebackup ends progress lines with \r on a terminal, \n otherwise;
    # accept both.
    assert hasattr(stream, "read")
    pending = b""
    while chunk := stream.read1(65536):  # type: ignore[attr-defined]
        pending += chunk
        *complete, pending = re.split(rb"[\r\n]", pending)
        for raw in complete:
            if raw:
                line = raw.decode(errors="replace")
                tail.append(line)
                if on_line is not None:
                    on_line(line)
    if pending:
        tail.append(pending.decode(errors="replace"))


def run_tool(
    argv: Sequence[str],
    *,
    user: RunAs,
    env: Mapping[str, str] | None = None,
    cancel: threading.Event | None = None,
    on_line: Callable[[str], None] | None = None,
    on_tick: Callable[[int], None] | None = None,
    timeout: float | None = None,
    cwd: str = "/",
    input: bytes | None = None,
    capture_stdout: bool = False,
) -> ToolResult:
    """Run `argv` as `user` in a session of its own and wait for it.

    `on_line` sees each stderr line as it comes, `on_tick(pid)` runs every
    ~0.1 s while the tool works (size polling). Setting `cancel` (or passing
    `timeout`) SIGKILLs the tool's process group and raises Cancelled
    (ImportFailed for the timeout) once every process of it is gone. The
    exit code and the stderr tail come back (and stdout with
    `capture_stdout`, kept in an anonymous file, not a pipe that could fill);
    the caller decides what a failure means. `input` is written to stdin.
    """
    started = time.monotonic()
    full = [*as_user(user), *argv]
    log.debug("tool", argv=list(argv), user=str(user))
    out = tempfile.TemporaryFile() if capture_stdout else None  # noqa: SIM115
    stdin = tempfile.TemporaryFile() if input is not None else None  # noqa: SIM115
    if stdin is not None and input is not None:
        stdin.write(input)
        stdin.seek(0)
    proc = subprocess.Popen(
        full,
        stdin=stdin if stdin is not None else subprocess.DEVNULL,
        stdout=out if out is not None else subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        env=clean_env(env),
        cwd=cwd,
        start_new_session=True,  # its own group: killpg reaches forked workers
    )
    tail: deque[str] = deque(maxlen=_TAIL_LINES)
    reader = threading.Thread(
        target=_lines, args=(proc.stderr, tail, on_line), name=f"tool-{proc.pid}", daemon=True
    )
    reader.start()
    why = ""
    try:
        while True:
            try:
                proc.wait(timeout=_WAIT_SLICE_S)
                break
            except subprocess.TimeoutExpired:
                pass
            if cancel is not None and cancel.is_set():
                why = "cancelled"
            elif timeout is not None and time.monotonic() - started > timeout:
                why = f"timed out after {timeout:.0f}s"
            if why:
                _kill_group(proc)
                break
            if on_tick is not None:
                on_tick(proc.pid)
    except BaseException:
        _kill_group(proc)
        raise
    finally:
        reader.join(_KILL_WAIT_S)
        assert proc.stderr is not None
        proc.stderr.close()
        if stdin is not None:
            stdin.close()
    stdout = ""
    if out is not None:
        with out:
            out.seek(0)
            stdout = out.read(_STDOUT_LIMIT).decode(errors="replace")
    text = "\n".join(tail)
    log.debug("tool done", argv=list(argv), returncode=proc.returncode, why=why)
    if why == "cancelled":
        raise Cancelled(f"{os.path.basename(argv[0])} was cancelled")
    if why:
        raise ImportFailed(f"{os.path.basename(argv[0])} {why}: {text[-2000:]}")
    return ToolResult(proc.returncode, text, stdout)


def _kill_group(proc: subprocess.Popen[bytes]) -> None:
    """SIGKILL the tool's process group and wait until no member is left
    (the group id is the tool's pid, not reused while any member lives)."""
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, signal.SIGKILL)
    with contextlib.suppress(subprocess.TimeoutExpired):
        proc.wait(_KILL_WAIT_S)
    deadline = time.monotonic() + _KILL_WAIT_S
    while time.monotonic() < deadline:
        try:
            os.killpg(proc.pid, 0)
        except (ProcessLookupError, PermissionError):
            return
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(proc.pid, signal.SIGKILL)
        time.sleep(0.01)
    log.warning("tool processes linger", pgid=proc.pid)
