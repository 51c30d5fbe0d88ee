"""The ZFS driver's plumbing: metadata as `cowbranchd:*` user properties
(encoded, size-checked), telling zfs-fuse from kernel OpenZFS, the process-wide
lock that serialises zfs-fuse's mutating commands, and libzfs_core error
mapping. No driver logic: zfs.py composes these.

Values are stored with `\\` and control characters escaped as `\\xHH`: `zfs get
-H` output is tab/newline separated. A stored value may be at most 8191 bytes
(ZAP_MAXVALUELEN 8192 with its NUL; longer values crash zfs-fuse's `zfs set`),
so longer values raise InvalidArgument naming the key.

zfs-fuse (userspace ZFS) deadlocks under concurrent mutating commands: a
mount, unmount or destroy makes the daemon (and the `zfs` command itself, which
creates and removes mountpoints) look paths up through FUSE mounts that same
daemon serves, and with several in flight it stops answering, leaving `zfs`
commands in uninterruptible sleep until zfs-fuse is killed. So on zfs-fuse
(`ZfsDriver.userspace`) every command but `get`/`list` runs one at a time in
this process; reads stay concurrent. Kernel OpenZFS keeps full concurrency.
This module does not coordinate with other processes sharing the zfs-fuse.
"""

from __future__ import annotations

import contextlib
import errno
import importlib
import os
import re
import threading
import time
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from types import ModuleType

from cowbranchd.deadline import holding
from cowbranchd.errors import (
    AlreadyExists,
    CommandError,
    InvalidArgument,
    NotFound,
    ResourceExhausted,
    StorageError,
)
from cowbranchd.run import run

from ._names import check_meta
from .base import Kind, SnapshotRef, Volume

__all__ = [
    "MARKER",
    "MAX_VALUE_BYTES",
    "PREFIX",
    "USERSPACE_LOCK",
    "Busy",
    "Pinned",
    "ZfsCommands",
    "decode",
    "encode",
    "lzc",
    "lzc_call",
    "natural",
    "optional",
    "parse_properties",
    "props",
    "served_by_fuse",
    "volumes_of",
    "zfs_mount_type",
]


PREFIX = "cowbranchd:"
MARKER = PREFIX + ".volume"
MAX_VALUE_BYTES = 8191
# One for the process, not per driver: zfs-fuse is one daemon per machine,
# and two drivers (a test's reopen(), say) must not run mutations side by side.
# Width 1, measured on zfs-fuse 0.7.0 (20 parallel creates, then deletes, per
# round): with 2 at once a daemon hung in its third round (zfs-fuse's own
# `umount` children and every postmaster waiting on FUSE answers that never
# came; only killing zfs-fuse freed them); 4 at once and unbounded hung a
# driver-level clone/destroy storm too. Width 1 survived 70 such rounds beside
# 4 threads running `zfs get` nonstop, and every daemon round. Its price: 20
# clones through the driver take ~0.75 s instead of ~0.3 s; through a daemon
# (8 writes at once) 20 creates took 2.3-3.4 s a round, unserialized 2.1-5.9 s.
USERSPACE_LOCK = threading.Lock()


def optional(module: str) -> ModuleType | None:
    try:
        return importlib.import_module(module)
    except ImportError:
        return None


# OpenZFS ships these bindings with its packages; zfs-fuse has none.
lzc = optional("libzfs_core")


def served_by_fuse(dataset: str) -> bool:
    """Whether `dataset`'s pool is zfs-fuse's rather than kernel OpenZFS's.

    A mounted dataset of the pool says so in /proc/self/mountinfo (type
    `fuse.zfs` or `zfs`). With nothing of the pool mounted, the `zfs` command
    can only be talking to zfs-fuse when /dev/zfs (the kernel module's device)
    is missing. One file read, no spawn.
    """
    found: str | None = None
    with contextlib.suppress(OSError), open("/proc/self/mountinfo", encoding="utf-8") as fh:
        found = zfs_mount_type(dataset.split("/", maxsplit=1)[0], fh)
    if found is not None:
        return found == "fuse.zfs"
    return not os.path.exists("/dev/zfs")


def zfs_mount_type(pool: str, mountinfo: Iterable[str]) -> str | None:
    """`fuse.zfs` (zfs-fuse) or `zfs` (OpenZFS) for the first mount of a
    dataset of `pool` among mountinfo lines, None when none is mounted."""
    for line in mountinfo:
        # "<id> <parent> <dev> <root> <mountpoint> <opts> [optional] - <type> <source> <opts>"
        after = line.partition(" - ")[2].split()
        if len(after) < 2 or after[0] not in ("zfs", "fuse.zfs"):
            continue
        if after[1] == pool or after[1].startswith(pool + "/"):
            return after[0]
    return None


def encode(value: str) -> str:
    return re.sub(r"[\x00-\x1f\x7f\\]", lambda m: f"\\x{ord(m[0]):02x}", value)


def decode(value: str) -> str:
    return re.sub(r"\\x([0-9a-f]{2})", lambda m: chr(int(m[1], 16)), value)


def props(meta: Mapping[str, str]) -> list[str]:
    """`-o cowbranchd:key=value` options for the non-empty entries of meta."""
    check_meta(meta)
    argv: list[str] = []
    for key, value in sorted(meta.items()):
        if value == "":
            continue
        encoded = encode(value)
        if len(encoded.encode()) > MAX_VALUE_BYTES:
            raise InvalidArgument(key, f"longer than ZFS allows ({MAX_VALUE_BYTES} bytes stored)")
        argv += ["-o", f"{PREFIX}{key}={encoded}"]
    return argv


