"""Name and metadata rules every storage driver enforces, so a pool's names
and metadata mean the same on ZFS and btrfs."""

from __future__ import annotations

import re
from collections.abc import Mapping

from cowbranchd.errors import InvalidArgument

__all__ = ["check_meta", "check_name"]

# Narrower than either filesystem allows: no '/', '@' or leading '.', so a
# name can never escape its directory or collide with `.staging`/`.trash`.
_NAME = re.compile(r"[a-z0-9][a-z0-9_.-]{0,127}")
# ZFS user property names allow little more; same rule on btrfs so a pool can
# move between drivers.
_META_KEY = re.compile(r"[a-z0-9_-]{1,200}")


def check_name(field: str, value: str) -> None:
    """InvalidArgument(field) unless `value` is a usable volume/snapshot name."""
    if not _NAME.fullmatch(value):
        raise InvalidArgument(field, f"{value!r} must match {_NAME.pattern}")


def check_meta(meta: Mapping[str, str]) -> None:
    """InvalidArgument unless every key is [a-z0-9_-]+ and every value a str."""
    for key, value in meta.items():
        if not _META_KEY.fullmatch(key):
            raise InvalidArgument("meta", f"key {key!r} must match {_META_KEY.pattern}")
        if not isinstance(value, str):
            raise InvalidArgument(key, f"value must be a string, not {type(value).__name__}")
