"""zfs-fuse under parallel load: the ZFS driver knows a zfs-fuse pool from a
kernel OpenZFS one, runs zfs-fuse's mutating commands one at a time (it
deadlocks otherwise, leaving `zfs` commands in uninterruptible sleep), and so
20 creates released at once, round after round, all finish READY and leave
nothing behind. Wall times per round are printed, never asserted."""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from concurrent import futures
from contextlib import contextmanager, suppress
from pathlib import Path
from typing import TypeVar

import psutil
import psycopg
import pytest

from cowbranchd.errors import CowbranchError
from cowbranchd.run import run
from cowbranchd.storage.base import Kind
from cowbranchd.storage.zfs import ZfsDriver
from cowbranchd.storage.zfs_io import zfs_mount_type
from cowbranchd.v1 import branches_pb2
from tests.fix_daemon import DaemonFactory, DaemonHandle

Branch = branches_pb2.Branch
A = TypeVar("A")
T = TypeVar("T")

PARALLEL = 20
ROUNDS = 10
# What ensure_layout makes under a pool dataset, relative to it.
LAYOUT = {"", "/.staging", "/.trash", "/bases", "/branches"}
_READ_ONLY = {"get", "list"}


def released_at_once(work: Callable[[A], T], args: Sequence[A]) -> tuple[list[T], float]:
    """Run work(arg) for every arg, each on its own thread, released together
    by a barrier; the results and the wall time from the release to the last
    one's end. The first exception is raised once every thread has finished."""
    barrier = threading.Barrier(len(args) + 1)

    def after_release(arg: A) -> T:
        barrier.wait(timeout=60)
        return work(arg)

    with futures.ThreadPoolExecutor(len(args)) as pool:
        running = [pool.submit(after_release, arg) for arg in args]
        barrier.wait(timeout=60)
        started = time.perf_counter()
        futures.wait(running)
        elapsed = time.perf_counter() - started
    return [f.result() for f in running], elapsed


class ZfsChildren:
    """Samples the `zfs` commands running as children of `pid`: the most
    mutating ones (anything but get/list) seen at once, and their verbs."""

    def __init__(self, pid: int) -> None:
        self.pid = pid
        self.most_at_once = 0
        self.verbs: set[str] = set()
        self._stop = threading.Event()

    def running(self) -> list[list[str]]:
        """argv of every `zfs` command now running as a child of `pid`."""
        found = []
        with suppress(psutil.NoSuchProcess):
            for child in psutil.Process(self.pid).children():
                with suppress(psutil.Error):
                    argv = child.cmdline()
                    if argv[:1] == ["zfs"]:
                        found.append(argv)
        return found

    def _sample(self) -> None:
        while not self._stop.is_set():
            verbs = [argv[1] for argv in self.running() if len(argv) > 1]
            mutating = [verb for verb in verbs if verb not in _READ_ONLY]
            self.verbs.update(mutating)
            self.most_at_once = max(self.most_at_once, len(mutating))
            time.sleep(0.002)

    @contextmanager
    def watching(self) -> Iterator[ZfsChildren]:
        sampler = threading.Thread(target=self._sample, name="zfs-children", daemon=True)
        sampler.start()
        try:
            yield self
        finally:
            self._stop.set()
            sampler.join(timeout=10)


def datasets_under(dataset: str) -> set[str]:
    """Filesystem datasets under `dataset`, relative to it ("" is itself)."""
    out = run(["zfs", "list", "-H", "-o", "name", "-r", "-t", "filesystem", dataset]).stdout
    return {name[len(dataset) :] for name in out.split()}


def settled(check: Callable[[], bool], timeout: float = 60.0) -> bool:
    """Whether `check()` holds within `timeout` (the reaper collects trash
    in the background)."""
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.2)
    return True


@pytest.mark.zfs
def test_the_driver_tells_zfs_fuse_from_kernel_zfs(zfs_pool: str) -> None:
    """A driver on a zfs-fuse pool is `userspace` (read-only); mountinfo lines
    read `fuse.zfs` for zfs-fuse and `zfs` for kernel OpenZFS, by pool."""
    driver = ZfsDriver(zfs_pool, use_library=False)
    assert driver.userspace is True
    with pytest.raises(AttributeError):
        driver.userspace = False  # type: ignore[misc]
    kernel = "97 29 0:61 / /tank/cbd rw,noatime shared:52 - zfs tank/cbd rw,xattr,noacl"
    fuse = "46 42 0:51 / /mnt/p rw,relatime - fuse.zfs p rw,user_id=0,group_id=0"
    tmpfs = "30 25 0:27 / /tank rw - tmpfs tank rw"
    assert zfs_mount_type("tank", [tmpfs, fuse, kernel]) == "zfs"
    assert zfs_mount_type("p", [kernel, fuse]) == "fuse.zfs"
    assert zfs_mount_type("tan", [kernel, fuse]) is None


