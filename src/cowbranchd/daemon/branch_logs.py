"""Each branch's postgres log: kept to a size, read back for its owner (the
last lines, then what postgres writes next), and removed with the branch.

The daemon opens the log itself, root's, 0600, in its 0700 log directory
(`Context.log_path`); postgres only inherits the descriptor (O_APPEND) as its
stdout and stderr. So no tenant can reach the file or plant anything beside
it, and postgres keeps writing to it across a daemon restart. It also means
the file cannot be renamed away under postgres, so rotation is copy and
truncate, by the daemon: once `<id>.log` passes `postgres.log_max_bytes`, its
content becomes `<id>.log.1` (an older `.1` becomes `.2`, up to
`postgres.log_files`), then the live file is truncated and postgres's next
append lands at its start. Lines written between the last copy and the
truncate (microseconds) are lost; what a branch keeps is bounded by
about (log_files + 1) x log_max_bytes plus what it writes in one reaper
interval.

Files here are opened by descriptor without following links (safefs), the
same way as everything else the daemon reads. This module does not speak
gRPC; it may not open a log for anyone but the caller that checked the owner.
"""

from __future__ import annotations

import contextlib
import os
import threading
import time
from collections.abc import Callable, Iterator

import structlog

from cowbranchd.safefs import open_dir, open_regular, unlink_if_present

from .inventory import BranchEntry, Context

__all__ = ["FOLLOW_POLL_S", "KEEPALIVE_S", "read_log", "remove_logs", "rotate_logs"]

log = structlog.get_logger("cowbranchd.branches")

CHUNK = 64 * 1024
FOLLOW_POLL_S = 0.1  # how often a followed log is checked for new lines
KEEPALIVE_S = 30.0  # an empty chunk after this long without lines
COPY_ROUNDS = 4  # catch-up copies of lines appended while rotating


def _current(branch_id: str) -> str:
    return f"{branch_id}.log"


def _rotated(branch_id: str, n: int) -> str:
    return f"{branch_id}.log.{n}"


def remove_logs(ctx: Context, branch_id: str) -> None:
    """The branch's log and its rotated files (also any beyond a since
    lowered `postgres.log_files`); idempotent."""
    try:
        with open_dir(ctx.log_dir) as dir_fd:
            unlink_if_present(dir_fd, _current(branch_id))
            n = 1
            kept = ctx.config.postgres.log_files
            while unlink_if_present(dir_fd, _rotated(branch_id, n)) or n < kept:
                n += 1
    except FileNotFoundError:
        return


def rotate_logs(ctx: Context) -> list[str]:
    """Rotate every branch's log that passed `postgres.log_max_bytes` (the
    reaper calls this). A branch busy with a create, reset or delete is left
    for the next round: holding its lock keeps a delete from racing a
    rotation that would bring a removed file back."""
    if not ctx.log_dir.is_dir():
        return []
    with ctx.inventory.lock:
        entries = list(ctx.inventory.branches.values())
    rotated = []
    for entry in entries:
        if not entry.lock.acquire(blocking=False):
            continue
        try:
            with ctx.inventory.lock:
                current = ctx.inventory.branches.get(entry.branch_id) is entry
            if current and not entry.deleting and _rotate(ctx, entry.branch_id):
                rotated.append(entry.branch_id)
        except OSError as exc:
            log.error("log_rotation_failed", branch=entry.branch_id, error=str(exc))
        finally:
            entry.lock.release()
    if rotated:
        log.info("logs_rotated", branches=rotated)
    return rotated


def _rotate(ctx: Context, branch_id: str) -> bool:
    pg = ctx.config.postgres
    name = _current(branch_id)
    with open_dir(ctx.log_dir) as dir_fd:
        try:  # the usual case, cheaply: nothing to do
            if os.stat(name, dir_fd=dir_fd, follow_symlinks=False).st_size <= pg.log_max_bytes:
                return False
        except FileNotFoundError:
            return False
        fd = open_regular(dir_fd, name, shown=str(ctx.log_dir / name), writable=True)
        if fd is None:
            return False
        try:
            if os.fstat(fd).st_size <= pg.log_max_bytes:
                return False
            for n in range(pg.log_files - 1, 0, -1):
                with contextlib.suppress(FileNotFoundError):
                    os.rename(
                        _rotated(branch_id, n),
                        _rotated(branch_id, n + 1),
                        src_dir_fd=dir_fd,
                        dst_dir_fd=dir_fd,
                    )
            _copy_and_truncate(dir_fd, fd, _rotated(branch_id, 1))
        finally:
            os.close(fd)
    return True


