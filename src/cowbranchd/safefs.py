"""File access inside trees a tenant controls, for a daemon that runs as root.

Every branch hands out a PostgreSQL superuser, and a superuser can run programs
as the OS user that owns its data directory (`COPY ... TO PROGRAM`). So every
name under a clone, a base or an imported directory may be a symlink to a
root-only file, a FIFO that blocks whoever opens it, a device, or a huge file.
The daemon touches such trees only through this module:

- directories are opened with O_NOFOLLOW | O_DIRECTORY and worked on by file
  descriptor (`openat`-style), so no path component is resolved through a link;
- files are opened with O_NOFOLLOW | O_NONBLOCK and checked to be regular
  before a byte is read, and reads are capped;
- files are written by creating a new private temp file (O_EXCL) and renaming
  it over the old name: a rename replaces a planted link, never its target;
- removal uses unlinkat and `shutil.rmtree(dir_fd=...)`, which never follow;
- a walk (`walk_tree`) reads names and their own lstat, never a file's content,
  and enters a subdirectory only by O_NOFOLLOW | O_DIRECTORY from its parent.

What this module may not do: resolve a path inside such a tree with plain
`open()`/`Path` calls, or follow a link for anyone. Anything unexpected raises
UnsafePath naming the path, and the caller fails that branch, not the daemon.
"""

from __future__ import annotations

import contextlib
import errno
import os
import shutil
import stat
from collections.abc import Iterator
from pathlib import PurePosixPath

from .errors import FailedPrecondition

__all__ = [
    "UnsafePath",
    "append_regular",
    "fsync_dir",
    "open_dir",
    "open_regular",
    "read_regular",
    "remove_tree_entries",
    "replace_file",
    "unlink_if_present",
    "walk_tree",
]

_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
# A data directory is at most ~5 levels deep (pg_tblspc/<oid>/PG_*/<db>/<file>).
_MAX_WALK_DEPTH = 64


class UnsafePath(FailedPrecondition):
    """A name in a tenant's tree is a link, a special file or too large."""

    def __init__(self, path: str, problem: str) -> None:
        super().__init__(
            f"{path}: {problem}; cowbranchd does not follow links or open "
            "special files in a branch's data directory"
        )
        self.path = path


def _kind(mode: int) -> str:
    if stat.S_ISLNK(mode):
        return "a symbolic link"
    if stat.S_ISFIFO(mode):
        return "a FIFO"
    if stat.S_ISSOCK(mode):
        return "a socket"
    if stat.S_ISCHR(mode) or stat.S_ISBLK(mode):
        return "a device"
    if stat.S_ISDIR(mode):
        return "a directory"
    return "not a regular file"


def _why(dir_fd: int | None, name: str) -> str:
    try:
        return _kind(os.lstat(name, dir_fd=dir_fd).st_mode)
    except OSError:
        return "not a directory"


@contextlib.contextmanager
def open_dir(
    path: str | os.PathLike[str], *, dir_fd: int | None = None, shown: str = ""
) -> Iterator[int]:
    """A descriptor of directory `path` (relative to `dir_fd` if given); a link
    or non-directory at the last component is UnsafePath. Earlier components
    must be the daemon's own (root-owned) directories."""
    shown = shown or os.fspath(path)
    try:
        fd = os.open(path, _DIR_FLAGS, dir_fd=dir_fd)
    except OSError as exc:
        if exc.errno in (errno.ELOOP, errno.ENOTDIR):
            raise UnsafePath(shown, f"is {_why(dir_fd, os.fspath(path))}, not a directory") from exc
        raise
    try:
        yield fd
    finally:
        os.close(fd)


def _open_regular(dir_fd: int, name: str, flags: int, shown: str) -> int | None:
    """`name` in `dir_fd` opened with `flags` plus O_NOFOLLOW | O_NONBLOCK and
    checked to be a regular file; None if absent; UnsafePath otherwise."""
    try:
        fd = os.open(name, flags | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC, dir_fd=dir_fd)
    except FileNotFoundError:
        return None
    except OSError as exc:
        if exc.errno in (errno.ELOOP, errno.ENXIO, errno.EISDIR, errno.ENODEV):
            raise UnsafePath(shown, f"is {_why(dir_fd, name)}") from exc
        raise
    mode = os.fstat(fd).st_mode
    if not stat.S_ISREG(mode):
        os.close(fd)
        raise UnsafePath(shown, f"is {_kind(mode)}")
    return fd


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]


def open_regular(dir_fd: int, name: str, *, shown: str, writable: bool = False) -> int | None:
    """A descriptor of regular file `name` in `dir_fd` (the caller closes
    it), read-only unless `writable`; None if absent. For a file whose size
    is not known in advance, such as a growing log. No link followed, no
    FIFO opened."""
    return _open_regular(dir_fd, name, os.O_RDWR if writable else os.O_RDONLY, shown)


