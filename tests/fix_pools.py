"""Real copy-on-write pools for tests: btrfs on a loop device, zfs-fuse pools on
files. Nothing is mocked; everything made here is torn down here.

Fixtures: `btrfs_pool` (a directory on a session-wide loop btrfs), `zfs_pool`
(a dataset on a session-wide zfs-fuse pool `cbt<pid>`), `kernel_zfs_pool`
(the same on kernel OpenZFS, where /dev/zfs exists), `flavour` (each storage
flavour of tests/fix_storage.py in turn), `driver` (a fresh driver of that
flavour in its own subdirectory/dataset) and `tiny_driver` (the same on a pool
small enough to fill); `pool_daemon_factory` makes daemons on btrfs, then on
zfs-fuse. A zfs-fuse daemon that was already running is used and left
running; one we start is stopped by pid. Skips, with the reason, when not
root, the tools are missing or a flavour cannot run on this machine.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

from cowbranchd.run import run
from cowbranchd.storage.base import StorageDriver
from cowbranchd.storage.loop import make_btrfs_loop_pool
from tests.fix_storage import FLAVOURS, Flavour
from tests.zfs_fuse import ZfsFuse, make_zfs_file_pool, start_zfs_fuse

if TYPE_CHECKING:
    from tests.fix_daemon import DaemonFactory, DaemonHandle


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


def _flavour_pool(flavour: Flavour, request: pytest.FixtureRequest) -> str:
    """The pool `flavour` makes roots on, or a skip saying why it cannot run here."""
    reason = flavour.unavailable()
    if reason is not None:
        pytest.skip(f"{flavour.id}: {reason}")
    return str(request.getfixturevalue(flavour.pool_fixture))


@pytest.fixture(scope="session")
def kernel_zfs_pool() -> Iterator[str]:
    """A dataset on a fresh 1 GiB file-backed pool of kernel OpenZFS (needs /dev/zfs)."""
    _require("zfs", "zpool")
    if not os.path.exists("/dev/zfs"):
        pytest.skip("kernel OpenZFS is not loaded: no /dev/zfs")
    with _workdir("kzfs") as work:
        pool = make_zfs_file_pool(f"cbk{os.getpid()}", work / "pool.img", 1 << 30, work / "mnt")
        try:
            yield pool.name
        finally:
            pool.destroy()


@pytest.fixture(params=FLAVOURS, ids=lambda f: f.id)
def flavour(request: pytest.FixtureRequest) -> Flavour:
    """Each storage flavour in turn (see tests/fix_storage.py)."""
    chosen: Flavour = request.param
    return chosen


@pytest.fixture
def driver(flavour: Flavour, request: pytest.FixtureRequest) -> Iterator[StorageDriver]:
    """A fresh, checked driver of `flavour` with its layout, alone in its own
    subdirectory/dataset; whatever the test left is destroyed afterwards."""
    made = flavour.open(flavour.new_root(_flavour_pool(flavour, request)))
    try:
        made.check()
        made.ensure_layout()
        yield made
    finally:
        flavour.tear_down(made)


@pytest.fixture
def tiny_driver(flavour: Flavour, request: pytest.FixtureRequest) -> Iterator[StorageDriver]:
    """A driver of `flavour` on its own pool small enough to fill (btrfs 114 MiB, zfs 64 MiB)."""
    _flavour_pool(flavour, request)
    with _workdir("tiny") as work, flavour.tiny_pool(request, work) as location:
        yield flavour.open(location)


@pytest.fixture(params=["btrfs", "zfs"])
def pool_daemon_factory(
    request: pytest.FixtureRequest, daemon_factory: DaemonFactory
) -> Iterator[Callable[..., DaemonHandle]]:
    """Makes daemons (each with the demo base) on btrfs or on zfs-fuse, one
    driver per test; stops each with its postmasters when the test ends (a
    zfs-fuse pool cannot go from under a running daemon) and frees its dataset.

    `make(start=False)` returns it unstarted, to set `sections`/`env` first."""
    made: list[DaemonHandle] = []

    def make(*, start: bool = True) -> DaemonHandle:
        if request.param == "btrfs":
            handle = daemon_factory(start=False)
        else:
            zfs_pool: str = request.getfixturevalue("zfs_pool")
            root = f"{zfs_pool}/d{uuid.uuid4().hex[:8]}"
            handle = daemon_factory(driver="zfs", pool_root=root, start=False)
        made.append(handle)
        if start:
            handle.start()
        return handle

    try:
        yield make
    finally:
        for handle in reversed(made):
            handle.cleanup()
            if handle.driver == "zfs":
                _free_dataset(handle.pool_root)


def _free_dataset(root: str) -> None:
    """Destroy a test daemon's dataset and everything in it, clones of its
    snapshots included (`-R`: a frozen template's children, a branch's
    children): the session's pool is small, and every test after this one
    needs the space back. A dataset that will not go fails the test."""
    error = ""
    for _ in range(20):
        done = run(["zfs", "destroy", "-R", "-f", root], check=False)
        if done.returncode == 0 or "does not exist" in done.stderr:
            return
        error = done.stderr.strip()
        # zfs-fuse unmounts children as it destroys them and calls their
        # parent "busy" until it has: each attempt gets further.
        time.sleep(0.5)
    raise AssertionError(f"could not free the test dataset {root}: {error}")
