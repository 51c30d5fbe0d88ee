"""btrfs subvolume primitives (one ioctl through libbtrfsutil's Python
bindings when they import, else one `btrfs` command) and simple quotas, turned
on once per pool when a branch limit asks for them. Mixins of BtrfsDriver
(btrfs.py), which owns the root and decides `use_library`; nothing here knows
the pool layout.
"""

from __future__ import annotations

import importlib
import shutil
import stat
import threading
import time
from pathlib import Path
from types import ModuleType

import structlog

from cowbranchd.run import run

from .btrfs_io import enable_simple_quotas, quota_mode

__all__ = ["SimpleQuotas", "Subvolumes", "btrfsutil"]

log = structlog.get_logger("cowbranchd.storage")

_SUBVOLUME_INO = 256  # BTRFS_FIRST_FREE_OBJECTID: the root inode of every subvolume


def _optional(module: str) -> ModuleType | None:
    try:
        return importlib.import_module(module)
    except ImportError:
        return None


btrfsutil = _optional("btrfsutil")


class Subvolumes:
    """Create, snapshot, delete and recognise subvolumes."""

    use_library: bool

    def _create_subvolume(self, path: Path) -> None:
        if self.use_library:
            assert btrfsutil is not None
            btrfsutil.create_subvolume(str(path))
        else:
            run(["btrfs", "subvolume", "create", str(path)])

    def _snapshot(self, src: Path, dst: Path, *, read_only: bool) -> None:
        if self.use_library:
            assert btrfsutil is not None
            btrfsutil.create_snapshot(str(src), str(dst), read_only=read_only)
        else:
            flags = ["-r"] if read_only else []
            run(["btrfs", "subvolume", "snapshot", *flags, str(src), str(dst)])

    def _delete_subvolume(self, path: Path) -> None:
        if self.use_library:
            assert btrfsutil is not None
            btrfsutil.delete_subvolume(str(path))
        else:
            run(["btrfs", "subvolume", "delete", str(path)])

    @staticmethod
    def _is_subvolume(path: Path) -> bool:
        # What libbtrfsutil's is_subvolume does, without a spawn on the command path.
        try:
            st = path.lstat()
        except FileNotFoundError:
            return False
        return stat.S_ISDIR(st.st_mode) and st.st_ino == _SUBVOLUME_INO

    def _remove_tree(self, path: Path) -> None:
        """Delete a trashed or staged entry, whatever it turned out to be."""
        if self._is_subvolume(path):
            self._delete_subvolume(path)
        elif path.is_dir() and not path.is_symlink():
            shutil.rmtree(path)
        else:
            path.unlink(missing_ok=True)


class SimpleQuotas:
    """Per-subvolume limits by btrfs simple quotas (never classic qgroups)."""

    root: Path
    _squota: bool | None
    _squota_lock: threading.Lock

    @property
    def limits_bytes(self) -> bool:
        """Simple quotas are on, or can be turned on (asked once; turning
        them on changes the filesystem, so only callers with a limit ask)."""
        return self._quotas_on()

    def _quotas_on(self) -> bool:
        with self._squota_lock:
            if self._squota is None:
                self._squota = self._enable_squota()
            return self._squota

    def _enable_squota(self) -> bool:
        try:
            mode = quota_mode(self.root)
            if mode == "disabled":
                started = time.perf_counter()
                enable_simple_quotas(self.root)
                log.warning(
                    "btrfs_simple_quotas_enabled",
                    pool=str(self.root),
                    ms=round((time.perf_counter() - started) * 1000, 1),
                )
                mode = quota_mode(self.root)
        except OSError as exc:
            log.warning("btrfs_simple_quotas_unavailable", pool=str(self.root), error=str(exc))
            return False
        if mode != "squota":
            # Classic qgroups (someone else's choice) slow down with every
            # snapshot and charge clones for shared data: never used here.
            log.warning("btrfs_simple_quotas_unavailable", pool=str(self.root), quota_mode=mode)
        return mode == "squota"