def read_regular(dir_fd: int, name: str, *, limit: int, shown: str) -> bytes | None:
    """The content of regular file `name` in `dir_fd`, None if absent.

    Never blocks (a FIFO is refused before it is read), never follows a link,
    and refuses a file larger than `limit` bytes instead of reading it."""
    fd = _open_regular(dir_fd, name, os.O_RDONLY, shown)
    if fd is None:
        return None
    try:
        size = os.fstat(fd).st_size
        if size > limit:
            raise UnsafePath(shown, f"is {size} bytes, more than the {limit} expected")
        data = os.read(fd, limit + 1)
        if len(data) > limit:
            raise UnsafePath(shown, f"is more than the {limit} bytes expected")
        return data
    finally:
        os.close(fd)


def unlink_if_present(dir_fd: int, name: str) -> bool:
    """Remove `name` (a file, link, FIFO...; not a directory) from `dir_fd`.
    unlinkat removes a link itself, never what it points at."""
    try:
        os.unlink(name, dir_fd=dir_fd)
    except FileNotFoundError:
        return False
    return True


def remove_tree_entries(dir_fd: int, shown: str) -> int:
    """Empty the directory `dir_fd`: files and links unlinked, subdirectories
    removed with rmtree by descriptor (which never follows links). Returns how
    many entries went."""
    assert shutil.rmtree.avoids_symlink_attacks
    removed = 0
    with os.scandir(dir_fd) as entries:
        names = [(e.name, e.is_dir(follow_symlinks=False)) for e in entries]
    for name, is_dir in names:
        if is_dir:
            shutil.rmtree(name, dir_fd=dir_fd)
        else:
            unlink_if_present(dir_fd, name)
        removed += 1
    return removed


def replace_file(
    dir_fd: int, name: str, data: bytes, *, uid: int, gid: int, mode: int = 0o600
) -> None:
    """Atomically make `name` in `dir_fd` a regular file holding `data`, owned
    by uid:gid. The new content goes to a fresh O_EXCL temp file first; the
    rename then replaces whatever `name` was (a planted link included) without
    ever opening it."""
    tmp = f".{name}.cowbranchd-tmp"
    with contextlib.suppress(FileNotFoundError):
        os.unlink(tmp, dir_fd=dir_fd)
    fd = os.open(
        tmp,
        os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC,
        mode,
        dir_fd=dir_fd,
    )
    try:
        try:
            os.fchown(fd, uid, gid)
            os.fchmod(fd, mode)
            _write_all(fd, data)
        finally:
            os.close(fd)
        os.rename(tmp, name, src_dir_fd=dir_fd, dst_dir_fd=dir_fd)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp, dir_fd=dir_fd)
        raise


def append_regular(dir_fd: int, name: str, data: bytes, *, shown: str) -> None:
    """Append `data` to the existing regular file `name` (no link, no FIFO)."""
    fd = _open_regular(dir_fd, name, os.O_WRONLY | os.O_APPEND, shown)
    if fd is None:
        raise FileNotFoundError(errno.ENOENT, os.strerror(errno.ENOENT), shown)
    try:
        _write_all(fd, data)
    finally:
        os.close(fd)


def walk_tree(dir_fd: int, *, shown: str) -> Iterator[tuple[str, os.stat_result]]:
    """Every entry below the directory `dir_fd`, depth first, as (its path
    relative to `dir_fd`, its own lstat). A link is reported, never followed;
    a subdirectory is entered by O_NOFOLLOW | O_DIRECTORY from its parent's
    descriptor, so one swapped for a link meanwhile is not entered. Entries
    that vanish during the walk are skipped. Deeper than 64 levels is
    UnsafePath (no data directory is; a planted tree could be)."""
    return _walk(dir_fd, shown, "", 0)


def _walk(
    dir_fd: int, shown: str, prefix: str, depth: int
) -> Iterator[tuple[str, os.stat_result]]:
    if depth > _MAX_WALK_DEPTH:
        raise UnsafePath(shown, f"is nested deeper than {_MAX_WALK_DEPTH} directories")
    with os.scandir(dir_fd) as listing:
        entries = list(listing)
    for entry in entries:
        try:
            st = entry.stat(follow_symlinks=False)
        except FileNotFoundError:
            continue
        path = f"{prefix}{entry.name}"
        yield path, st
        if not stat.S_ISDIR(st.st_mode):
            continue
        try:
            child = os.open(entry.name, _DIR_FLAGS, dir_fd=dir_fd)
        except OSError as exc:
            if exc.errno in (errno.ENOENT, errno.ENOTDIR, errno.ELOOP):
                continue  # gone, or replaced by a file or a link since it was listed
            raise
        try:
            yield from _walk(child, str(PurePosixPath(shown, entry.name)), f"{path}/", depth + 1)
        finally:
            os.close(child)


def fsync_dir(path: str | os.PathLike[str]) -> None:
    """Make the entries of directory `path` durable (a file created or
    renamed in it): fsync of the directory itself."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
