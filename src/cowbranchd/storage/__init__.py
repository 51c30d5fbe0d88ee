"""Copy-on-write storage drivers; `open_driver(kind, root)` is how the daemon
picks one from its config."""

from __future__ import annotations

from pathlib import Path

from cowbranchd.errors import InvalidArgument

from .base import Kind, PoolUsage, SnapshotRef, StorageDriver, Volume
from .btrfs import BtrfsDriver
from .zfs import ZfsDriver

__all__ = [
    "BtrfsDriver",
    "Kind",
    "PoolUsage",
    "SnapshotRef",
    "StorageDriver",
    "Volume",
    "ZfsDriver",
    "open_driver",
]


def open_driver(kind: str, root: str) -> StorageDriver:
    """The driver for `kind`: "btrfs" (`root` is a directory on a btrfs mount)
    or "zfs" (`root` is a dataset such as `tank/cowbranchd`). Does not check()."""
    if kind == "btrfs":
        return BtrfsDriver(Path(root))
    if kind == "zfs":
        return ZfsDriver(root)
    raise InvalidArgument("storage.kind", f"{kind!r} is not one of 'btrfs', 'zfs'")
