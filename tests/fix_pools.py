"""Real copy-on-write pools for tests: btrfs on a loop device, zfs-fuse pools on
files. Nothing is mocked; everything made here is torn down here.

Fixtures: `btrfs_pool` (a directory on a session-wide loop btrfs), `zfs_pool`
(a dataset on a session-wide zfs-fuse pool `cbt<pid>`), `driver` (a fresh
driver in its own subdirectory/dataset, once per driver flavour) and
`tiny_driver` (the same on a pool small enough to fill). A zfs-fuse daemon
that was already running is used and left running; one we start is stopped
by pid. Skips, with the reason, when not root or the tools are missing.
"""

from __future__ import annotations

import contextlib
import itertools
import os
import shutil
import tempfile
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from cowbranchd.errors import CowbranchError
from cowbranchd.run import run
from cowbranchd.storage.base import Kind, SnapshotRef, StorageDriver
from cowbranchd.storage.btrfs import BtrfsDriver
from cowbranchd.storage.loop import make_btrfs_loop_pool
from cowbranchd.storage.zfs import ZfsDriver
from tests.zfs_fuse import ZfsFuse, make_zfs_file_pool, start_zfs_fuse

__all__ = ["leave_leftovers", "misplaced_like", "reopen"]

FLAVOURS = ["btrfs-library", "btrfs-command", "zfs-command"]
_counter = itertools.count()


def _require(*tools: str) -> None:
    if os.geteuid() != 0:
        pytest.skip("real pools need root (loop devices, mounts, zfs-fuse)")
    missing = [tool for tool in tools if shutil.which(tool) is None]
    if missing:
        pytest.skip(f"missing tools: {', '.join(missing)}")


@contextlib.contextmanager
def _workdir(label: str) -> Iterator[Path]:
    """A private directory for pool images and mountpoints.

    Not under pytest's basetemp: pytest deletes old basetemps with rmtree,
    which would walk into a pool another session still has mounted there.
    Removed with rmdir only, so nothing is ever deleted through a mount.
    """
    work = Path(tempfile.mkdtemp(prefix=f"cbt-{label}-"))
    try:
        yield work
    finally:
        (work / "pool.img").unlink(missing_ok=True)
        (work / "zfs-fuse.pid").unlink(missing_ok=True)
        for leftover in (work / "mnt", work):
            with contextlib.suppress(OSError):
                leftover.rmdir()


@pytest.fixture(scope="session")
def btrfs_pool() -> Iterator[Path]:
    """A directory on a fresh 4 GiB (sparse) btrfs loop pool; give each user a subdirectory:
    every daemon of the session keeps its own demo base on it."""
    _require("losetup", "mkfs.btrfs", "btrfs", "blkid", "mount", "umount")
    with _workdir("btrfs") as work:
        pool = make_btrfs_loop_pool(work / "pool.img", work / "mnt", 4 << 30)
        try:
            yield pool.mountpoint
        finally:
            pool.release()


@pytest.fixture(scope="session")
def zfs_fuse() -> Iterator[ZfsFuse]:
    """A running zfs-fuse: the machine's own if one answers, else ours."""
    _require("zfs-fuse", "zfs", "zpool")
    with _workdir("zfs-fuse") as work:
        daemon = start_zfs_fuse(work / "zfs-fuse.pid")
        try:
            yield daemon
        finally:
            daemon.stop()


@pytest.fixture(scope="session")
def zfs_pool(zfs_fuse: ZfsFuse) -> Iterator[str]:
    """A dataset on a fresh 1 GiB file-backed pool named for this session."""
    with _workdir("zfs") as work:
        pool = make_zfs_file_pool(f"cbt{os.getpid()}", work / "pool.img", 1 << 30, work / "mnt")
        try:
            yield pool.name
        finally:
            from tests.fix_daemon import stop_daemons_on  # noqa: PLC0415 (plugins import each other)

            stop_daemons_on(pool.name)
            pool.destroy()


def _teardown(driver: StorageDriver) -> None:
    """Destroy what a test left, clones before what they pin."""
    for _ in range(3):
        volumes = driver.list()
        for volume in sorted(volumes, key=lambda v: v.origin is None):
            with contextlib.suppress(CowbranchError):
                driver.destroy(volume.kind, volume.name)
        with contextlib.suppress(CowbranchError):
            driver.gc()
        if not volumes:
            break


