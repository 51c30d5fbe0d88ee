"""Copy-on-write storage: the narrow `StorageDriver` interface, its btrfs and
zfs drivers, and `open_driver`, how the daemon opens the pool its config names
(or, with none, a btrfs pool on a loop file).

Nothing here knows PostgreSQL or gRPC, nor imports the daemon.
"""

from __future__ import annotations

from .base import Kind, PoolUsage, SnapshotRef, StorageDriver, Volume
from .btrfs import BtrfsDriver
from .pool import open_driver
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
