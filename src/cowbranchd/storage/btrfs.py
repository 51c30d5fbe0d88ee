"""The btrfs storage driver: volumes are subvolumes, snapshots are read-only
snapshot subvolumes beside them, metadata is a `cowbranch.json` sidecar.

Layout under the pool root (a plain directory on a btrfs mount)::

    bases/<name>/{cowbranch.json,pgdata/}   a volume (subvolume)
    bases/<name>@<snap>/                    its read-only snapshot (a sibling,
                                            so snapshots never nest)
    branches/<name>/...
    .staging/<uuid>   volumes being built; renamed into place when complete
    .trash/<uuid>     volumes being destroyed

A sidecar names the volume it belongs to (`"volume": "<kind>/<name>"`). A
subvolume in bases/ or branches/ whose sidecar is missing, empty, or names
another volume is a leftover: list() skips it and gc() deletes it. btrfs
snapshots are independent of each other, so nothing ever pins a snapshot
(clones_pin_snapshots = False).

A clone is made in place, not renamed in from .staging: after a subvolume
rename btrfs commits its whole transaction at the pool's next fsync, which
cost every create a second commit (in postgres's first fsync). Until its own
sidecar is written the clone holds its source's, which names the source: a
leftover if a crash comes first. A source whose sidecar names no volume
(written before sidecars did) is still cloned through .staging.

Subvolume operations go through libbtrfsutil's Python bindings when they
import (an ioctl, no process spawn), else through the `btrfs` command.
"""

from __future__ import annotations

import builtins
import contextlib
import os
import shutil
import threading
import time
import uuid
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import structlog

from cowbranchd.errors import AlreadyExists, CommandError, NotFound, StorageError
from cowbranchd.run import run

from ._names import check_meta, check_name
from .base import Kind, PoolUsage, SnapshotRef, StorageDriver, Volume
from .btrfs_io import (
    SIDECAR,
    BadSidecar,
    fs_magic,
    fs_name,
    natural,
    read_sidecar,
    rename_noreplace,
    set_subvolume_limit,
    sidecar_owner,
    translated,
    volume_name,
    write_sidecar,
)
from .btrfs_subvol import SimpleQuotas, Subvolumes, btrfsutil

__all__ = ["SIDECAR", "BtrfsDriver"]

log = structlog.get_logger("cowbranchd.storage")

_BTRFS_MAGIC = 0x9123683E
_LAYOUT = ("bases", "branches", ".staging", ".trash")
# Postmasters (another uid) pass through bases/ and branches/ to their data
# directories, but nobody else may list them; work in progress is root's.
_LAYOUT_MODES = {"bases": 0o711, "branches": 0o711, ".staging": 0o700, ".trash": 0o700}


