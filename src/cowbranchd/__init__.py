"""cowbranchd: sub-second PostgreSQL branches on ZFS or btrfs, over gRPC."""

from __future__ import annotations

__version__ = "0.1.0"
