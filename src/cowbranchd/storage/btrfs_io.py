"""Low-level helpers of the btrfs driver (btrfs.py): syscalls Python lacks
(renameat2, statfs), the `cowbranch.json` sidecar, the error translation, and
the simple-quota ioctls that put a size limit on a subvolume.

Simple quotas (squota, kernel >= 6.7) charge each subvolume only for the
extents it writes itself: a clone is not charged for what it shares with its
origin, and unlike classic qgroups they do not slow down as snapshots pile
up (classic qgroups are never enabled here). Enabling them changes the
operator's filesystem, so it happens only when a size limit is configured.

Nothing here knows volumes, kinds or the layout of the pool.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import fcntl
import json
import os
import re
import stat
import struct
import uuid
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

from cowbranchd.errors import AlreadyExists, CommandError, NotFound, ResourceExhausted, StorageError
from cowbranchd.run import run
from cowbranchd.safefs import fsync_dir

__all__ = [
    "SIDECAR",
    "BadSidecar",
    "enable_simple_quotas",
    "fs_magic",
    "fs_name",
    "natural",
    "quota_mode",
    "read_sidecar",
    "rename_noreplace",
    "set_subvolume_limit",
    "sidecar_owner",
    "translated",
    "volume_name",
    "write_sidecar",
]

SIDECAR = "cowbranch.json"
_SIDECAR_TMP = ".cowbranch.json.tmp"
_MAX_SIDECAR = 1 << 20

_libc = ctypes.CDLL(None, use_errno=True)

# From linux/btrfs.h. _IOWR(0x94, 40, struct btrfs_ioctl_quota_ctl_args {u64 cmd, status})
_IOC_QUOTA_CTL = 0xC0109428
_QUOTA_CTL_ENABLE_SIMPLE_QUOTA = 4
# _IOR(0x94, 43, struct btrfs_ioctl_qgroup_limit_args {u64 qgroupid;
#      struct btrfs_qgroup_limit {u64 flags, max_rfer, max_excl, rsv_rfer, rsv_excl}})
_IOC_QGROUP_LIMIT = 0x8030942B
_QGROUP_LIMIT_MAX_RFER = 1
# _IOR(0x94, 31, struct btrfs_ioctl_fs_info_args): 1024 bytes, fsid at offset 16.
_IOC_FS_INFO = 0x8400941F


class BadSidecar(Exception):
    """A volume's sidecar exists but cannot be understood."""


def rename_noreplace(src: Path, dst: Path) -> None:
    """rename(2) that fails with EEXIST instead of replacing an empty `dst`
    directory, so two clones racing for one name cannot both win."""
    at_fdcwd, flag_noreplace = -100, 1
    if _libc.renameat2(at_fdcwd, os.fsencode(src), at_fdcwd, os.fsencode(dst), flag_noreplace):
        code = ctypes.get_errno()
        raise OSError(code, os.strerror(code), str(dst))


def fs_magic(path: Path) -> int:
    # Python has statvfs but no statfs, and only statfs says which filesystem.
    buf = ctypes.create_string_buffer(256)
    if _libc.statfs(os.fsencode(path), buf) != 0:
        code = ctypes.get_errno()
        raise OSError(code, os.strerror(code), str(path))
    return ctypes.c_long.from_buffer(buf).value


def fs_name(path: Path) -> str:
    """Filesystem type and source of the mount holding `path`, for messages."""
    target, best = str(path.resolve()), ("unknown", "?", -1)
    with open("/proc/self/mountinfo", encoding="utf-8") as fh:
        for line in fh:
            fields = line.split()
            mnt, sep = fields[4], fields.index("-")
            if (target == mnt or target.startswith(mnt.rstrip("/") + "/")) and len(mnt) > best[2]:
                best = (fields[sep + 1], fields[sep + 2], len(mnt))
    return f"{best[0]} ({best[1]})"


def natural(name: str) -> list[Any]:
    return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", name)]


@contextlib.contextmanager
def translated(what: str) -> Iterator[None]:
    """Turn OS, libbtrfsutil and command failures into the error tree."""
    try:
        yield
    except OSError as exc:
        if exc.errno in (errno.ENOSPC, errno.EDQUOT):
            raise ResourceExhausted(f"btrfs pool is full: {what}: {exc.strerror}") from exc
        if exc.errno == errno.EEXIST:
            raise AlreadyExists(f"{what}: already exists") from exc
        if exc.errno == errno.ENOENT:
            raise NotFound(f"{what}: not found") from exc
        raise StorageError(f"{what}: {exc}") from exc
    except CommandError as exc:
        if "No space left" in exc.stderr or "Disk quota" in exc.stderr:
            raise ResourceExhausted(f"btrfs pool is full: {what}: {exc.stderr}") from exc
        if "exists" in exc.stderr:
            raise AlreadyExists(f"{what}: already exists") from exc
        raise StorageError(f"{what}: {exc.message}") from exc


# -- sidecar -------------------------------------------------------------------


