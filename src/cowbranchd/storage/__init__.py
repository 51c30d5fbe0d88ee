"""Copy-on-write storage drivers, and the name/meta rules every driver shares.

`open_driver(kind, root)` is how the daemon picks a driver from its config.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from pathlib import Path

from ..errors import InvalidArgument
from .base import Kind, PoolUsage, SnapshotRef, StorageDriver, Volume

__all__ = ["Kind", "PoolUsage", "SnapshotRef", "StorageDriver", "Volume", "open_driver"]

# Narrower than either filesystem allows: no '/', '@' or leading '.', so a
# name can never escape its directory or collide with `.staging`/`.trash`.
_NAME = re.compile(r"[a-z0-9][a-z0-9_.-]{0,127}")
# ZFS user property names allow little more; same rule on btrfs so a pool can
# move between drivers.
_META_KEY = re.compile(r"[a-z0-9_-]{1,200}")


def _check_name(field: str, value: str) -> None:
    if not _NAME.fullmatch(value):
        raise InvalidArgument(field, f"{value!r} must match {_NAME.pattern}")


def _check_meta(meta: Mapping[str, str]) -> None:
    for key, value in meta.items():
        if not _META_KEY.fullmatch(key):
            raise InvalidArgument("meta", f"key {key!r} must match {_META_KEY.pattern}")
        if not isinstance(value, str):
            raise InvalidArgument(key, f"value must be a string, not {type(value).__name__}")


def open_driver(kind: str, root: str) -> StorageDriver:
    """The driver for `kind` ("btrfs": `root` is a directory on a btrfs mount;
    "zfs": `root` is a dataset such as `tank/cowbranchd`). Does not check()."""
    # Imported here: drivers import this package for the helpers above.
    if kind == "btrfs":
        from .btrfs import BtrfsDriver

        return BtrfsDriver(Path(root))
    if kind == "zfs":
        from .zfs import ZfsDriver

        return ZfsDriver(root)
    raise InvalidArgument("storage.kind", f"{kind!r} is not one of 'btrfs', 'zfs'")