def _copy_and_truncate(dir_fd: int, source: int, target: str) -> None:
    """`source`'s bytes into a new file `target` (replacing it), then
    `source` truncated. Copies again what was appended meanwhile, a few
    rounds, so only the last instant before the truncate can be lost."""
    tmp = f".{target}.tmp"
    unlink_if_present(dir_fd, tmp)
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
    out = os.open(tmp, flags, 0o600, dir_fd=dir_fd)
    try:
        copied = 0
        for _ in range(COPY_ROUNDS):
            size = os.fstat(source).st_size
            if size <= copied:
                break
            while copied < size:
                data = os.pread(source, min(CHUNK * 16, size - copied), copied)
                if not data:
                    break
                os.write(out, data)
                copied += len(data)
        os.ftruncate(source, 0)
    finally:
        os.close(out)
    os.rename(tmp, target, src_dir_fd=dir_fd, dst_dir_fd=dir_fd)


def read_log(
    ctx: Context,
    entry: BranchEntry,
    *,
    tail_lines: int | None,
    follow: bool,
    stopped: threading.Event,
    still_there: Callable[[], bool],
) -> Iterator[bytes]:
    """The branch's log as chunks of bytes: everything kept (rotated files
    oldest first, then the live one) or only its last `tail_lines` lines;
    with `follow`, then what is appended, until `stopped` is set or
    `still_there()` turns false (say, the branch was deleted). An empty chunk
    when a followed log stays quiet for KEEPALIVE_S. The caller has checked
    that its caller may read this branch's log."""
    branch_id = entry.branch_id
    live_name = _current(branch_id)
    ctx.log_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
    with open_dir(ctx.log_dir) as dir_fd:

        def open_log(name: str) -> int | None:
            return open_regular(dir_fd, name, shown=str(ctx.log_dir / name))

        live = open_log(live_name)
        try:
            offset = os.fstat(live).st_size if live is not None else 0
            older: list[int] = []
            try:
                for n in range(ctx.config.postgres.log_files, 0, -1):
                    fd = open_log(_rotated(branch_id, n))
                    if fd is not None:
                        older.append(fd)
                sources = [(fd, os.fstat(fd).st_size) for fd in older]
                if live is not None:
                    sources.append((live, offset))
                yield from _initial(sources, tail_lines)
            finally:
                for fd in older:
                    os.close(fd)
            if not follow:
                return
            quiet_since = time.monotonic()
            while not stopped.wait(FOLLOW_POLL_S) and still_there():
                if live is None:
                    live, offset = open_log(live_name), 0
                sent = False
                if live is not None:
                    size = os.fstat(live).st_size
                    if size < offset:  # rotated: what was not sent yet is in .1
                        fd = open_log(_rotated(branch_id, 1))
                        if fd is not None:
                            try:
                                end = os.fstat(fd).st_size
                                sent = offset < end
                                yield from _chunks(fd, offset, end)
                            finally:
                                os.close(fd)
                        offset = 0
                    if offset < size:
                        sent = True
                        yield from _chunks(live, offset, size)
                        offset = size
                now = time.monotonic()
                if sent:
                    quiet_since = now
                elif now - quiet_since >= KEEPALIVE_S:
                    quiet_since = now
                    yield b""
        finally:
            if live is not None:
                os.close(live)


def _chunks(fd: int, start: int, end: int) -> Iterator[bytes]:
    while start < end:
        data = os.pread(fd, min(CHUNK, end - start), start)
        if not data:  # truncated meanwhile
            return
        start += len(data)
        yield data


def _initial(sources: list[tuple[int, int]], tail_lines: int | None) -> Iterator[bytes]:
    """All of `sources` ((descriptor, size), oldest first), or their last `tail_lines` lines."""
    first, offset = 0, 0
    if tail_lines is not None:
        if tail_lines <= 0:
            return
        first, offset = _tail_start(sources, tail_lines)
    for i in range(first, len(sources)):
        fd, size = sources[i]
        yield from _chunks(fd, offset if i == first else 0, size)


def _tail_start(sources: list[tuple[int, int]], lines: int) -> tuple[int, int]:
    """(index of the source, offset in it) where the last `lines` lines begin,
    read backwards a block at a time. A last line without its newline (still
    being written) counts as a line."""
    found = 0
    at_end = True
    for i in range(len(sources) - 1, -1, -1):
        fd, pos = sources[i]
        while pos > 0:
            start = max(0, pos - CHUNK)
            block = os.pread(fd, pos - start, start)
            if at_end and block:
                at_end = False
                if block.endswith(b"\n"):
                    block = block[:-1]  # the last line's own newline
            cut = len(block)
            while (cut := block.rfind(b"\n", 0, cut)) >= 0:
                found += 1
                if found == lines:
                    return i, start + cut + 1
            pos = start
    return 0, 0
