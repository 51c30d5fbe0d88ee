"""A throw-away btrfs pool on a plain file: a loop device, formatted and
mounted. The daemon's quickstart pool when no disk is configured (see
`pool.open_driver`); the test fixtures and the benchmark use it too.

Everything here is undoable and idempotent: `make_btrfs_loop_pool` reuses a
mount, loop device or filesystem already there, and `LoopPool.release()`
unmounts and detaches the image's loop devices (also when an earlier run set
them up). zfs-fuse pools, used only by tests and the benchmark, live in
tests/zfs_fuse.py.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import structlog

from cowbranchd.run import run

__all__ = ["LoopPool", "make_btrfs_loop_pool", "mounted_source"]

log = structlog.get_logger("cowbranchd.storage")


def mounted_source(mountpoint: Path) -> str | None:
    """The device mounted at `mountpoint` (topmost mount), or None."""
    target = str(mountpoint.resolve())
    found: str | None = None
    with open("/proc/self/mountinfo", encoding="utf-8") as fh:
        for line in fh:
            fields = line.split()
            # mountinfo escapes spaces as \040; our paths never contain them.
            sep = fields.index("-")
            if fields[4] == target:
                found = fields[sep + 2]
    return found


def _loop_devices_of(image: Path) -> list[str]:
    out = run(["losetup", "-j", str(image), "-O", "NAME", "-n"]).stdout
    return [line.strip() for line in out.splitlines() if line.strip()]


@dataclass
class LoopPool:
    """A btrfs filesystem on a loop device backed by `image`, mounted at `mountpoint`."""

    image: Path
    mountpoint: Path
    device: str

    def release(self) -> None:
        """Unmount and detach the loop device. Calling it twice is fine."""
        mounted = mounted_source(self.mountpoint) is not None
        # Lazy unmount as a last resort: a test that failed with an open file
        # must not leave the mount (and so the loop device) behind.
        if mounted and run(["umount", str(self.mountpoint)], check=False).returncode != 0:
            run(["umount", "-l", str(self.mountpoint)])
        for device in _loop_devices_of(self.image):
            run(["losetup", "-d", device], check=False)
        log.debug("loop pool released", image=str(self.image), mountpoint=str(self.mountpoint))


def make_btrfs_loop_pool(image: Path, mountpoint: Path, size_bytes: int) -> LoopPool:
    """Mount a btrfs filesystem held in the file `image` at `mountpoint`.

    Reuses what exists: a mount already at `mountpoint`, a loop device already
    attached to `image`, btrfs already in `image`. btrfs needs ~110 MiB at least.
    """
    current = mounted_source(mountpoint)
    if current is not None:
        return LoopPool(image, mountpoint, current)
    image.parent.mkdir(parents=True, exist_ok=True)
    mountpoint.mkdir(parents=True, exist_ok=True)
    if not image.exists() or image.stat().st_size < size_bytes:
        with open(image, "ab") as fh:
            fh.truncate(size_bytes)
    existing = _loop_devices_of(image)
    if existing:
        device = existing[0]
    else:
        device = run(["losetup", "-f", "--show", str(image)]).stdout.strip()
    pool = LoopPool(image, mountpoint, device)
    try:
        fstype = run(["blkid", "-o", "value", "-s", "TYPE", device], check=False).stdout.strip()
        if fstype != "btrfs":
            run(["mkfs.btrfs", "-q", device])
        run(["mount", device, str(mountpoint)])
    except BaseException:
        pool.release()
        raise
    log.debug("loop pool ready", image=str(image), device=device, mountpoint=str(mountpoint))
    return pool