def read_sidecar(volume: Path) -> dict[str, Any] | None:
    """The sidecar's content; None when there is none or it is empty (a
    clone's sidecar torn by a power loss before it was made durable: a
    leftover). Anything else unreadable raises BadSidecar."""
    path = volume / SIDECAR
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    except FileNotFoundError:
        return None
    except OSError as exc:
        raise BadSidecar(f"{path}: {exc.strerror}") from exc
    with open(fd, "rb") as fh:
        if not stat.S_ISREG(os.fstat(fh.fileno()).st_mode):
            raise BadSidecar(f"{path} is not a regular file")
        raw = fh.read(_MAX_SIDECAR + 1)
    if not raw.strip(b"\0 \n"):
        return None
    if len(raw) > _MAX_SIDECAR:
        raise BadSidecar(f"{path} is larger than {_MAX_SIDECAR} bytes")
    try:
        data = json.loads(raw)
    except ValueError as exc:
        raise BadSidecar(f"{path} is not valid JSON ({exc})") from None
    meta = data.get("meta") if isinstance(data, dict) else None
    if not isinstance(meta, dict) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in meta.items()
    ):
        raise BadSidecar(f"{path} holds no string-to-string 'meta' table")
    return dict(data)


def sidecar_owner(data: Mapping[str, Any]) -> str | None:
    """The volume a sidecar says it belongs to (`volume_name`); None for a
    sidecar written before sidecars named their volume."""
    owner = data.get("volume")
    return owner if isinstance(owner, str) else None


def volume_name(volume: Path) -> str:
    """How a sidecar names the volume at `volume`: the last two components
    of its path (`<kind>/<name>` under the pool root)."""
    return f"{volume.parent.name}/{volume.name}"


def write_sidecar(
    volume: Path,
    meta: Mapping[str, str],
    origin: str | None,
    *,
    owner: str,
    durable: bool = True,
) -> None:
    """Write `volume`'s sidecar (temp file + rename), naming `owner`
    (`volume_name` of where it belongs): a snapshot carries its source's
    sidecar, so a clone made in place is its own only once this is written."""
    body = json.dumps(
        {"format": 1, "meta": dict(meta), "origin": origin, "volume": owner}, sort_keys=True
    )
    tmp = volume / _SIDECAR_TMP
    tmp.unlink(missing_ok=True)
    try:
        # Root's alone (0600): metadata is the daemon's, not its tenants'.
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
        with open(fd, "w", encoding="utf-8") as fh:
            fh.write(body)
            if durable:
                fh.flush()
                os.fsync(fh.fileno())
        os.rename(tmp, volume / SIDECAR)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    if durable:
        fsync_dir(volume)


# -- simple quotas ---------------------------------------------------------------


@contextlib.contextmanager
def _dir_fd(path: Path) -> Iterator[int]:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
    try:
        yield fd
    finally:
        os.close(fd)


def quota_mode(path: Path) -> str:
    """The quota mode of the btrfs filesystem holding `path`, from sysfs:
    "disabled", "squota", "qgroup" (classic), or "unknown" (a kernel too old
    to say: before 6.7, which has no simple quotas either)."""
    buf = bytearray(1024)
    with _dir_fd(path) as fd:
        fcntl.ioctl(fd, _IOC_FS_INFO, buf)
    sysfs = Path("/sys/fs/btrfs") / str(uuid.UUID(bytes=bytes(buf[16:32])))
    if not (sysfs / "qgroups").is_dir():
        return "disabled" if sysfs.is_dir() else "unknown"
    try:
        return (sysfs / "qgroups" / "mode").read_text().strip()
    except FileNotFoundError:
        return "qgroup"  # qgroups on a kernel without simple quotas


def enable_simple_quotas(path: Path) -> None:
    """Turn on simple quotas for the filesystem holding `path` (one ioctl).
    OSError when the kernel refuses (EINVAL before 6.7)."""
    with _dir_fd(path) as fd:
        fcntl.ioctl(fd, _IOC_QUOTA_CTL, struct.pack("=QQ", _QUOTA_CTL_ENABLE_SIMPLE_QUOTA, 0))


def set_subvolume_limit(path: Path, max_bytes: int) -> None:
    """Limit the subvolume whose root is `path` to `max_bytes` of its own
    extents (0: no limit), in-process; the `btrfs` command if the ioctl is
    refused for a reason other than the subvolume itself."""
    limit = max_bytes or (1 << 64) - 1  # all ones clears the limit; 0 would be a limit of 0
    # qgroupid 0: the subvolume the descriptor is in.
    args = struct.pack("=QQQQQQ", 0, _QGROUP_LIMIT_MAX_RFER, limit, 0, 0, 0)
    try:
        with _dir_fd(path) as fd:
            fcntl.ioctl(fd, _IOC_QGROUP_LIMIT, args)
    except OSError as exc:
        if exc.errno not in (errno.ENOTTY, errno.EOPNOTSUPP):
            raise
        run(["btrfs", "qgroup", "limit", str(max_bytes) if max_bytes else "none", str(path)])
