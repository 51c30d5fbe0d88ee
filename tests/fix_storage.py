"""Storage flavours for tests, after containerd's snapshotter testsuite: each
flavour is a small object that says how to open its driver on a root, make a
fresh root and put it away, fake what a crash leaves behind, and which root it
cannot use. The conformance suite runs unchanged over every flavour and reads
what a driver can do from its capability flags, never from its class.

Also here: reading a daemon's pool straight from storage (volume names and
metadata) on either driver, for tests that check what a daemon left there.

A plain module, not a fixture plugin: tests/fix_pools.py turns the flavours
into fixtures.
"""

from __future__ import annotations

import abc
import contextlib
import json
import os
import re
import subprocess
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

from cowbranchd.errors import CowbranchError
from cowbranchd.run import run
from cowbranchd.storage import btrfs as btrfs_module
from cowbranchd.storage import btrfs_subvol
from cowbranchd.storage import zfs_io as zfs_module
from cowbranchd.storage.base import Kind, SnapshotRef, StorageDriver
from cowbranchd.storage.btrfs import BtrfsDriver
from cowbranchd.storage.loop import make_btrfs_loop_pool
from cowbranchd.storage.zfs import ZfsDriver
from tests.zfs_fuse import make_zfs_file_pool

if TYPE_CHECKING:
    from tests.fix_daemon import DaemonHandle

__all__ = [
    "FLAVOURS",
    "BtrfsFlavour",
    "Flavour",
    "ZfsFlavour",
    "branch_volumes",
    "tool_shim",
    "volume_meta",
]


class Flavour(abc.ABC):
    """One way of driving one filesystem kind, as the conformance suite needs it."""

    id: str  # the test id
    # The session fixture giving the pool fresh roots are made on.
    pool_fixture: str
    use_library: bool

    @abc.abstractmethod
    def unavailable(self) -> str | None:
        """Why this flavour cannot run on this machine (the skip reason), or None."""

    @abc.abstractmethod
    def open(self, location: str) -> StorageDriver:
        """A driver of this flavour on `location` (as after a daemon restart)."""

    @abc.abstractmethod
    def new_root(self, pool: str) -> str:
        """A fresh, empty root `location` on `pool` (the pool fixture's value)."""

    @abc.abstractmethod
    def drop_root(self, location: str) -> None:
        """Remove what new_root made, once its volumes are destroyed."""

    @abc.abstractmethod
    def tiny_pool(
        self, request: pytest.FixtureRequest, work: Path
    ) -> contextlib.AbstractContextManager[str]:
        """A pool of its own, small enough to fill; yields the root location."""

    @abc.abstractmethod
    def misplaced(self) -> tuple[str, str]:
        """A location of storage this flavour cannot use, and a word its
        check() error must contain (what it found there)."""

    @abc.abstractmethod
    def leave_leftovers(self, driver: StorageDriver, source: SnapshotRef) -> list[str]:
        """Do what a crash mid-clone leaves behind: a staged copy of `source`
        and volumes under branches/ that never got readable metadata. Returns
        those volumes' names."""

    def tear_down(self, driver: StorageDriver) -> None:
        """Destroy what a test left (clones before what they pin), then the root."""
        for _ in range(3):
            volumes = driver.list()
            for volume in sorted(volumes, key=lambda v: v.origin is None):
                with contextlib.suppress(CowbranchError):
                    driver.destroy(volume.kind, volume.name)
            with contextlib.suppress(CowbranchError):
                driver.gc()
            if not volumes:
                break
        self.drop_root(driver.location)

    # Data in a volume is plain files under its mountpoint on every flavour
    # so far; a flavour whose volumes need mounting first overrides these.

    def write(self, volume: Path, name: str, data: bytes) -> None:
        """Write `data` to `pgdata/name` in a volume, durably (fsync'd)."""
        (volume / "pgdata").mkdir(exist_ok=True)
        with open(volume / "pgdata" / name, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())

    def read(self, volume: Path, name: str) -> bytes:
        return (volume / "pgdata" / name).read_bytes()

    def __repr__(self) -> str:
        return self.id


