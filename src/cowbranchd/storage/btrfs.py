"""The btrfs storage driver: volumes are subvolumes, snapshots are read-only
snapshot subvolumes beside them, metadata is a `cowbranch.json` sidecar.

Layout under the pool root (a plain directory on a btrfs mount)::

    bases/<name>/{cowbranch.json,pgdata/}   a volume (subvolume)
    bases/<name>@<snap>/                    its read-only snapshot (a sibling,
                                            so snapshots never nest)
    branches/<name>/...
    .staging/<uuid>   volumes being built; renamed into place when complete
    .trash/<uuid>     volumes being destroyed

A subvolume in bases/ or branches/ without a sidecar is a leftover: list()
skips it and gc() deletes it. btrfs snapshots are independent of each other,
so nothing ever pins a snapshot (clones_pin_snapshots = False).

Subvolume operations go through libbtrfsutil's Python bindings when they
import (an ioctl, no process spawn), else through the `btrfs` command.
"""

from __future__ import annotations

import builtins
import contextlib
import ctypes
import errno
import importlib
import json
import os
import re
import shutil
import stat
import time
import uuid
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from types import ModuleType
from typing import Any

import structlog

from cowbranchd.errors import AlreadyExists, CommandError, NotFound, ResourceExhausted, StorageError
from cowbranchd.run import run

from ._names import check_meta, check_name
from .base import Kind, PoolUsage, SnapshotRef, StorageDriver, Volume

__all__ = ["SIDECAR", "BtrfsDriver"]

log = structlog.get_logger("cowbranchd.storage")

SIDECAR = "cowbranch.json"
_SIDECAR_TMP = ".cowbranch.json.tmp"
_MAX_SIDECAR = 1 << 20
_BTRFS_MAGIC = 0x9123683E
_SUBVOLUME_INO = 256  # BTRFS_FIRST_FREE_OBJECTID: the root inode of every subvolume
_LAYOUT = ("bases", "branches", ".staging", ".trash")
# Postmasters (another uid) pass through bases/ and branches/ to their data
# directories, but nobody else may list them; work in progress is root's.
_LAYOUT_MODES = {"bases": 0o711, "branches": 0o711, ".staging": 0o700, ".trash": 0o700}


def _optional(module: str) -> ModuleType | None:
    try:
        return importlib.import_module(module)
    except ImportError:
        return None


btrfsutil = _optional("btrfsutil")

_libc = ctypes.CDLL(None, use_errno=True)


class BadSidecar(Exception):
    """A volume's sidecar exists but cannot be understood."""


def _rename_noreplace(src: Path, dst: Path) -> None:
    """rename(2) that fails with EEXIST instead of replacing an empty `dst`
    directory, so two clones racing for one name cannot both win."""
    at_fdcwd, rename_noreplace = -100, 1
    if _libc.renameat2(at_fdcwd, os.fsencode(src), at_fdcwd, os.fsencode(dst), rename_noreplace):
        code = ctypes.get_errno()
        raise OSError(code, os.strerror(code), str(dst))


def _fs_magic(path: Path) -> int:
    # Python has statvfs but no statfs, and only statfs says which filesystem.
    buf = ctypes.create_string_buffer(256)
    if _libc.statfs(os.fsencode(path), buf) != 0:
        code = ctypes.get_errno()
        raise OSError(code, os.strerror(code), str(path))
    return ctypes.c_long.from_buffer(buf).value


def _fs_name(path: Path) -> str:
    """Filesystem type and source of the mount holding `path`, for messages."""
    target, best = str(path.resolve()), ("unknown", "?", -1)
    with open("/proc/self/mountinfo", encoding="utf-8") as fh:
        for line in fh:
            fields = line.split()
            mnt, sep = fields[4], fields.index("-")
            if (target == mnt or target.startswith(mnt.rstrip("/") + "/")) and len(mnt) > best[2]:
                best = (fields[sep + 1], fields[sep + 2], len(mnt))
    return f"{best[0]} ({best[1]})"


def _natural(name: str) -> list[Any]:
    return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", name)]


@contextlib.contextmanager
def _translated(what: str) -> Iterator[None]:
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


