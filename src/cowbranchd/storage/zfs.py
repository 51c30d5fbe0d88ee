"""The ZFS storage driver: volumes are datasets, snapshots are ZFS snapshots,
metadata is ZFS user properties `cowbranchd:<key>`.

Layout under the pool dataset `<ds>` (e.g. `tank/cowbranchd`)::

    <ds>/bases/<name>            a volume; `<ds>/bases/<name>@<snap>` its snapshots
    <ds>/branches/<name>
    <ds>/.trash/<uuid>           volumes being destroyed (one whose snapshot
                                 clones need stays in place, unmarked, till gc())
    <ds>/.staging                unused: `zfs clone -o` creates a clone and its
                                 properties in one call, so nothing is staged

Every volume carries `cowbranchd:.volume=1` (a key meta cannot use) so a
dataset with empty meta is still told apart from a foreign or half-made one.

Commands are the default because that is all zfs-fuse (used in tests) offers
and because `zfs clone` also mounts. Where /dev/zfs exists and OpenZFS's
`libzfs_core` bindings import, snapshots are taken in-process instead.
Old zfs-fuse has no `zfs list -p`; `zfs get -H -p` is used for everything.

zfs-fuse runs mutating commands one at a time, encoding, parsing: zfs_io.py.
"""

from __future__ import annotations

import builtins
import contextlib
import os
import shutil
import threading
import time
import uuid
from collections.abc import Iterator, Mapping
from pathlib import Path

import structlog

from cowbranchd.errors import (
    AlreadyExists,
    NotFound,
    ResourceExhausted,
    StorageError,
)
from cowbranchd.run import run

from ._names import check_name
from .base import Kind, PoolUsage, SnapshotRef, StorageDriver, Volume
from .zfs_io import MARKER as _MARKER
from .zfs_io import MAX_VALUE_BYTES, PREFIX, ZfsCommands, lzc, parse_properties, volumes_of
from .zfs_io import Pinned as _Pinned
from .zfs_io import lzc_call as _lzc_call
from .zfs_io import props as _props
from .zfs_io import served_by_fuse as _served_by_fuse

__all__ = ["MAX_VALUE_BYTES", "ZfsDriver"]

log = structlog.get_logger("cowbranchd.storage")

MOUNT_WAIT_S = 5.0


