"""Why a branch with a size limit (`max_bytes`) has to stop, if it must.

Where storage enforces the limit (ZFS `quota`, btrfs simple quotas) writes
beyond it fail with EDQUOT: postgres reports `could not extend file ...: Disk
quota exceeded` to the writer and goes on, unless the failed write was WAL,
which makes it PANIC; its postmaster may then exit. Where storage cannot (btrfs
without simple quotas, kernels before 6.7) nothing stops the writes, so the
branch is stopped once its written bytes pass its limit, before it eats into
the pool's reserve. Read-only: the caller (Branches.check_size_limits) stops
the branch and marks it FAILED under the branch's lock.
"""

from __future__ import annotations

import os

from cowbranchd.config import StorageConfig
from cowbranchd.errors import CowbranchError, InvalidArgument
from cowbranchd.storage.base import Kind

from .inventory import BranchEntry, Context

__all__ = ["QUOTA_MESSAGE", "size_limit", "size_limit_failure"]

QUOTA_MESSAGE = "Disk quota exceeded"  # strerror(EDQUOT), as postgres logs it
_LOG_TAIL_BYTES = 16 * 1024


def size_limit(storage: StorageConfig, asked: int) -> int:
    """The limit a create gets: `asked` (0: storage.max_branch_bytes) within
    the cap. With no limit configured, none may be asked for: a limit would
    turn on btrfs quotas, which is the operator's decision."""
    cap = storage.max_branch_bytes_cap or storage.max_branch_bytes
    if asked < 0:
        raise InvalidArgument("max_bytes", "must not be negative (0: the daemon's default)")
    if asked > cap:
        if not cap:
            raise InvalidArgument(
                "max_bytes",
                "size limits are off on this daemon (storage.max_branch_bytes and "
                "storage.max_branch_bytes_cap are 0)",
            )
        raise InvalidArgument(
            "max_bytes", f"{asked} is above the cap of {cap} bytes (storage.max_branch_bytes_cap)"
        )
    return asked or storage.max_branch_bytes


def _log_tail(ctx: Context, entry: BranchEntry) -> str:
    try:
        fd = os.open(ctx.log_path(entry.branch_id), os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except OSError:
        return ""
    with open(fd, "rb") as fh:
        size = os.fstat(fh.fileno()).st_size
        fh.seek(max(0, size - _LOG_TAIL_BYTES))
        return fh.read(_LOG_TAIL_BYTES).decode("utf-8", "replace")


def size_limit_failure(ctx: Context, entry: BranchEntry, *, enforced: bool) -> str:
    """The failure to record ("size limit: ...") when the branch hit its
    limit and cannot go on; "" when it can (or has no limit). `enforced`:
    storage holds the branch to its limit itself."""
    limit = entry.record.max_bytes
    if not limit:
        return ""
    master = entry.postmaster
    if enforced:
        if master is None or master.alive():
            return ""  # running: its writes fail, it answers queries
        tail = _log_tail(ctx, entry)
        lines = [line for line in tail.splitlines() if QUOTA_MESSAGE in line]
        if not lines:
            return ""  # died of something else: STOPPED, as any dead branch
        return f"size limit: postgres stopped at max_bytes={limit}: {lines[-1][-300:]}"
    try:
        written = ctx.driver.usage(Kind.BRANCHES, entry.volume)
    except CowbranchError:
        return ""
    if written <= limit:
        return ""
    return f"size limit: wrote {written} bytes, over max_bytes={limit}; stopped"
