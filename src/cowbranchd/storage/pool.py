"""Which pool the daemon opens: the driver its `[storage]` config names, or,
with no pool configured, a btrfs filesystem on a loop file under the state
directory (the quickstart's embedded default).

Opening does not check() the driver; the daemon does that at start-up.
"""

from __future__ import annotations

from pathlib import Path

import structlog

from cowbranchd.config import StorageConfig
from cowbranchd.errors import InvalidArgument

from .base import StorageDriver
from .btrfs import BtrfsDriver
from .loop import make_btrfs_loop_pool
from .zfs import ZfsDriver

__all__ = ["open_driver"]

log = structlog.get_logger("cowbranchd.storage")


def open_driver(storage: StorageConfig, state_dir: Path) -> StorageDriver:
    """The driver for `storage`: `root` is a directory on a btrfs mount or a
    ZFS dataset such as `tank/cowbranchd` (`driver = "auto"` tells them apart
    by the leading slash). With no `root`, a btrfs pool on the loop file
    `state_dir/pool.img` mounted at `state_dir/pool`, made or reused."""
    if storage.root:
        kind = storage.driver
        if kind == "auto":
            kind = "btrfs" if storage.root.startswith("/") else "zfs"
        if kind == "btrfs":
            return BtrfsDriver(Path(storage.root))
        if kind == "zfs":
            return ZfsDriver(storage.root)
        raise InvalidArgument("storage.driver", f"{kind!r} is not one of 'auto', 'btrfs', 'zfs'")
    if storage.driver == "zfs":
        raise InvalidArgument("storage.root", "a ZFS dataset name is required with driver = zfs")
    state_dir.mkdir(parents=True, exist_ok=True)
    pool = make_btrfs_loop_pool(state_dir / "pool.img", state_dir / "pool", storage.loop_size)
    log.info("loop_pool", image=str(pool.image), mountpoint=str(pool.mountpoint))
    return BtrfsDriver(pool.mountpoint)