class BtrfsDriver(StorageDriver):
    """Volumes as btrfs subvolumes under `root`."""

    kind = "btrfs"
    clones_pin_snapshots = False

    @property
    def location(self) -> str:
        return str(self.root)

    def __init__(self, root: Path, *, use_library: bool | None = None) -> None:
        """`use_library`: True requires libbtrfsutil, False forces the `btrfs`
        command, None picks the library when it imports."""
        if use_library and btrfsutil is None:
            raise StorageError("libbtrfsutil's Python bindings (python3-btrfsutil) do not import")
        self.root = Path(root)
        self.use_library = btrfsutil is not None if use_library is None else use_library
        # Staging entries of operations running in this process; gc() spares them.
        self._in_flight: set[str] = set()

    def __repr__(self) -> str:
        return f"BtrfsDriver({str(self.root)!r}, use_library={self.use_library})"

    # -- subvolume primitives: one ioctl through the library, or one command --

    def _create_subvolume(self, path: Path) -> None:
        if self.use_library:
            assert btrfsutil is not None
            btrfsutil.create_subvolume(str(path))
        else:
            run(["btrfs", "subvolume", "create", str(path)])

    def _snapshot(self, src: Path, dst: Path, *, read_only: bool) -> None:
        if self.use_library:
            assert btrfsutil is not None
            btrfsutil.create_snapshot(str(src), str(dst), read_only=read_only)
        else:
            flags = ["-r"] if read_only else []
            run(["btrfs", "subvolume", "snapshot", *flags, str(src), str(dst)])

    def _delete_subvolume(self, path: Path) -> None:
        if self.use_library:
            assert btrfsutil is not None
            btrfsutil.delete_subvolume(str(path))
        else:
            run(["btrfs", "subvolume", "delete", str(path)])

    @staticmethod
    def _is_subvolume(path: Path) -> bool:
        # What libbtrfsutil's is_subvolume does, without a spawn on the command path.
        try:
            st = path.lstat()
        except FileNotFoundError:
            return False
        return stat.S_ISDIR(st.st_mode) and st.st_ino == _SUBVOLUME_INO

    def _remove_tree(self, path: Path) -> None:
        """Delete a trashed or staged entry, whatever it turned out to be."""
        if self._is_subvolume(path):
            self._delete_subvolume(path)
        elif path.is_dir() and not path.is_symlink():
            shutil.rmtree(path)
        else:
            path.unlink(missing_ok=True)

    # -- sidecar --

    @staticmethod
    def _read_sidecar(volume: Path) -> dict[str, Any] | None:
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

    def _sidecar_or_empty(self, volume: Path) -> dict[str, Any]:
        try:
            return self._read_sidecar(volume) or {}
        except BadSidecar:
            return {}  # rewritten whole by the caller's set_meta

    def _has_sidecar(self, volume: Path) -> bool:
        try:
            return self._read_sidecar(volume) is not None
        except BadSidecar:
            return True  # kept and reported, never collected as a leftover

    @staticmethod
    def _write_sidecar(
        volume: Path, meta: Mapping[str, str], origin: str | None, *, durable: bool = True
    ) -> None:
        body = json.dumps({"format": 1, "meta": dict(meta), "origin": origin}, sort_keys=True)
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
        if not durable:
            return
        dirfd = os.open(volume, os.O_RDONLY | os.O_DIRECTORY)
        try:
            os.fsync(dirfd)
        finally:
            os.close(dirfd)

    def _volume_path(self, kind: Kind, name: str) -> Path:
        check_name("name", name)
        return self.root / kind.value / name

    def _require_volume(self, kind: Kind, name: str) -> Path:
        path = self._volume_path(kind, name)
        if not self._is_subvolume(path) or not (path / SIDECAR).exists():
            raise NotFound(f"volume {kind.value}/{name} not found in {self.root}")
        return path

    # -- StorageDriver --

    def check(self) -> None:
        if not self.root.is_dir():
            raise StorageError(f"btrfs pool root {self.root} does not exist or is not a directory")
        if _fs_magic(self.root) != _BTRFS_MAGIC:
            raise StorageError(
                f"{self.root} is on {_fs_name(self.root)}, not btrfs: "
                "the btrfs driver needs a directory on a btrfs mount"
            )
        if not self.use_library and shutil.which("btrfs") is None:
            raise StorageError("neither libbtrfsutil nor the `btrfs` command (btrfs-progs) found")

    def ensure_layout(self) -> None:
        for sub in _LAYOUT:
            path = self.root / sub
            path.mkdir(parents=True, exist_ok=True)
            os.chmod(path, _LAYOUT_MODES[sub])

    def _build(
        self,
        kind: Kind,
        name: str,
        meta: Mapping[str, str],
        *,
        what: str,
        make: Callable[[Path], None],
        origin: str | None,
        durable: bool = True,
    ) -> Path:
        """Make a subvolume in .staging with `make(path)`, write its sidecar,
        rename it into place: a crash leaves at most a staging entry."""
        check_meta(meta)
        dst = self._volume_path(kind, name)
        if os.path.lexists(dst):
            raise AlreadyExists(f"volume {kind.value}/{name} already exists")
        token = uuid.uuid4().hex
        staging = self.root / ".staging" / token
        self._in_flight.add(token)
        started = time.perf_counter()
        try:
            with _translated(what):
                try:
                    make(staging)
                    self._write_sidecar(staging, meta, origin, durable=durable)
                    _rename_noreplace(staging, dst)
                except BaseException:
                    with contextlib.suppress(OSError, CommandError):
                        self._remove_tree(staging)
                    raise
        finally:
            self._in_flight.discard(token)
        log.debug(
            what,
            volume=f"{kind.value}/{name}",
            origin=origin,
            ms=round((time.perf_counter() - started) * 1000, 2),
        )
        return dst

    def create_volume(self, kind: Kind, name: str, meta: Mapping[str, str]) -> Path:
        return self._build(
            kind, name, meta, what="create volume", make=self._create_subvolume, origin=None
        )

    def snapshot(self, kind: Kind, name: str, snap: str) -> SnapshotRef:
        check_name("snap", snap)
        src = self._require_volume(kind, name)
        dst = src.with_name(f"{name}@{snap}")
        if os.path.lexists(dst):
            raise AlreadyExists(f"snapshot {kind.value}/{name}@{snap} already exists")
        # A snapshot is atomic by itself; it needs no staging.
        with _translated(f"snapshot {kind.value}/{name}@{snap}"):
            self._snapshot(src, dst, read_only=True)
        return SnapshotRef(kind, name, snap)

    def clone(self, source: SnapshotRef, kind: Kind, name: str, meta: Mapping[str, str]) -> Path:
        check_name("snap", source.snap)
        src = self._volume_path(source.kind, source.name).with_name(f"{source.name}@{source.snap}")
        if not self._is_subvolume(src):
            raise NotFound(f"snapshot {source} not found in {self.root}")

        def make(staging: Path) -> None:
            self._snapshot(src, staging, read_only=False)

        # Not fsynced: a clone's metadata becomes durable with the caller's
        # next set_meta (base.py); a torn sidecar after a crash marks a
        # leftover that list() skips and gc() removes. Saves two fsyncs on
        # the branch-create path.
        return self._build(
            kind, name, meta, what="clone", make=make, origin=str(source), durable=False
        )

    def set_meta(self, kind: Kind, name: str, meta: Mapping[str, str]) -> None:
        check_meta(meta)
        path = self._require_volume(kind, name)
        data = self._sidecar_or_empty(path)
        merged = {**data.get("meta", {}), **meta}
        merged = {key: value for key, value in merged.items() if value != ""}
        with _translated(f"set meta of {kind.value}/{name}"):
            self._write_sidecar(path, merged, data.get("origin"))

    def _snapshot_names(self, kind: Kind, name: str) -> list[str]:
        prefix = f"{name}@"
        try:
            entries = os.listdir(self.root / kind.value)
        except FileNotFoundError:
            return []
        return sorted((e[len(prefix) :] for e in entries if e.startswith(prefix)), key=_natural)

    def _trash(self, path: Path) -> Path:
        trashed = self.root / ".trash" / uuid.uuid4().hex
        os.rename(path, trashed)
        return trashed

    def _origins(self) -> set[str]:
        """The snapshots volumes were cloned from (their sidecars' `origin`)."""
        found: set[str] = set()
        for kind in Kind:
            folder = self.root / kind.value
            for entry in os.listdir(folder) if folder.is_dir() else []:
                if "@" in entry:
                    continue
                with contextlib.suppress(BadSidecar):
                    data = self._read_sidecar(folder / entry)
                    if data is not None and isinstance(data.get("origin"), str):
                        found.add(data["origin"])
        return found

    def destroy(self, kind: Kind, name: str) -> None:
        path = self._volume_path(kind, name)
        snaps = self._snapshot_names(kind, name)
        if snaps:
            # A snapshot a clone came from is that clone's reset source: it
            # outlives this volume (as on ZFS, where clones pin it) and goes
            # with its last clone (destroy_snapshot, or gc() after a crash).
            origins = self._origins()
            snaps = [s for s in snaps if str(SnapshotRef(kind, name, s)) not in origins]
        with _translated(f"destroy {kind.value}/{name}"):
            # Snapshots go first: a crash in between leaves the volume listed
            # (so the caller retries) rather than orphaned snapshots. They are
            # deleted in place: a read-only subvolume cannot move to another
            # directory (EROFS: its `..` would change), and deleting one
            # subvolume is a single atomic ioctl anyway.
            for snap in snaps:
                self._delete_subvolume(path.with_name(f"{name}@{snap}"))
            if os.path.lexists(path):
                self._remove_tree(self._trash(path))
        log.debug("destroyed", volume=f"{kind.value}/{name}", snapshots=len(snaps))

    def destroy_snapshot(self, ref: SnapshotRef) -> bool:
        path = self._volume_path(ref.kind, ref.name).with_name(f"{ref.name}@{ref.snap}")
        check_name("snap", ref.snap)
        if os.path.lexists(path):
            with _translated(f"destroy snapshot {ref}"):
                self._delete_subvolume(path)  # in place: see destroy()
        return True

    def list(self) -> list[Volume]:
        volumes: list[Volume] = []
        for kind in Kind:
            folder = self.root / kind.value
            try:
                entries = sorted(os.listdir(folder))
            except FileNotFoundError:
                continue
            snaps: dict[str, list[str]] = {}
            for entry in entries:
                if "@" in entry:
                    base, _, snap = entry.partition("@")
                    snaps.setdefault(base, []).append(snap)
            for entry in entries:
                path = folder / entry
                if "@" in entry or not self._is_subvolume(path):
                    continue
                try:
                    data = self._read_sidecar(path)
                    meta_error = ""
                except BadSidecar as exc:
                    data, meta_error = {}, str(exc)
                if data is None:  # never finished; gc() removes it
                    continue
                volumes.append(
                    Volume(
                        kind=kind,
                        name=entry,
                        path=path,
                        meta=dict(data.get("meta", {})),
                        snapshots=tuple(sorted(snaps.get(entry, []), key=_natural)),
                        origin=SnapshotRef.parse(data.get("origin")),
                        meta_error=meta_error,
                    )
                )
        return volumes

    def usage(self, kind: Kind, name: str) -> int:
        """Exclusive bytes (extents shared with no other subvolume) from
        `btrfs filesystem du`; data not yet written back is not counted."""
        path = self._require_volume(kind, name)
        proc = run(["btrfs", "filesystem", "du", "-s", "--raw", str(path)], check=False)
        lines = proc.stdout.split("\n")
        if proc.returncode != 0 or len(lines) < 2 or len(lines[1].split()) < 3:
            log.debug("usage unknown", volume=f"{kind.value}/{name}", stderr=proc.stderr.strip())
            return 0
        return int(lines[1].split()[1])

    def pool_usage(self) -> PoolUsage:
        st = os.statvfs(self.root)
        return PoolUsage(
            used_bytes=(st.f_blocks - st.f_bfree) * st.f_frsize,
            total_bytes=st.f_blocks * st.f_frsize,
        )

    def gc(self) -> builtins.list[str]:
        removed: list[str] = []
        for sub in (".staging", ".trash"):
            folder = self.root / sub
            for entry in sorted(os.listdir(folder)) if folder.is_dir() else []:
                if entry in self._in_flight:
                    continue
                with _translated(f"gc {sub}/{entry}"):
                    self._remove_tree(folder / entry)
                removed.append(f"{sub}/{entry}")
        origins: set[str] | None = None
        for kind in Kind:
            folder = self.root / kind.value
            for entry in sorted(os.listdir(folder)) if folder.is_dir() else []:
                path = folder / entry
                owner, at, snap = entry.partition("@")
                if at and not os.path.lexists(folder / owner):
                    # A snapshot that outlived its volume for a clone's sake.
                    origins = self._origins() if origins is None else origins
                    if str(SnapshotRef(kind, owner, snap)) not in origins:
                        with _translated(f"gc {kind.value}/{entry}"):
                            self._delete_subvolume(path)
                        removed.append(f"{kind.value}/{entry}")
                    continue
                if (
                    "@" in entry
                    or not self._is_subvolume(path)
                    or self._has_sidecar(path)
                ):
                    continue
                with _translated(f"gc {kind.value}/{entry}"):
                    self._remove_tree(self._trash(path))
                removed.append(f"{kind.value}/{entry}")
        if removed:
            log.debug("gc", removed=removed)
        return removed