@pytest.mark.slow
@pytest.mark.zfs
@pytest.mark.timeout(900)
def test_parallel_clones_and_destroys_through_the_driver(
    zfs_pool: str, capsys: pytest.CaptureFixture[str]
) -> None:
    """20 threads clone one snapshot at once, then destroy their clones at
    once, 10 rounds: every clone is mounted with the base's file, no two
    mutating zfs commands ever run at once, and only the base is left."""
    dataset = f"{zfs_pool}/drvconc"
    run(["zfs", "create", dataset])
    driver = ZfsDriver(dataset, use_library=False)
    driver.check()
    driver.ensure_layout()
    watch = ZfsChildren(os.getpid())

    def clone(name: str) -> Path:
        return driver.clone(source, Kind.BRANCHES, name, {})

    def destroy(name: str) -> None:
        driver.destroy(Kind.BRANCHES, name)

    try:
        base = driver.create_volume(Kind.BASES, "b", {})
        (base / "hello").write_text("hi")
        source = driver.snapshot(Kind.BASES, "b", "v1")
        with watch.watching():
            for r in range(ROUNDS):
                names = [f"r{r}-{i}" for i in range(PARALLEL)]
                paths, made = released_at_once(clone, names)
                assert [(p / "hello").read_text() for p in paths] == ["hi"] * PARALLEL
                _, gone = released_at_once(destroy, names)
                with capsys.disabled():
                    print(
                        f"\n[driver] round {r}: {PARALLEL} clones {made:.2f}s, destroys {gone:.2f}s"
                    )
        assert watch.most_at_once == 1
        assert {"clone", "unmount", "destroy"} <= watch.verbs
        assert [(v.kind, v.name) for v in driver.list()] == [(Kind.BASES, "b")]
        assert datasets_under(dataset) == LAYOUT | {"/bases/b"}
        assert watch.running() == []
    finally:
        for volume in driver.list():
            if volume.kind is Kind.BRANCHES:
                with suppress(CowbranchError):
                    driver.destroy(volume.kind, volume.name)
        run(["zfs", "destroy", "-r", dataset], check=False)


@pytest.mark.slow
@pytest.mark.zfs
@pytest.mark.timeout(1500)
def test_parallel_creates_on_zfs_fuse_all_finish(
    zfs_pool: str, daemon_factory: DaemonFactory, capsys: pytest.CaptureFixture[str]
) -> None:
    """20 CreateBranch calls released at once, then 20 DeleteBranch calls, 10
    rounds, on a daemon whose pool is zfs-fuse: every create is READY and
    answers SELECT 1 through its DSN; the daemon never runs two mutating zfs
    commands at once; afterwards no zfs command of the daemon is running, no
    command got stuck, and only the base is left under its dataset."""
    d: DaemonHandle = daemon_factory(driver="zfs", pool_root=f"{zfs_pool}/conc")
    try:
        assert d.proc is not None
        watch = ZfsChildren(d.proc.pid)
        with d.channel() as ch, watch.watching():
            stub = d.branches(ch)

            def create(branch_id: str) -> Branch:
                request = branches_pb2.CreateBranchRequest(
                    parent=f"bases/{d.base}", branch_id=branch_id
                )
                branch: Branch = stub.CreateBranch(request, timeout=240)
                return branch

            def delete(branch_id: str) -> None:
                request = branches_pb2.DeleteBranchRequest(
                    name=f"branches/{branch_id}", force=True, allow_missing=True
                )
                stub.DeleteBranch(request, timeout=240)

            for r in range(ROUNDS):
                names = [f"r{r}-{i}" for i in range(PARALLEL)]
                try:
                    created, made = released_at_once(create, names)
                    assert [b.state for b in created] == [Branch.READY] * PARALLEL
                    for branch in created:
                        with psycopg.connect(branch.connection.dsn, connect_timeout=30) as conn:
                            assert conn.execute("SELECT 1").fetchone() == (1,)
                finally:
                    _, gone = released_at_once(delete, names)
                with capsys.disabled():
                    print(
                        f"\n[daemon] round {r}: {PARALLEL} creates {made:.2f}s, deletes {gone:.2f}s"
                    )
            assert list(stub.ListBranches(branches_pb2.ListBranchesRequest()).branches) == []
        assert watch.most_at_once == 1
        assert {"clone", "destroy"} <= watch.verbs
        # None stuck: the reaper's own periodic `zfs get` may be in flight at
        # any instant, but every command ends (a stuck one never would).
        assert settled(lambda: watch.running() == [], timeout=30), watch.running()
        dataset = d.pool_root
        expected = LAYOUT | {f"/bases/{d.base}"}
        assert settled(lambda: datasets_under(dataset) == expected), datasets_under(dataset)
        assert d.postmasters() == []
        assert "command_stuck" not in d.log_path.read_text()
    finally:
        # The session's zfs pool may be torn down before daemon_factory's own
        # cleanup: stop this daemon and its postmasters now.
        d.cleanup()
