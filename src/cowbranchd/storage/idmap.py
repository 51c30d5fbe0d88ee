"""Idmapped mounts: how one branch's postmaster runs as its own OS user
without a single `chown` of its data.

A clone's files belong on disk to the shared `postgres` user. `idmapped_mount`
presents the clone's directory at a second path through a mount whose idmap
sends the on-disk ids to the branch's own uid/gid: through that path the files
appear to belong to the branch user, and what the branch user creates lands on
disk as `postgres`. Any other id (root's, another branch's) has no mapping in
the mount, appears as the overflow id (65534) and cannot be created through it.
Through the raw path, the branch user is just another user and finds the
`postgres` 0700 data directories of every other clone and base closed.

The kernel interface has no Python wrapper, so it is called by number through
ctypes: `open_tree(OPEN_TREE_CLONE)` makes a detached copy of the mount at
`source`, `mount_setattr(MOUNT_ATTR_IDMAP)` gives it the idmap of a user
namespace, `move_mount` attaches it at `target`. The user namespace only
carries the map: a child is cloned into it and exits at once, root writes the
maps, and the namespace lives on as long as a descriptor or a mount holds it.

What this module may not do: follow a link (sources and targets are opened
O_NOFOLLOW, and `source`/`target` must be the daemon's own directories whose
parents the caller vouches for); chown anything; stack a second mount on a
target; fork the daemon (a forked copy of a big threaded process is slow and
unsafe). It knows nothing of branches, postgres or storage drivers.

Errors::

    FailedPrecondition
    └── IdmapUnsupported   the kernel, architecture or filesystem cannot idmap
    StorageError
    └── IdmapError         a mount syscall failed (names the call, path, errno)
        └── MountBusy      unmount refused: something still uses the mount
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import os
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import structlog

from .kernel import (
    AT_EMPTY_PATH,
    AT_SYMLINK_NOFOLLOW,
    MNT_DETACH,
    MOUNT_ATTR_IDMAP,
    MOVE_MOUNT_F_EMPTY_PATH,
    MOVE_MOUNT_T_EMPTY_PATH,
    OPEN_TREE_CLOEXEC,
    OPEN_TREE_CLONE,
    UMOUNT_NOFOLLOW,
    IdmapError,
    IdmapUnsupported,
    MountBusy,
    user_namespace,
)
from .kernel import PATH_FLAGS as _PATH_FLAGS
from .kernel import UNSUPPORTED as _UNSUPPORTED
from .kernel import MountAttr as _MountAttr
from .kernel import check_arch as _check_arch
from .kernel import libc as _libc
from .kernel import syscall as _syscall

__all__ = [
    "IdmapError",
    "IdmapUnsupported",
    "MountBusy",
    "idmapped_mount",
    "is_idmapped_mount",
    "supports_idmap",
    "unmount",
    "user_namespace",
]

log = structlog.get_logger("cowbranchd.idmap")


def _mount_id(fd: int) -> int:
    """The id of the mount `fd` lives on (as in /proc/self/mountinfo)."""
    with open(f"/proc/self/fdinfo/{fd}", encoding="ascii") as fh:
        for line in fh:
            if line.startswith("mnt_id:"):
                return int(line.split()[1])
    raise IdmapError("fdinfo", f"/proc/self/fdinfo/{fd}", errno.ENODATA, "no mnt_id")


def _mountinfo(mount_id: int) -> tuple[list[str], str]:
    """(mount options, filesystem type) of mount `mount_id`."""
    with open("/proc/self/mountinfo", encoding="utf-8", errors="replace") as fh:
        for line in fh:
            fields = line.split()
            if int(fields[0]) == mount_id:
                return fields[5].split(","), fields[fields.index("-", 6) + 1]
    return [], "unknown"


def _mount_root_id(fd: int) -> int | None:
    """The mount id if the directory `fd` is the root of a mount (something
    is mounted there), else None. Compared with its parent through "..",
    which climbs out of a mount, so no path string is ever matched."""
    parent = os.open("..", _PATH_FLAGS, dir_fd=fd)
    try:
        mine = _mount_id(fd)
        return mine if mine != _mount_id(parent) else None
    finally:
        os.close(parent)


def _filesystem(fd: int) -> str:
    return _mountinfo(_mount_id(fd))[1]


@contextlib.contextmanager
def _opened(path: Path, what: str) -> Iterator[int]:
    try:
        fd = os.open(path, _PATH_FLAGS)
    except OSError as exc:
        link = " is a symbolic link, never followed" if os.path.islink(path) else ""
        raise IdmapError(
            "open", str(path), exc.errno or errno.EIO, f"{what} directory{link}"
        ) from exc
    try:
        yield fd
    finally:
        os.close(fd)


def _idmapped_tree(source_fd: int, source: Path, userns_fd: int) -> int:
    """A detached, idmapped copy of the mount at `source_fd` (its descriptor)."""
    try:
        tree = _syscall(
            "open_tree",
            ctypes.c_int(source_fd),
            b"",
            ctypes.c_uint(
                OPEN_TREE_CLONE | OPEN_TREE_CLOEXEC | AT_EMPTY_PATH | AT_SYMLINK_NOFOLLOW
            ),
        )
    except OSError as exc:
        if exc.errno == errno.ENOSYS:
            raise IdmapUnsupported(str(source), "no open_tree (kernel before 5.2)") from exc
        raise IdmapError("open_tree", str(source), exc.errno or errno.EIO) from exc
    attr = _MountAttr(attr_set=MOUNT_ATTR_IDMAP, userns_fd=userns_fd)
    try:
        _syscall(
            "mount_setattr",
            ctypes.c_int(tree),
            b"",
            ctypes.c_uint(AT_EMPTY_PATH),
            ctypes.c_void_p(ctypes.addressof(attr)),
            ctypes.c_size_t(ctypes.sizeof(attr)),
        )
    except OSError as exc:
        os.close(tree)
        err = exc.errno or errno.EIO
        if err in _UNSUPPORTED:
            raise IdmapUnsupported(
                str(source),
                f"filesystem {_filesystem(source_fd)} refused MOUNT_ATTR_IDMAP with "
                f"{errno.errorcode.get(err, str(err))} ({os.strerror(err)})",
            ) from exc
        raise IdmapError("mount_setattr", str(source), err) from exc
    return tree


def idmapped_mount(
    source: Path, target: Path, *, disk_uid: int, disk_gid: int, uid: int, gid: int
) -> None:
    """Present directory `source` at `target` so that files owned on disk by
    `disk_uid:disk_gid` appear owned by `uid:gid`, and files `uid:gid`
    creates there land on disk as `disk_uid:disk_gid`.

    `target` is created (0755, root) when missing and removed again if the
    mount fails; a mount already at `target` is an IdmapError. Only the
    mount at `source` is carried, not mounts below it (a tenant cannot make
    any). Raises IdmapUnsupported when the filesystem or kernel cannot.
    """
    _check_arch(str(source))
    started = time.perf_counter()
    created = False
    try:
        os.mkdir(target, 0o755)
        created = True
    except FileExistsError:
        pass
    except OSError as exc:
        raise IdmapError("mkdir", str(target), exc.errno or errno.EIO) from exc
    try:
        with _opened(source, "source") as source_fd, _opened(target, "target") as target_fd:
            if _mount_root_id(target_fd) is not None:
                raise IdmapError("move_mount", str(target), errno.EBUSY, "already a mount point")
            userns = user_namespace((disk_uid, uid, 1), (disk_gid, gid, 1))
            try:
                tree = _idmapped_tree(source_fd, source, userns)
            finally:
                os.close(userns)  # the mount keeps its own reference
            try:
                _syscall(
                    "move_mount",
                    ctypes.c_int(tree),
                    b"",
                    ctypes.c_int(target_fd),
                    b"",
                    ctypes.c_uint(MOVE_MOUNT_F_EMPTY_PATH | MOVE_MOUNT_T_EMPTY_PATH),
                )
            except OSError as exc:
                raise IdmapError("move_mount", str(target), exc.errno or errno.EIO) from exc
            finally:
                os.close(tree)  # attached now, or dissolved with its last descriptor
    except BaseException:
        if created:
            with contextlib.suppress(OSError):
                os.rmdir(target)
        raise
    log.debug(
        "idmapped mount",
        source=str(source),
        target=str(target),
        disk_ids=f"{disk_uid}:{disk_gid}",
        ids=f"{uid}:{gid}",
        ms=round((time.perf_counter() - started) * 1000, 3),
    )


def unmount(target: Path, *, lazy: bool = False) -> None:
    """Unmount the idmapped mount at `target`; nothing mounted there (or no
    `target`) is success. The directory itself stays. Any other kind of
    mount there is an IdmapError and stays: a wrong path must never take
    the pool down.

    Not lazy by default: the caller stops the postmaster first, so a busy
    mount means a process the branch user left behind still works in it,
    and detaching would hand that process the data while the caller goes
    on to destroy the clone. MountBusy lets the caller find and end it, or
    retry; `lazy=True` detaches anyway (MNT_DETACH): the mount leaves the
    tree at once and lives on only for the processes still inside it.
    """
    mounted = _mount_at(target)
    if mounted is None:
        return
    if "idmapped" not in mounted:
        raise IdmapError("umount2", str(target), errno.EINVAL, "not an idmapped mount; left alone")
    # By path, not by the descriptor just checked: holding one keeps it busy.
    flags = UMOUNT_NOFOLLOW | (MNT_DETACH if lazy else 0)
    if _libc.umount2(os.fsencode(target), flags) == 0:
        log.debug("unmounted", target=str(target), lazy=lazy)
        return
    err = ctypes.get_errno()
    if err in (errno.EINVAL, errno.ENOENT):  # unmounted meanwhile
        return
    if err == errno.EBUSY:
        raise MountBusy("umount2", str(target), err, "still in use (stop its processes first)")
    raise IdmapError("umount2", str(target), err)


def _mount_at(target: Path) -> list[str] | None:
    """The options of the topmost mount at `target`, None if nothing is
    mounted there (or `target` is missing, or a link: never ours)."""
    try:
        fd = os.open(target, _PATH_FLAGS)
    except (FileNotFoundError, NotADirectoryError):
        return None
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            return None
        raise
    try:
        mount_id = _mount_root_id(fd)
        return None if mount_id is None else _mountinfo(mount_id)[0]
    finally:
        os.close(fd)


def is_idmapped_mount(target: Path) -> bool:
    """Whether an idmapped mount sits at `target` (the topmost mount there
    carries the `idmapped` option in /proc/self/mountinfo)."""
    mounted = _mount_at(target)
    return mounted is not None and "idmapped" in mounted


_supported: dict[int, bool] = {}
_supported_lock = threading.Lock()


def supports_idmap(directory: Path) -> bool:
    """Whether idmapped mounts work on the filesystem holding `directory`.

    Tried once per filesystem device on a scratch directory made inside
    `directory`: it is cloned and idmapped, but never attached, so no mount
    can outlive the probe, even a crash; the scratch directory is removed.
    Errors other than "unsupported" (no permission, a full disk) raise.
    """
    device = os.stat(directory).st_dev
    with _supported_lock:
        if device in _supported:
            return _supported[device]
    scratch = Path(tempfile.mkdtemp(prefix=".idmap-probe-", dir=directory))
    try:
        _check_arch(str(directory))
        with _opened(scratch, "probe") as fd:
            userns = user_namespace((0, 65534, 1), (0, 65534, 1))
            try:
                os.close(_idmapped_tree(fd, scratch, userns))
            finally:
                os.close(userns)
        answer = True
    except IdmapUnsupported as exc:
        log.info("idmapped mounts unsupported", directory=str(directory), reason=exc.reason)
        answer = False
    finally:
        os.rmdir(scratch)
    with _supported_lock:
        _supported[device] = answer
    return answer
