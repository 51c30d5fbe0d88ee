"""zfs-fuse, the userspace ZFS the tests and the benchmark use: start one
(or share the one already running), make pools on plain files, and put them
away again.

Test and benchmark tooling, not part of cowbranchd: the daemon never starts
zfs-fuse (the operator's system does). Everything here is undoable and
idempotent: `ZfsFilePool.destroy()` destroys the pool. Only one zfs-fuse
daemon can run per machine (its socket path is fixed), so a running one is
shared: `ZfsFuse.stop()` stops only a daemon we started, by pid, and only once
no pool is left on it.
"""

from __future__ import annotations

import os
import signal
import time
from dataclasses import dataclass
from pathlib import Path

import structlog

from cowbranchd.errors import CommandError, StorageError
from cowbranchd.run import run

__all__ = ["ZFS_FUSE_SOCKET", "ZfsFilePool", "ZfsFuse", "make_zfs_file_pool", "start_zfs_fuse"]

log = structlog.get_logger("cowbranchd.tests")

# zfs-fuse listens on this fixed path (compiled in); `zpool list` answering
# through it is the only reliable readiness signal.
ZFS_FUSE_SOCKET = Path("/var/run/zfs/zfs_socket")


def _zpool_answers() -> bool:
    try:
        return run(["zpool", "list", "-H"], check=False, timeout=10).returncode == 0
    except CommandError:  # zpool not installed or hung
        return False


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # A zombie still answers kill(0); it is gone for our purposes.
    try:
        with open(f"/proc/{pid}/stat", encoding="utf-8") as fh:
            return fh.read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


@dataclass
class ZfsFuse:
    """A zfs-fuse daemon; `pid` is set only when we started it."""

    pid: int | None
    pidfile: Path | None = None

    def stop(self, timeout: float = 20.0) -> None:
        """Stop the daemon if we started it and nobody else has a pool on it.

        zfs-fuse is one per machine: when another user imported a pool while
        we ran, stopping would pull it from under them, so it is left running.
        """
        if self.pid is None or not _alive(self.pid):
            self.pid = None
            return
        pools = run(["zpool", "list", "-H", "-o", "name"], check=False).stdout.split()
        if pools:
            log.warning("zfs-fuse left running: pools in use", pid=self.pid, pools=pools)
            return
        os.kill(self.pid, signal.SIGTERM)
        deadline = time.monotonic() + timeout
        while _alive(self.pid):
            if time.monotonic() > deadline:
                os.kill(self.pid, signal.SIGKILL)
                deadline = time.monotonic() + 5
            time.sleep(0.02)
        log.debug("zfs-fuse stopped", pid=self.pid)
        self.pid = None
        if self.pidfile is not None:
            self.pidfile.unlink(missing_ok=True)


def start_zfs_fuse(pidfile: Path, timeout: float = 15.0) -> ZfsFuse:
    """Start zfs-fuse unless one already answers; wait until `zpool` works.

    It is ready ~0.2 s after it forks. Raise StorageError if it never answers.
    """
    if _zpool_answers():
        return ZfsFuse(pid=None)
    pidfile.parent.mkdir(parents=True, exist_ok=True)
    pidfile.unlink(missing_ok=True)
    # No kstat mount: it would add a FUSE mount on /zfs-kstat to clean up.
    run(["zfs-fuse", "--no-kstat-mount", "--pidfile", str(pidfile)])
    deadline = time.monotonic() + timeout
    pid: int | None = None
    while time.monotonic() < deadline:
        if pid is None and pidfile.exists():
            text = pidfile.read_text().strip()
            pid = int(text) if text else None
        if pid is not None and _zpool_answers():
            log.debug("zfs-fuse started", pid=pid)
            return ZfsFuse(pid=pid, pidfile=pidfile)
        time.sleep(0.02)
    handle = ZfsFuse(pid=pid, pidfile=pidfile)
    handle.stop()
    raise StorageError(f"zfs-fuse did not answer on {ZFS_FUSE_SOCKET} within {timeout}s")


@dataclass
class ZfsFilePool:
    """A zfs pool `name` whose single vdev is the file `image`."""

    name: str
    image: Path
    mountpoint: Path

    def destroy(self) -> None:
        """Destroy the pool (all its datasets). Calling it twice is fine."""
        if run(["zpool", "list", "-H", "-o", "name", self.name], check=False).returncode != 0:
            return
        for attempt in range(10):
            proc = run(["zpool", "destroy", "-f", self.name], check=False)
            if proc.returncode == 0:
                break
            # A mount still busy for a moment (a process just exited) clears quickly.
            time.sleep(0.05 * (attempt + 1))
        else:
            raise StorageError(f"could not destroy zfs pool {self.name}: {proc.stderr.strip()}")
        log.debug("zfs pool destroyed", pool=self.name)


def make_zfs_file_pool(name: str, image: Path, size_bytes: int, mountpoint: Path) -> ZfsFilePool:
    """Create pool `name` on a fresh sparse file `image`, mounted at `mountpoint`.

    zfs-fuse must be running (see start_zfs_fuse). A pool of that name that
    already exists is reused. zfs needs 64 MiB at least.
    """
    pool = ZfsFilePool(name, image, mountpoint)
    if run(["zpool", "list", "-H", "-o", "name", name], check=False).returncode == 0:
        return pool
    image.parent.mkdir(parents=True, exist_ok=True)
    with open(image, "wb") as fh:
        fh.truncate(size_bytes)
    run(["zpool", "create", "-m", str(mountpoint), name, str(image)])
    log.debug("zfs pool created", pool=name, image=str(image), mountpoint=str(mountpoint))
    return pool
