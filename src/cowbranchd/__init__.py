"""cowbranchd: sub-second, production-shaped PostgreSQL branches on ZFS or
btrfs, served over gRPC.

The client library is re-exported here (`from cowbranchd import Client`) and
loaded lazily, so the daemon never imports client code it does not use.
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING, Any

# grpc's fork handlers crash children forked while RPC threads are busy (the
# daemon forks every postgres from an RPC thread; a test suite may fork too).
# Nothing here uses grpc in a forked child, so they are turned off before
# grpc is first imported.
os.environ.setdefault("GRPC_ENABLE_FORK_SUPPORT", "false")

if TYPE_CHECKING:
    from .client import AsyncClient, Base, BaseVersion, Branch, Client

__version__ = "0.1.0"

__all__ = ["AsyncClient", "Base", "BaseVersion", "Branch", "Client", "__version__"]

_CLIENT_NAMES = frozenset({"AsyncClient", "Base", "BaseVersion", "Branch", "Client"})


def __getattr__(name: str) -> Any:
    if name in _CLIENT_NAMES:
        from . import client  # noqa: PLC0415 (lazy on purpose)

        return getattr(client, name)
    raise AttributeError(f"module 'cowbranchd' has no attribute {name!r}")
