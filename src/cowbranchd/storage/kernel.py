"""The kernel interface behind idmapped mounts, called by number through
ctypes (Python has no wrappers): the mount API syscalls (`open_tree`,
`mount_setattr`, `move_mount`), `struct mount_attr`, and user namespaces made
by a vfork-style `clone` of a child that exits at once while root writes its
maps (no fork of the daemon). The errors every caller maps to. idmap.py
composes these; nothing here knows about branches, postgres or mounts' paths.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import os
import platform

from cowbranchd.errors import FailedPrecondition, StorageError

__all__ = [
    "AT_EMPTY_PATH",
    "AT_SYMLINK_NOFOLLOW",
    "MNT_DETACH",
    "MOUNT_ATTR_IDMAP",
    "MOVE_MOUNT_F_EMPTY_PATH",
    "MOVE_MOUNT_T_EMPTY_PATH",
    "OPEN_TREE_CLOEXEC",
    "OPEN_TREE_CLONE",
    "PATH_FLAGS",
    "UMOUNT_NOFOLLOW",
    "UNSUPPORTED",
    "IdmapError",
    "IdmapUnsupported",
    "MountAttr",
    "MountBusy",
    "check_arch",
    "libc",
    "syscall",
    "user_namespace",
]

# Mount API syscalls were added after the unified numbering (asm-generic,
# 424 and up), so x86_64 and aarch64 share these numbers.
_SYSCALLS = {"open_tree": 428, "move_mount": 429, "mount_setattr": 442}
_ARCHES = frozenset({"x86_64", "aarch64"})

OPEN_TREE_CLONE = 0x1
OPEN_TREE_CLOEXEC = os.O_CLOEXEC
AT_SYMLINK_NOFOLLOW = 0x100
AT_EMPTY_PATH = 0x1000
MOVE_MOUNT_F_EMPTY_PATH = 0x4
MOVE_MOUNT_T_EMPTY_PATH = 0x40
MOUNT_ATTR_IDMAP = 0x100000
MNT_DETACH = 0x2
UMOUNT_NOFOLLOW = 0x8
CLONE_VM = 0x100
CLONE_VFORK = 0x4000
CLONE_NEWUSER = 0x10000000
WALL = 0x40000000  # __WALL: also wait for children that signal nothing on exit

_ID_MAX = 0xFFFFFFFE  # (uid_t)-1 is "no id" and can never be mapped
PATH_FLAGS = os.O_PATH | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
# An errno from open_tree/mount_setattr that means "not here": no mount API
# (ENOSYS), a filesystem without FS_ALLOW_IDMAP (EINVAL), or a refusal to
# idmap this mount (EPERM, EOPNOTSUPP).
UNSUPPORTED = frozenset({errno.ENOSYS, errno.EINVAL, errno.EPERM, errno.EOPNOTSUPP})
_CHILD_STACK = 16 << 10


class MountAttr(ctypes.Structure):
    """struct mount_attr, MOUNT_ATTR_SIZE_VER0 (32 bytes)."""

    _fields_ = (
        ("attr_set", ctypes.c_uint64),
        ("attr_clr", ctypes.c_uint64),
        ("propagation", ctypes.c_uint64),
        ("userns_fd", ctypes.c_uint64),
    )


class IdmapUnsupported(FailedPrecondition):
    """Idmapped mounts cannot be made at `path` (kernel, architecture or filesystem)."""

    def __init__(self, path: str, reason: str) -> None:
        super().__init__(f"{path}: idmapped mounts unsupported: {reason}")
        self.path = path
        self.reason = reason


class IdmapError(StorageError):
    """A mount syscall failed for another reason than missing support."""

    def __init__(self, call: str, path: str, err: int, detail: str = "") -> None:
        text = f"{call}({path}): {errno.errorcode.get(err, str(err))} ({os.strerror(err)})"
        super().__init__(f"{text}: {detail}" if detail else text)
        self.call = call
        self.path = path
        self.errno = err


class MountBusy(IdmapError):
    """`unmount` without `lazy`: a process still has a file or its cwd in the mount."""


libc = ctypes.CDLL(None, use_errno=True)
libc.syscall.restype = ctypes.c_long
libc.umount2.argtypes = (ctypes.c_char_p, ctypes.c_int)
libc.umount2.restype = ctypes.c_int
libc.clone.argtypes = (ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int, ctypes.c_void_p)
libc.clone.restype = ctypes.c_int
_EXIT = ctypes.cast(libc._exit, ctypes.c_void_p)


def check_arch(path: str) -> None:
    if platform.machine() not in _ARCHES:
        raise IdmapUnsupported(
            path, f"no mount API syscall numbers for {platform.machine()} (known: x86_64, aarch64)"
        )


def syscall(name: str, *args: object) -> int:
    """Call `name` by number (arguments as ctypes values, paths as bytes);
    return its result or raise OSError with errno."""
    result = int(libc.syscall(ctypes.c_long(_SYSCALLS[name]), *args))
    if result < 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))
    return result


def _check_map(name: str, idmap: tuple[int, int, int]) -> str:
    inside, outside, count = idmap
    if count < 1 or min(inside, outside) < 0 or max(inside, outside) + count - 1 > _ID_MAX:
        raise ValueError(f"{name} {idmap!r}: need (inside, outside, count) within 0..{_ID_MAX}")
    return f"{inside} {outside} {count}\n"


def _write_proc(pid: int, name: str, text: str) -> None:
    fd = os.open(f"/proc/{pid}/{name}", os.O_WRONLY | os.O_CLOEXEC)
    try:
        os.write(fd, text.encode())
    finally:
        os.close(fd)


def user_namespace(uid_map: tuple[int, int, int], gid_map: tuple[int, int, int]) -> int:
    """A descriptor (O_CLOEXEC, the caller closes it) of a fresh user
    namespace whose only maps are `uid_map` and `gid_map`, each (inside,
    outside, count). Needs root (CAP_SETUID/CAP_SETGID in our namespace).

    How: glibc `clone(_exit, stack, CLONE_VM|CLONE_VFORK|CLONE_NEWUSER)`
    starts a child in a new user namespace that shares our memory and
    exits at once; only this thread waits for it (vfork), and it touches
    nothing but its own stack. Its zombie, not yet reaped (WNOWAIT), still
    has the namespace: root writes the maps and opens /proc/<pid>/ns/user,
    then reaps it. The child's exit signal is 0, not SIGCHLD: then neither
    SIGCHLD=SIG_IGN nor anyone's waitpid(-1) can reap it before we are
    done (only __WALL waits for it). About 0.15 ms here, against ~2-3 ms
    for spawning `unshare --user`, and no fork of the daemon.
    """
    uid_text = _check_map("uid_map", uid_map)
    gid_text = _check_map("gid_map", gid_map)
    stack = ctypes.create_string_buffer(_CHILD_STACK)  # one per call: threads may race
    top = ctypes.c_void_p(ctypes.addressof(stack) + _CHILD_STACK)
    pid = libc.clone(_EXIT, top, CLONE_VM | CLONE_VFORK | CLONE_NEWUSER, None)
    if pid < 0:
        err = ctypes.get_errno()
        raise IdmapError("clone", "CLONE_NEWUSER", err, "cannot create a user namespace")
    try:
        # The child has exited by now (vfork); wait without reaping it.
        os.waitid(os.P_PID, pid, os.WEXITED | os.WNOWAIT | WALL)
        _write_proc(pid, "uid_map", uid_text)
        _write_proc(pid, "gid_map", gid_text)
        return os.open(f"/proc/{pid}/ns/user", os.O_RDONLY | os.O_CLOEXEC)
    except OSError as exc:
        raise IdmapError("user_namespace", f"/proc/{pid}", exc.errno or errno.EIO) from exc
    finally:
        with contextlib.suppress(ChildProcessError):
            os.waitpid(pid, WALL)