class Pinned(StorageError):
    """A dataset or snapshot has dependent clones (never raised to callers)."""


class Busy(StorageError):
    """A dataset stayed busy (mounted and in use) through every retry."""


def natural(name: str) -> list[int | str]:
    return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", name)]


def lzc_call(what: str, call: Callable[[], object]) -> None:
    """Run a libzfs_core call, mapping its errno-carrying errors like _zfs()."""
    try:
        call()
    except Exception as exc:
        # lzc_snapshot raises SnapshotFailure holding one error per snapshot.
        codes = {getattr(e, "errno", None) for e in getattr(exc, "errors", None) or [exc]}
        if errno.EEXIST in codes:
            raise AlreadyExists(f"{what}: already exists") from exc
        if errno.ENOENT in codes:
            raise NotFound(f"{what}: not found") from exc
        if errno.ENOSPC in codes:
            raise ResourceExhausted(f"zfs pool is full: {what}") from exc
        raise StorageError(f"{what}: {exc}") from exc


Tree = dict[str, dict[str, tuple[str, str]]]


def parse_properties(out: str) -> Tree:
    """`zfs get -H -o name,property,value,source` output -> name -> property ->
    (value, source). Foreign values with tabs or newlines are skipped."""
    tree: Tree = {}
    for line in out.split("\n"):
        fields = line.split("\t")
        if len(fields) == 4:
            tree.setdefault(fields[0], {})[fields[1]] = (fields[2], fields[3])
    return tree


def volumes_of(dataset: str, tree: Tree, path_of: Callable[[Kind, str], Path]) -> list[Volume]:
    """The volumes (ours: marked locally) under `dataset`, from its property
    tree, with their metadata, snapshots, origin and pinned snapshots."""
    pattern = re.compile(re.escape(dataset) + r"/(bases|branches)/([^/@]+)(?:@(.+))?")
    snaps: dict[tuple[str, str], list[str]] = {}
    origins = {p["origin"][0] for p in tree.values() if "origin" in p}
    for name in tree:
        match = pattern.fullmatch(name)
        if match and match[3]:
            snaps.setdefault((match[1], match[2]), []).append(match[3])
    volumes: list[Volume] = []
    for name, props in sorted(tree.items()):
        match = pattern.fullmatch(name)
        if not match or match[3] or props.get(MARKER, ("", ""))[1] != "local":
            continue
        origin = pattern.fullmatch(props.get("origin", ("-", ""))[0])
        snapshots = tuple(sorted(snaps.get((match[1], match[2]), []), key=natural))
        kind = Kind(match[1])
        volumes.append(
            Volume(
                kind=kind,
                name=match[2],
                path=Path(props["mountpoint"][0])
                if "mountpoint" in props
                else path_of(kind, match[2]),
                meta={
                    k[len(PREFIX) :]: decode(v)
                    for k, (v, src) in props.items()
                    if k.startswith(PREFIX) and k != MARKER and src == "local"
                },
                snapshots=snapshots,
                origin=SnapshotRef(Kind(origin[1]), origin[2], origin[3])
                if origin and origin[3]
                else None,
                busy_snapshots=tuple(s for s in snapshots if f"{name}@{s}" in origins),
            )
        )
    return volumes


# `zfs` subcommands that change nothing: never serialized (see _command).
_READ_ONLY = frozenset({"get", "list"})
_BUSY = ("busy",)  # "dataset is busy", "umount: ...: target is busy"
_BACKOFF = (0.02, 0.05, 0.1, 0.2, 0.4, 0.8)


class ZfsCommands:
    """The one way the ZFS driver runs `zfs`: serialised on zfs-fuse,
    bounded by the call's deadline, its complaints mapped to the error tree.
    A mixin of ZfsDriver, which decides `_userspace`."""

    _userspace: bool

    def _command(self, args: tuple[str, ...]) -> str:
        """Spawn `zfs args`; on zfs-fuse, a mutating one holds the process-wide
        lock for the spawn alone (see USERSPACE_LOCK), within the call's deadline."""
        if not self._userspace or args[0] in _READ_ONLY:
            return run(["zfs", *args]).stdout
        with holding(USERSPACE_LOCK, f"the zfs-fuse command lock (zfs {args[0]})"):
            return run(["zfs", *args]).stdout

    def _zfs(self, what: str, *args: str, retry_busy: bool = True) -> str:
        """Run `zfs args`, translating its complaints into the error tree and
        retrying while a mount is busy (zfs-fuse releases mounts lazily)."""
        for delay in (*(_BACKOFF if retry_busy else ()), None):
            try:
                return self._command(args)
            except CommandError as exc:
                err = exc.stderr
                if any(word in err for word in _BUSY):
                    if delay is None:
                        raise Busy(f"{what}: {exc.message}") from exc
                    time.sleep(delay)
                    continue
                if "does not exist" in err or "could not find any snapshots" in err:
                    raise NotFound(f"{what}: {err}") from exc
                if "already exists" in err:
                    raise AlreadyExists(f"{what}: {err}") from exc
                if "out of space" in err or "No space left" in err:
                    raise ResourceExhausted(f"zfs pool is full: {what}: {err}") from exc
                if "dependent clones" in err:
                    raise Pinned(what) from exc
                raise StorageError(f"{what}: {exc.message}") from exc
        raise AssertionError("unreachable")