class BtrfsFlavour(Flavour):
    """Subvolumes under a directory of the session's btrfs loop pool, through
    libbtrfsutil (`use_library=True`) or the `btrfs` command."""

    def __init__(self, *, use_library: bool) -> None:
        self.use_library = use_library
        self.id = "btrfs-library" if use_library else "btrfs-command"
        self.pool_fixture = "btrfs_pool"

    def unavailable(self) -> str | None:
        if self.use_library and btrfs_subvol.btrfsutil is None:
            return "libbtrfsutil's Python bindings (python3-btrfsutil) do not import"
        return None

    def open(self, location: str) -> StorageDriver:
        return BtrfsDriver(Path(location), use_library=self.use_library)

    def new_root(self, pool: str) -> str:
        root = Path(pool) / f"t{uuid.uuid4().hex[:8]}"
        root.mkdir()
        return str(root)

    def drop_root(self, location: str) -> None:
        # rmdir only: nothing is ever deleted recursively on a pool.
        for sub in (".trash", ".staging", "branches", "bases", ""):
            with contextlib.suppress(OSError):
                (Path(location) / sub).rmdir()

    @contextlib.contextmanager
    def tiny_pool(self, request: pytest.FixtureRequest, work: Path) -> Iterator[str]:
        pool = make_btrfs_loop_pool(work / "pool.img", work / "mnt", 114 << 20)
        try:
            yield str(pool.mountpoint)
        finally:
            pool.release()

    def misplaced(self) -> tuple[str, str]:
        # /dev/shm is tmpfs on every Linux: copy-on-write it is not.
        return "/dev/shm", "tmpfs"

    def leave_leftovers(self, driver: StorageDriver, source: SnapshotRef) -> list[str]:
        root = Path(driver.location)
        snap = root / source.kind.value / f"{source.name}@{source.snap}"
        staged = root / ".staging" / uuid.uuid4().hex
        run(["btrfs", "subvolume", "snapshot", str(snap), str(staged)])
        run(["btrfs", "subvolume", "create", str(root / Kind.BRANCHES.value / "half")])
        # A clone whose (not yet durable) sidecar a crash left empty.
        torn = root / Kind.BRANCHES.value / "torn"
        run(["btrfs", "subvolume", "snapshot", str(snap), str(torn)])
        (torn / btrfs_module.SIDECAR).write_text("")
        # A clone made in place before its own sidecar replaced the one it
        # copied from its source (which names the source's volume).
        copied = root / Kind.BRANCHES.value / "copied"
        run(["btrfs", "subvolume", "snapshot", str(snap), str(copied)])
        return ["half", "torn", "copied"]


