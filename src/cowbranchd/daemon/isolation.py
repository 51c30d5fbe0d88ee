"""How branches are kept apart on this host, decided once at start-up: one OS
user per branch (idmapped mounts, `postgres.branch_uids`) where the pool can,
else the shared os_user, said loudly. No I/O but the one probe.
"""

from __future__ import annotations

from pathlib import Path

import structlog

from cowbranchd.config import Config
from cowbranchd.errors import CowbranchError
from cowbranchd.ports import UidAllocator
from cowbranchd.run import run
from cowbranchd.storage import idmap
from cowbranchd.storage.base import StorageDriver

__all__ = ["SHARED_UID_WARNING", "branch_uids", "pool_directory"]

log = structlog.get_logger("cowbranchd.server")

SHARED_UID_WARNING = (
    "isolation is shared-uid: every branch's postgres runs as the same OS user, so a "
    "tenant's superuser can read and signal other branches ({why})"
)


def pool_directory(driver: StorageDriver) -> Path:
    """A directory on the pool's filesystem, to probe what it can do."""
    if driver.kind == "btrfs":
        return Path(driver.location)
    out = run(["zfs", "get", "-H", "-o", "value", "mountpoint", driver.location], timeout=60)
    return Path(out.stdout.strip())


def branch_uids(config: Config, driver: StorageDriver) -> UidAllocator | None:
    """One OS user per branch where configured and the pool can idmap;
    otherwise the shared os_user, said loudly (log, GetStatus, ctl status)."""
    uids = config.postgres.branch_uids
    if uids is None:
        log.warning(
            "isolation",
            mode="shared",
            message=SHARED_UID_WARNING.format(why="postgres.branch_uids is empty"),
        )
        return None
    try:
        supported = idmap.supports_idmap(pool_directory(driver))
    except CowbranchError as exc:
        supported = False
        log.warning("idmap_probe_failed", error=exc.message)
    if not supported:
        log.warning(
            "isolation",
            mode="shared",
            message=SHARED_UID_WARNING.format(
                why=f"the {driver.kind} pool cannot do idmapped mounts"
            ),
        )
        return None
    log.info("isolation", mode="uid", branch_uids=f"{uids[0]}-{uids[1]}")
    return UidAllocator(*uids)
