"""Copy a PostgreSQL data directory into the pool, as an unprivileged user.

The daemon runs this file's source with the system Python (`python3 -I -S -c`)
as the import user, with no supplementary groups and no_new_privs (see
`bases.copy_in`), so a caller can import only what that user can read. It is
self-contained on purpose: standard library only, no cowbranchd import.

Rules, checked while copying (one pass, every open with O_NOFOLLOW, so nothing
can be swapped in between a check and the copy):
- symbolic links are refused, except `pg_wal` and `pg_tblspc/<oid>`, whose
  targets are copied in as directories (an in-place tablespace);
- FIFOs, sockets and devices are refused;
- anything unreadable is refused, naming the path.

Usage: python3 copyin.py SOURCE DEST (DEST an existing, empty directory).
Exit 0 when copied; 3 with one line on stderr naming what was refused.
"""

from __future__ import annotations

import errno
import os
import stat
import sys

_DIR = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
_FILE = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC
_CHUNK = 1 << 30


class Refused(Exception):
    pass


def _followed_links(rel: str) -> bool:
    parts = rel.split("/")
    return rel == "pg_wal" or (len(parts) == 2 and parts[0] == "pg_tblspc")


def _copy_file(src_dir: int, dst_dir: int, name: str, rel: str, mode: int) -> None:
    try:
        src = os.open(name, _FILE, dir_fd=src_dir)
    except OSError as exc:
        raise Refused(f"{rel}: cannot read it ({exc.strerror})") from exc
    try:
        st = os.fstat(src)
        if not stat.S_ISREG(st.st_mode):
            raise Refused(f"{rel}: is not a regular file")
        dst = os.open(
            name,
            os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC,
            mode & 0o700,
            dir_fd=dst_dir,
        )
        try:
            _copy_bytes(src, dst, rel)
            os.utime(dst, ns=(st.st_atime_ns, st.st_mtime_ns))
        finally:
            os.close(dst)
    finally:
        os.close(src)


def _copy_bytes(src: int, dst: int, rel: str) -> None:
    copied = 0
    try:
        while True:
            n = os.copy_file_range(src, dst, _CHUNK)
            if n == 0:
                return
            copied += n
    except OSError as exc:
        if copied or exc.errno not in (errno.EXDEV, errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP):
            raise Refused(f"{rel}: copy failed ({exc.strerror})") from exc
    while True:
        chunk = os.read(src, 1 << 20)
        if not chunk:
            return
        view = memoryview(chunk)
        while view:
            view = view[os.write(dst, view) :]


def _copy_dir(src_dir: int, dst_dir: int, rel: str) -> int:
    copied = 0
    try:
        names = sorted(os.listdir(src_dir))
    except OSError as exc:
        raise Refused(f"{rel or '.'}: cannot list it ({exc.strerror})") from exc
    for name in names:
        path = f"{rel}/{name}" if rel else name
        st = os.lstat(name, dir_fd=src_dir)
        follow = False
        if stat.S_ISLNK(st.st_mode):
            if not _followed_links(path):
                raise Refused(f"{path}: is a symbolic link (only pg_wal and pg_tblspc/* may be)")
            follow = True
        elif stat.S_ISREG(st.st_mode):
            _copy_file(src_dir, dst_dir, name, path, st.st_mode)
            copied += 1
            continue
        elif not stat.S_ISDIR(st.st_mode):
            raise Refused(f"{path}: is a FIFO, socket or device")
        try:
            # A followed link is opened through it, once, as this user.
            sub = os.open(name, (_DIR & ~os.O_NOFOLLOW) if follow else _DIR, dir_fd=src_dir)
        except OSError as exc:
            raise Refused(f"{path}: cannot open it ({exc.strerror})") from exc
        try:
            mode = 0o700 if follow else stat.S_IMODE(st.st_mode) & 0o700 or 0o700
            os.mkdir(name, mode, dir_fd=dst_dir)
            dst_sub = os.open(name, _DIR, dir_fd=dst_dir)
            try:
                copied += _copy_dir(sub, dst_sub, path)
            finally:
                os.close(dst_sub)
        finally:
            os.close(sub)
    return copied


def main(argv: list[str]) -> int:
    source, dest = argv[1], argv[2]
    try:
        try:
            src = os.open(source, _DIR)
        except OSError as exc:
            raise Refused(f"{source}: cannot open it ({exc.strerror})") from exc
        try:
            dst = os.open(dest, _DIR)
            try:
                count = _copy_dir(src, dst, "")
            finally:
                os.close(dst)
        finally:
            os.close(src)
    except Refused as exc:
        sys.stderr.write(f"{exc}\n")
        return 3
    sys.stdout.write(f"{count}\n")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
