"""The benchmark's copy-on-write pools, kept between runs under the data dir.

btrfs: a loop image `btrfs.img` mounted at `btrfs-mnt`, pool root `btrfs-mnt/pool`.
zfs: zfs-fuse pool `cbbench` on the file `zfs.img`, pool root dataset
`cbbench/pool` mounted under `zfs-mnt`. Teardown unmounts/detaches (btrfs) or
exports (zfs) but keeps the images, so the bases in them are reused next run.
zfs-fuse is one per machine: a running one is reused and never stopped; one we
started is stopped (by pid) only when no pool is left on it.
"""

from __future__ import annotations

import os
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

from cowbranchd.storage.loop import LoopPool, make_btrfs_loop_pool

# zfs-fuse management is test tooling (tests/zfs_fuse.py), not part of the
# package; the benchmark runs from a checkout and borrows it from there.
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from tests.zfs_fuse import ZfsFuse, make_zfs_file_pool, start_zfs_fuse

__all__ = ["ZFS_POOL", "Pool", "open_pool"]

ZFS_POOL = "cbbench"
IMAGE_BYTES = 64 * 1024**3  # sparse: only what is written takes disk space


@dataclass
class Pool:
    """One driver's pool: what the daemon's `storage.root` names, where it is
    mounted, and how to put it away."""

    driver: str
    root: str  # btrfs: a directory; zfs: a dataset
    mountpoint: Path
    _loop: LoopPool | None = None
    _zfs_fuse: ZfsFuse | None = None
    notes: list[str] = field(default_factory=list)

    def release(self) -> None:
        """Unmount/detach (btrfs) or export (zfs); the image files stay."""
        if self._loop is not None:
            self._loop.release()
        if self.driver == "zfs":
            listed = subprocess.run(["zpool", "list", "-H", "-o", "name", ZFS_POOL],
                                    capture_output=True, text=True, check=False)
            if listed.returncode == 0:
                subprocess.run(["zpool", "export", "-f", ZFS_POOL], check=True,
                               capture_output=True, timeout=120)
        if self._zfs_fuse is not None:
            self._zfs_fuse.stop()


def _let_postgres_through(path: Path) -> None:
    """postgres (its own OS user) must traverse every directory down to its data."""
    for directory in (path, *path.parents):
        if directory == Path("/"):
            break
        if directory.exists():
            mode = directory.stat().st_mode
            if mode & 0o011 != 0o011:
                os.chmod(directory, mode | 0o011)


def _btrfs(data_dir: Path) -> Pool:
    loop = make_btrfs_loop_pool(data_dir / "btrfs.img", data_dir / "btrfs-mnt", IMAGE_BYTES)
    root = loop.mountpoint / "pool"
    root.mkdir(mode=0o755, exist_ok=True)
    _let_postgres_through(root)
    return Pool("btrfs", str(root), loop.mountpoint, _loop=loop)


def _zfs(data_dir: Path) -> Pool:
    fuse = start_zfs_fuse(data_dir / "zfs-fuse.pid")
    pool = Pool("zfs", f"{ZFS_POOL}/pool", data_dir / "zfs-mnt", _zfs_fuse=fuse)
    if fuse.pid is None:
        pool.notes.append("reused a running zfs-fuse daemon")
    try:
        image = data_dir / "zfs.img"
        imported = subprocess.run(["zpool", "list", "-H", "-o", "name", ZFS_POOL],
                                  capture_output=True, check=False).returncode == 0
        if not imported and image.exists():
            subprocess.run(["zpool", "import", "-d", str(data_dir), ZFS_POOL],
                           check=True, capture_output=True, timeout=300)
        elif not imported:
            make_zfs_file_pool(ZFS_POOL, image, IMAGE_BYTES, pool.mountpoint)
        exists = subprocess.run(["zfs", "list", "-H", pool.root], capture_output=True,
                                check=False).returncode == 0
        if not exists:
            subprocess.run(["zfs", "create", pool.root], check=True, capture_output=True)
        _let_postgres_through(pool.mountpoint / "pool" / "x")
    except BaseException:
        pool.release()
        raise
    return pool


def open_pool(driver: str, data_dir: Path) -> Pool:
    """Create or reuse the pool of `driver` ("btrfs" or "zfs") under `data_dir`."""
    data_dir.mkdir(mode=0o755, parents=True, exist_ok=True)
    os.chmod(data_dir, 0o755)
    return _btrfs(data_dir) if driver == "btrfs" else _zfs(data_dir)