class ZfsFlavour(Flavour):
    """Datasets under a dataset of a session pool: zfs-fuse driven through the
    `zfs` command, or kernel OpenZFS through libzfs_core where /dev/zfs exists."""

    def __init__(self, *, use_library: bool) -> None:
        self.use_library = use_library
        self.id = "zfs-libzfs_core" if use_library else "zfs-fuse-command"
        self.pool_fixture = "kernel_zfs_pool" if use_library else "zfs_pool"

    def unavailable(self) -> str | None:
        if not self.use_library:
            return None
        if not os.path.exists("/dev/zfs"):
            return (
                "libzfs_core needs kernel OpenZFS and there is no /dev/zfs here "
                "(only zfs-fuse, which the zfs-fuse-command flavour covers)"
            )
        if zfs_module.lzc is None:
            return "OpenZFS's libzfs_core Python bindings do not import (they ship with OpenZFS)"
        return None

    def open(self, location: str) -> StorageDriver:
        return ZfsDriver(location, use_library=self.use_library)

    def new_root(self, pool: str) -> str:
        dataset = f"{pool}/t{uuid.uuid4().hex[:8]}"
        run(["zfs", "create", dataset])
        return dataset

    def drop_root(self, location: str) -> None:
        run(["zfs", "destroy", "-r", location], check=False)

    @contextlib.contextmanager
    def tiny_pool(self, request: pytest.FixtureRequest, work: Path) -> Iterator[str]:
        if not self.use_library:
            request.getfixturevalue("zfs_fuse")
        name = f"cbt{os.getpid()}tiny{uuid.uuid4().hex[:6]}"
        zpool = make_zfs_file_pool(name, work / "pool.img", 64 << 20, work / "mnt")
        try:
            yield name
        finally:
            zpool.destroy()

    def misplaced(self) -> tuple[str, str]:
        return f"cbtnopool{os.getpid()}/x", "not imported"

    def leave_leftovers(self, driver: StorageDriver, source: SnapshotRef) -> list[str]:
        root = driver.location
        run(["zfs", "clone", f"{root}/{source}", f"{root}/.staging/{uuid.uuid4().hex}"])
        # zfs sets a clone's properties with the clone itself: no torn metadata.
        run(["zfs", "create", f"{root}/{Kind.BRANCHES.value}/half"])
        return ["half"]


FLAVOURS: list[Flavour] = [
    BtrfsFlavour(use_library=True),
    BtrfsFlavour(use_library=False),
    ZfsFlavour(use_library=False),
    ZfsFlavour(use_library=True),
]


# -- a daemon's pool, read from storage itself (not through the daemon) --


def _zfs(*args: str) -> str:
    return subprocess.run(["zfs", *args], capture_output=True, text=True, check=True).stdout


def branch_volumes(d: DaemonHandle) -> set[str]:
    """Everything under the pool's branches/: volumes and their snapshots
    (`x@c-y`), including ones without metadata."""
    if d.driver == "btrfs":
        return {p.name for p in (Path(d.pool_root) / "branches").iterdir()}
    prefix = f"{d.pool_root}/branches/"
    names = _zfs("list", "-H", "-r", "-t", "filesystem,snapshot", "-o", "name", prefix[:-1])
    found = {n[len(prefix) :] for n in names.split() if n.startswith(prefix)}
    return {name for name in found if "/" not in name}


def volume_meta(d: DaemonHandle, volume: str) -> dict[str, str]:
    """The metadata stored on branch volume `volume`: its btrfs sidecar's
    `meta`, or its local `cowbranchd:*` ZFS user properties (minus the marker)."""
    if d.driver == "btrfs":
        sidecar = Path(d.pool_root) / "branches" / volume / btrfs_module.SIDECAR
        meta: dict[str, str] = json.loads(sidecar.read_text())["meta"]
        return meta
    dataset = f"{d.pool_root}/branches/{volume}"
    out = _zfs("get", "-H", "-s", "local", "-o", "property,value", "all", dataset)
    found = {}
    for line in out.splitlines():
        key, _, value = line.partition("\t")
        if key.startswith(zfs_module.PREFIX) and key != f"{zfs_module.PREFIX}.volume":
            found[key[len(zfs_module.PREFIX) :]] = re.sub(
                r"\\x([0-9a-f]{2})", lambda m: chr(int(m[1], 16)), value
            )
    return found


def tool_shim(directory: Path, exit_code: int) -> Path:
    """A directory holding `btrfs` and `zfs` executables that print an error
    and exit `exit_code`: put first on PATH, the filesystem tool fails the
    way a broken or mismatched installation does."""
    directory.mkdir(exist_ok=True)
    for tool in ("btrfs", "zfs"):
        shim = directory / tool
        message = f"{tool}: unusable tool (test shim)"
        shim.write_text(f"#!/bin/sh\necho '{message}' >&2\nexit {exit_code}\n")
        shim.chmod(0o755)
    return directory