def _driver_for(flavour: str, request: pytest.FixtureRequest) -> StorageDriver:
    unique = f"t{next(_counter)}"
    if flavour.startswith("btrfs"):
        root = request.getfixturevalue("btrfs_pool") / unique
        root.mkdir()
        return BtrfsDriver(root, use_library=flavour == "btrfs-library")
    dataset = f"{request.getfixturevalue('zfs_pool')}/{unique}"
    run(["zfs", "create", dataset])
    return ZfsDriver(dataset, use_library=False)


@pytest.fixture(params=FLAVOURS)
def driver(request: pytest.FixtureRequest) -> Iterator[StorageDriver]:
    """A fresh, checked driver with its layout, alone in its subdirectory/dataset."""
    flavour: str = request.param
    made = _driver_for(flavour, request)
    made.check()
    made.ensure_layout()
    try:
        yield made
    finally:
        _teardown(made)
        if isinstance(made, ZfsDriver):
            run(["zfs", "destroy", "-r", made.dataset], check=False)


@pytest.fixture(params=FLAVOURS)
def tiny_driver(request: pytest.FixtureRequest) -> Iterator[StorageDriver]:
    """A driver on its own pool small enough to fill (btrfs 114 MiB, zfs 64 MiB)."""
    flavour: str = request.param
    if flavour.startswith("btrfs"):
        _require("losetup", "mkfs.btrfs", "btrfs", "blkid", "mount", "umount")
        with _workdir("tiny") as work:
            pool = make_btrfs_loop_pool(work / "pool.img", work / "mnt", 114 << 20)
            try:
                yield BtrfsDriver(pool.mountpoint, use_library=flavour == "btrfs-library")
            finally:
                pool.release()
        return
    request.getfixturevalue("zfs_fuse")
    with _workdir("tiny") as work:
        name = f"cbt{os.getpid()}tiny{next(_counter)}"
        zpool = make_zfs_file_pool(name, work / "pool.img", 64 << 20, work / "mnt")
        try:
            yield ZfsDriver(name, use_library=False)
        finally:
            zpool.destroy()


def leave_leftovers(driver: StorageDriver, source: SnapshotRef) -> None:
    """Do what a crash mid-clone leaves behind: a staged copy of `source` and
    a volume under branches/ that never got its metadata."""
    token = uuid.uuid4().hex
    if isinstance(driver, BtrfsDriver):
        snap = driver.root / source.kind.value / f"{source.name}@{source.snap}"
        run(["btrfs", "subvolume", "snapshot", str(snap), str(driver.root / ".staging" / token)])
        run(["btrfs", "subvolume", "create", str(driver.root / Kind.BRANCHES.value / "half")])
        # A clone whose (not yet durable) sidecar a crash left empty.
        torn = driver.root / Kind.BRANCHES.value / "torn"
        run(["btrfs", "subvolume", "snapshot", str(snap), str(torn)])
        (torn / "cowbranch.json").write_text("")
    elif isinstance(driver, ZfsDriver):
        origin = f"{driver.dataset}/{source}"
        run(["zfs", "clone", origin, f"{driver.dataset}/.staging/{token}"])
        run(["zfs", "create", f"{driver.dataset}/{Kind.BRANCHES.value}/half"])
    else:  # pragma: no cover - a new driver must teach this helper
        raise NotImplementedError(type(driver).__name__)


def misplaced_like(driver: StorageDriver) -> tuple[StorageDriver, str]:
    """A driver of the same kind pointed at storage it cannot use, and a word
    its check() error must contain (what it found there)."""
    if isinstance(driver, BtrfsDriver):
        # /dev/shm is tmpfs on every Linux: copy-on-write it is not.
        return BtrfsDriver(Path("/dev/shm"), use_library=driver.use_library), "tmpfs"
    if isinstance(driver, ZfsDriver):
        return ZfsDriver(f"cbtnopool{os.getpid()}/x", use_library=False), "not imported"
    raise NotImplementedError(type(driver).__name__)  # pragma: no cover


def reopen(driver: StorageDriver) -> StorageDriver:
    """A fresh instance of the same driver on the same pool (as after a restart)."""
    if isinstance(driver, BtrfsDriver):
        return BtrfsDriver(driver.root, use_library=driver.use_library)
    if isinstance(driver, ZfsDriver):
        return ZfsDriver(driver.dataset, use_library=driver.use_library)
    raise NotImplementedError(type(driver).__name__)  # pragma: no cover