class BtrfsDriver(Subvolumes, SimpleQuotas, StorageDriver):
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
        # Staging entries (`<uuid>`) and volumes made in place (`<kind>/<name>`)
        # of operations running in this process; gc() spares them.
        self._in_flight: set[str] = set()
        # None until the first limited clone asks: then whether simple quotas
        # are on (enabled here if the filesystem had none), see _quotas_on().
        self._squota: bool | None = None
        self._squota_lock = threading.Lock()

    def __repr__(self) -> str:
        return f"BtrfsDriver({str(self.root)!r}, use_library={self.use_library})"

    # -- sidecar (btrfs_io) --

    _read_sidecar = staticmethod(read_sidecar)
    _write_sidecar = staticmethod(write_sidecar)

    def _sidecar(self, volume: Path) -> dict[str, Any] | None:
        """The volume's own sidecar; None when there is none, it is empty (a
        clone's, torn by a crash before it was durable), or it names another
        volume (a clone made in place still holds its source's). BadSidecar
        when unreadable."""
        data = self._read_sidecar(volume)
        if data is not None and sidecar_owner(data) not in (None, volume_name(volume)):
            return None
        return data

    def _has_sidecar(self, volume: Path) -> bool:
        try:
            return self._sidecar(volume) is not None
        except BadSidecar:
            return True  # kept and reported, never collected as a leftover

    def _volume_path(self, kind: Kind, name: str) -> Path:
        check_name("name", name)
        return self.root / kind.value / name

    def _require_volume(self, kind: Kind, name: str) -> Path:
        path = self._volume_path(kind, name)
        if not self._is_subvolume(path) or not self._has_sidecar(path):
            raise NotFound(f"volume {kind.value}/{name} not found in {self.root}")
        return path

    # -- StorageDriver --

    def check(self) -> None:
        if not self.root.is_dir():
            raise StorageError(f"btrfs pool root {self.root} does not exist or is not a directory")
        if fs_magic(self.root) != _BTRFS_MAGIC:
            raise StorageError(
                f"{self.root} is on {fs_name(self.root)}, not btrfs: "
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
        finish: Callable[[Path], None] | None = None,
        origin: str | None,
        durable: bool = True,
        in_place: bool = False,
    ) -> Path:
        """Make a subvolume with `make(path)` (atomic), `finish(path)`, its
        sidecar: in .staging, renamed into place (a crash leaves at most a
        staging entry), or `in_place` when what `make` copies in names
        another volume (so it reads as a leftover until its own is written)."""
        check_meta(meta)
        dst = self._volume_path(kind, name)
        owner = f"{kind.value}/{name}"
        if os.path.lexists(dst):
            raise AlreadyExists(f"volume {owner} already exists")
        key = owner if in_place else uuid.uuid4().hex
        target = dst if in_place else self.root / ".staging" / key
        self._in_flight.add(key)
        started = time.perf_counter()
        try:
            with translated(what):
                try:
                    make(target)
                except BaseException:
                    # In place, nothing of ours is there (EEXIST: someone else's).
                    if not in_place:
                        with contextlib.suppress(OSError, CommandError):
                            self._remove_tree(target)
                    raise
                try:
                    if finish is not None:
                        finish(target)
                    self._write_sidecar(target, meta, origin, owner=owner, durable=durable)
                    if not in_place:
                        rename_noreplace(target, dst)
                except BaseException:
                    with contextlib.suppress(OSError, CommandError):
                        self._remove_tree(target)
                    raise
        finally:
            self._in_flight.discard(key)
        log.debug(
            what,
            volume=owner,
            origin=origin,
            in_place=in_place,
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
        with translated(f"snapshot {kind.value}/{name}@{snap}"):
            self._snapshot(src, dst, read_only=True)
        return SnapshotRef(kind, name, snap)

    def clone(
        self,
        source: SnapshotRef,
        kind: Kind,
        name: str,
        meta: Mapping[str, str],
        *,
        max_bytes: int = 0,
    ) -> Path:
        check_name("snap", source.snap)
        src = self._volume_path(source.kind, source.name).with_name(f"{source.name}@{source.snap}")
        if not self._is_subvolume(src):
            raise NotFound(f"snapshot {source} not found in {self.root}")
        if max_bytes and not self._quotas_on():
            raise StorageError(f"cannot limit {kind.value}/{name}: simple quotas are not on")

        def make(target: Path) -> None:
            self._snapshot(src, target, read_only=False)

        def finish(target: Path) -> None:
            if max_bytes:
                # Before its own sidecar: no branch is ever unlimited.
                set_subvolume_limit(target, max_bytes)

        try:
            copied = self._read_sidecar(src) or {}
        except BadSidecar:
            copied = {}
        # Not fsynced: a clone's metadata becomes durable with the caller's
        # next set_meta (base.py); a torn sidecar after a crash marks a
        # leftover that list() skips and gc() removes. Saves two fsyncs on
        # the branch-create path.
        in_place = sidecar_owner(copied) not in (None, f"{kind.value}/{name}")
        return self._build(kind, name, meta, what="clone", make=make, finish=finish,
                           origin=str(source), durable=False, in_place=in_place)

    def set_meta(
        self, kind: Kind, name: str, meta: Mapping[str, str], *, durable: bool = True
    ) -> None:
        check_meta(meta)
        path = self._volume_path(kind, name)
        # One read of the sidecar (this is on the create path): missing or
        # another volume's is NotFound, unreadable is rewritten whole.
        try:
            found = self._sidecar(path) if self._is_subvolume(path) else None
        except BadSidecar:
            found = {}
        if found is None:
            raise NotFound(f"volume {kind.value}/{name} not found in {self.root}")
        merged = {**found.get("meta", {}), **meta}
        merged = {key: value for key, value in merged.items() if value != ""}
        with translated(f"set meta of {kind.value}/{name}"):
            self._write_sidecar(
                path, merged, found.get("origin"), owner=volume_name(path), durable=durable
            )

    def _snapshot_names(self, kind: Kind, name: str) -> list[str]:
        prefix = f"{name}@"
        try:
            entries = os.listdir(self.root / kind.value)
        except FileNotFoundError:
            return []
        return sorted((e[len(prefix) :] for e in entries if e.startswith(prefix)), key=natural)

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
                    data = self._sidecar(folder / entry)
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
        with translated(f"destroy {kind.value}/{name}"):
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
            with translated(f"destroy snapshot {ref}"):
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
                    data = self._sidecar(path)
                    meta_error = ""
                except BadSidecar as exc:
                    data, meta_error = {}, str(exc)
                if data is None:  # never finished (or still being cloned); gc() removes it
                    continue
                volumes.append(
                    Volume(
                        kind=kind,
                        name=entry,
                        path=path,
                        meta=dict(data.get("meta", {})),
                        snapshots=tuple(sorted(snaps.get(entry, []), key=natural)),
                        origin=SnapshotRef.parse(data.get("origin")),
                        meta_error=meta_error,
                    )
                )
        return volumes

    def usage(self, kind: Kind, name: str) -> int:
        """Exclusive bytes (extents shared with no other subvolume) from
        `btrfs filesystem du`; data not yet written back is not counted.
        StorageError when btrfs cannot tell (never a made-up 0)."""
        path = self._require_volume(kind, name)
        what = f"usage of {kind.value}/{name}"
        with translated(what):
            out = run(["btrfs", "filesystem", "du", "-s", "--raw", str(path)]).stdout
        try:
            return int(out.split("\n")[1].split()[1])
        except (IndexError, ValueError) as exc:
            raise StorageError(f"{what}: unexpected `btrfs filesystem du` output {out!r}") from exc

    def free_bytes(self) -> int:
        st = os.statvfs(self.root)
        return st.f_bavail * st.f_frsize

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
                with translated(f"gc {sub}/{entry}"):
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
                        with translated(f"gc {kind.value}/{entry}"):
                            self._delete_subvolume(path)
                        removed.append(f"{kind.value}/{entry}")
                    continue
                if (
                    "@" in entry
                    or f"{kind.value}/{entry}" in self._in_flight
                    or not self._is_subvolume(path)
                    or self._has_sidecar(path)
                ):
                    continue
                with translated(f"gc {kind.value}/{entry}"):
                    self._remove_tree(self._trash(path))
                removed.append(f"{kind.value}/{entry}")
        if removed:
            log.debug("gc", removed=removed)
        return removed