class ZfsDriver(ZfsCommands, StorageDriver):
    """Volumes as ZFS datasets under `dataset`."""

    kind = "zfs"
    clones_pin_snapshots = True

    @property
    def limits_bytes(self) -> bool:
        return True

    @property
    def location(self) -> str:
        return self.dataset

    def __init__(self, dataset: str, *, use_library: bool | None = None) -> None:
        """`use_library`: None uses libzfs_core where /dev/zfs exists and it
        imports; False forces commands; True requires it."""
        available = lzc is not None and os.path.exists("/dev/zfs")
        if use_library and not available:
            raise StorageError("libzfs_core is not importable or /dev/zfs is missing")
        self.dataset = dataset.strip("/")
        self.use_library = available if use_library is None else use_library
        self._userspace = _served_by_fuse(self.dataset)
        self._mountpoint: Path | None = None
        # Datasets being created by this process: gc() must not take them for
        # marker-less leftovers (zfs-fuse sets `clone -o` properties after
        # the dataset appears, so a concurrent gc saw one without its marker
        # and destroyed a clone being handed out).
        self._in_flight: set[str] = set()
        # Every dataset that started being created since gc() began listing:
        # one that finished during the listing was seen there without its
        # marker, yet is in neither in-flight copy taken around it.
        self._started_since_listing: set[str] = set()
        self._in_flight_lock = threading.Lock()

    @contextlib.contextmanager
    def _creating(self, target: str) -> Iterator[None]:
        with self._in_flight_lock:
            self._in_flight.add(target)
            self._started_since_listing.add(target)
        try:
            yield
        finally:
            with self._in_flight_lock:
                self._in_flight.discard(target)

    @property
    def userspace(self) -> bool:
        """True when the pool is served by zfs-fuse, whose mutating commands
        this driver runs one at a time (decided once, when the driver is made)."""
        return self._userspace

    def __repr__(self) -> str:
        return (
            f"ZfsDriver({self.dataset!r}, use_library={self.use_library}, "
            f"userspace={self._userspace})"
        )

    def _name(self, kind: Kind, name: str, snap: str | None = None) -> str:
        check_name("name", name)
        if snap is None:
            return f"{self.dataset}/{kind.value}/{name}"
        check_name("snap", snap)
        return f"{self.dataset}/{kind.value}/{name}@{snap}"

    def _path(self, kind: Kind, name: str) -> Path:
        if self._mountpoint is None:
            value = self._zfs("mountpoint", "get", "-H", "-o", "value", "mountpoint", self.dataset)
            self._mountpoint = Path(value.strip())
        # Children inherit the mountpoint: ensure_layout never sets one on them.
        return self._mountpoint / kind.value / name

    def check(self) -> None:
        if shutil.which("zfs") is None:
            raise StorageError("the `zfs` command is not installed (zfsutils-linux or zfs-fuse)")
        proc = run(
            ["zfs", "get", "-H", "-o", "value", "type,mountpoint", self.dataset], check=False
        )
        if proc.returncode == 0:
            kind, mountpoint = proc.stdout.split("\n")[:2]
            if kind != "filesystem" or not mountpoint.startswith("/"):
                raise StorageError(
                    f"zfs dataset {self.dataset} is a {kind} mounted at {mountpoint!r}: "
                    "the zfs driver needs a filesystem dataset with a mountpoint"
                )
            return
        if "does not exist" not in proc.stderr:
            raise StorageError(f"zfs does not answer for {self.dataset}: {proc.stderr.strip()}")
        pool = self.dataset.split("/")[0]
        pools = run(["zpool", "list", "-H", "-o", "name"], check=False)
        if pool not in pools.stdout.split():
            found = ", ".join(pools.stdout.split()) or pools.stderr.strip() or "none"
            raise StorageError(
                f"zfs dataset {self.dataset} not found and pool {pool} is not imported "
                f"(pools found: {found})"
            )

    def ensure_layout(self) -> None:
        found = run(
            ["zfs", "list", "-H", "-o", "name", "-r", "-d", "1", self.dataset], check=False
        ).stdout.split()
        for sub in ("bases", "branches", ".staging", ".trash"):
            if f"{self.dataset}/{sub}" not in found:
                self._zfs("ensure layout", "create", "-p", f"{self.dataset}/{sub}")
        self._mountpoint = None

    def create_volume(self, kind: Kind, name: str, meta: Mapping[str, str]) -> Path:
        target = self._name(kind, name)
        with self._creating(target):
            self._zfs(f"create {target}", "create", "-o", f"{_MARKER}=1", *_props(meta), target)
        return self._path(kind, name)

    def snapshot(self, kind: Kind, name: str, snap: str) -> SnapshotRef:
        target = self._name(kind, name, snap)
        if self.use_library:
            assert lzc is not None
            module = lzc
            _lzc_call(f"snapshot {target}", lambda: module.lzc_snapshot([target.encode()]))
        else:
            self._zfs(f"snapshot {target}", "snapshot", target)
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
        origin = self._name(source.kind, source.name, source.snap)
        target = self._name(kind, name)
        props = _props(meta)
        if max_bytes:
            # `quota`, not `refquota`: quota counts what the clone holds and
            # its origin does not; refquota would count the shared data too.
            props += ["-o", f"quota={max_bytes}"]
        with self._creating(target):
            return self._clone(origin, target, props, kind, name)

    def _clone(self, origin: str, target: str, props: list[str], kind: Kind, name: str) -> Path:
        # One spawn on the hot path: the clone, its properties and its mount.
        # Never retried: zfs-fuse under load can create the clone and then
        # fail to mount it ("busy"), and a retry would find it existing.
        try:
            self._zfs(
                f"clone {origin} as {target}",
                "clone",
                "-o",
                f"{_MARKER}=1",
                *props,
                origin,
                target,
                retry_busy=False,
            )
        except (AlreadyExists, NotFound, ResourceExhausted):
            raise
        except StorageError:
            if not self._is_our_volume(target):
                raise
            log.debug("clone made but not mounted; mounting", dataset=target)
        path = self._path(kind, name)
        self._ensure_mounted(target, path)
        return path

    def _is_our_volume(self, target: str) -> bool:
        proc = run(["zfs", "get", "-H", "-o", "value", _MARKER, target], check=False)
        return proc.returncode == 0 and proc.stdout.strip() == "1"

    def _ensure_mounted(self, target: str, path: Path) -> None:
        """zfs-fuse sometimes returns from `zfs clone` before the clone is
        mounted (seen when a name is re-cloned right after its destroy): mount
        it and wait for the mount, bounded. One stat when all is well."""
        if os.path.ismount(path):
            return
        deadline = time.monotonic() + MOUNT_WAIT_S
        with contextlib.suppress(StorageError):
            self._zfs(f"mount {target}", "mount", target)  # retried while busy
        while not os.path.ismount(path):
            if time.monotonic() > deadline:
                raise StorageError(f"{target} is not mounted at {path} after {MOUNT_WAIT_S}s")
            time.sleep(0.005)

    def set_meta(
        self, kind: Kind, name: str, meta: Mapping[str, str], *, durable: bool = True
    ) -> None:
        # `zfs set` is durable when it returns: no cheaper way to offer.
        target = self._name(kind, name)
        sets = _props(meta)[1::2]
        removals = sorted(key for key, value in meta.items() if value == "")
        if not sets and not removals:  # still NotFound for a missing volume
            self._zfs(f"set meta of {target}", "get", "-H", "-o", "value", "type", target)
        # Old `zfs set` takes one property per call, so several keys are not atomic.
        for prop in sets:
            self._zfs(f"set meta of {target}", "set", prop, target)
        for key in removals:
            self._zfs(f"set meta of {target}", "inherit", PREFIX + key, target)

    def _destroy_trashed(self, trashed: str) -> bool:
        """Destroy a trashed dataset and its snapshots (never their clones);
        False when clones still depend on it or it stays busy: gc() retries."""
        try:
            self._zfs(f"destroy {trashed}", "destroy", "-r", trashed)
        except NotFound:
            return True
        except _Pinned:
            log.debug("kept in trash: clones depend on it", dataset=trashed)
            return False
        except StorageError as exc:
            log.warning("kept in trash", dataset=trashed, error=exc.message)
            return False
        return True

    def destroy(self, kind: Kind, name: str) -> None:
        source = self._name(kind, name)
        # Unmount first: zfs-fuse neither destroys nor renames a mounted
        # dataset ("dataset is busy"; `destroy -f` does not help there).
        try:
            self._zfs(f"unmount {source}", "unmount", source)
        except NotFound:
            return
        except StorageError as exc:
            if "not currently mounted" not in exc.message:
                raise
        # The common case: a volume without snapshots (a branch nobody
        # branched from) is destroyed directly. Destroying one dataset is
        # atomic, so crash safety needs no trash step; one with snapshots
        # fails here ("has children") and takes the trash path below.
        try:
            self._zfs(f"destroy {source}", "destroy", source, retry_busy=False)
        except NotFound:
            return
        except StorageError:
            pass
        else:
            log.debug("destroyed", volume=f"{kind.value}/{name}")
            return
        if self._has_dependent_clones(source):
            # Kept in place, its marker removed: list() skips it, gc() destroys
            # it once free; its name stays taken until then. Not renamed into
            # .trash (zfs-fuse refuses while clones are mounted; OpenZFS would
            # rename its snapshots with it, and they are the clones' reset
            # sources, named by where they are).
            self._zfs(f"destroy {source}", "inherit", _MARKER, source)
            log.debug("kept in place: clones depend on it", dataset=source)
            return
        trashed = f"{self.dataset}/.trash/{uuid.uuid4().hex}"
        try:
            self._zfs(f"destroy {source}", "rename", source, trashed)
        except NotFound:
            return
        self._destroy_trashed(trashed)
        log.debug("destroyed", volume=f"{kind.value}/{name}", trash=trashed)

    def _has_dependent_clones(self, dataset: str) -> bool:
        out = self._zfs("origins", "get", "-H", "-r", "-o", "value", "origin", self.dataset)
        return any(line.startswith(f"{dataset}@") for line in out.split("\n"))

    def destroy_snapshot(self, ref: SnapshotRef) -> bool:
        target = self._name(ref.kind, ref.name, ref.snap)
        try:
            self._zfs(f"destroy snapshot {target}", "destroy", target)
        except NotFound:
            return True
        except _Pinned:
            return False
        return True

    def _get_all(self) -> dict[str, dict[str, tuple[str, str]]]:
        """name -> property -> (value, source) for the whole tree, one spawn.

        Only local and intrinsic properties (type, origin, ...): that halves
        zfs-fuse's time, and inherited ones (mountpoint) are derived, see _path().
        """
        out = self._zfs(
            "list",
            "get",
            "-H",
            "-p",
            "-r",
            "-s",
            "local,none",
            "-o",
            "name,property,value,source",
            "all",
            self.dataset,
        )
        return parse_properties(out)

    def list(self) -> list[Volume]:
        return volumes_of(self.dataset, self._get_all(), self._path)

    def usage(self, kind: Kind, name: str) -> int:
        """`usedbydataset`: for a clone, the bytes it does not share with its
        origin snapshot (old zfs has no `written` property)."""
        target = self._name(kind, name)
        return int(
            self._zfs(
                f"usage of {target}", "get", "-H", "-p", "-o", "value", "usedbydataset", target
            ).strip()
        )

    def free_bytes(self) -> int:
        # statvfs of a mounted dataset reports what it may still take (pool
        # free space, within quotas): no `zfs get` on the create path.
        if self._mountpoint is not None:
            with contextlib.suppress(OSError):
                st = os.statvfs(self._mountpoint)
                return st.f_bavail * st.f_frsize
        return super().free_bytes()

    def pool_usage(self) -> PoolUsage:
        out = self._zfs(
            "pool usage", "get", "-H", "-p", "-o", "value", "used,available", self.dataset
        ).split()
        used, available = int(out[0]), int(out[1])
        return PoolUsage(used_bytes=used, total_bytes=used + available)

    def gc(self) -> builtins.list[str]:
        with self._in_flight_lock:
            in_flight = set(self._in_flight)
            self._started_since_listing.clear()
        tree = self._get_all()
        with self._in_flight_lock:
            in_flight |= self._in_flight | self._started_since_listing
        leftovers: list[str] = []
        for dataset, props in sorted(tree.items()):
            if dataset in in_flight:
                continue
            rel = dataset[len(self.dataset) + 1 :]
            parts = rel.split("/")
            if "@" in rel or len(parts) != 2 or props.get("type", ("", ""))[0] != "filesystem":
                continue
            if parts[0] in (".staging", ".trash") or (
                parts[0] in ("bases", "branches") and _MARKER not in props
            ):
                leftovers.append(dataset)
        removed = [d[len(self.dataset) + 1 :] for d in leftovers if self._destroy_trashed(d)]
        if removed:
            log.debug("gc", removed=removed)
        return removed
