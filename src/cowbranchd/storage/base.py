"""The narrow storage-driver interface every copy-on-write backend implements.

A pool holds *volumes* of two kinds, `bases` and `branches`, each a writable
filesystem (ZFS dataset, btrfs subvolume) whose mountpoint holds `pgdata/`,
plus read-only *snapshots* of volumes (`bases/shop@v3`, `branches/x@c-y`).
Every volume carries string metadata written atomically with its creation,
so `list()` can rebuild the whole inventory from storage alone.

Drivers know nothing of PostgreSQL, gRPC or branch states: `meta` is an opaque
str->str mapping to them. They may not start processes other than their own
filesystem tools, and must never delete a volume a caller did not name.
"""

from __future__ import annotations

import abc
import builtins
import enum
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar

__all__ = ["Kind", "PoolUsage", "SnapshotRef", "StorageDriver", "Volume"]


class Kind(enum.Enum):
    BASES = "bases"
    BRANCHES = "branches"


_REF = re.compile(r"(bases|branches)/([^@/]+)@([^@/]+)")


@dataclass(frozen=True, order=True)
class SnapshotRef:
    """A read-only snapshot `snap` of the volume `kind/name`."""

    kind: Kind
    name: str
    snap: str

    def __str__(self) -> str:
        return f"{self.kind.value}/{self.name}@{self.snap}"

    @classmethod
    def parse(cls, text: object) -> SnapshotRef | None:
        """`bases/shop@v3` -> SnapshotRef (the one reading of `str()`); None
        when empty or malformed."""
        if not isinstance(text, str):
            return None
        match = _REF.fullmatch(text)
        return cls(Kind(match[1]), match[2], match[3]) if match else None


@dataclass(frozen=True)
class Volume:
    """One volume as found on storage."""

    kind: Kind
    name: str
    path: Path  # mountpoint; PostgreSQL data lives in path / "pgdata"
    meta: Mapping[str, str]
    snapshots: tuple[str, ...] = ()  # snapshot names of this volume, e.g. ("v1", "v2")
    origin: SnapshotRef | None = None  # what it was cloned from, if known
    # Snapshots of this volume that other volumes were cloned from and still
    # depend on (ZFS); always empty on btrfs, whose snapshots are independent.
    busy_snapshots: tuple[str, ...] = field(default=())
    # Why its metadata could not be read ("" when it could; `meta` is then
    # empty). Such a volume is never taken for a leftover: the daemon keeps
    # it and reports it (a FAILED branch, a quarantined base).
    meta_error: str = ""


@dataclass(frozen=True)
class PoolUsage:
    used_bytes: int
    total_bytes: int


class StorageDriver(abc.ABC):
    """Snapshot/clone/destroy on one copy-on-write filesystem kind.

    Capability flags tell callers what the filesystem gives for free.
    """

    kind: ClassVar[str]
    # Clones keep their origin snapshot alive (ZFS): a snapshot with clones
    # cannot be destroyed, so callers defer its removal (see destroy/gc).
    clones_pin_snapshots: ClassVar[bool]

    @property
    @abc.abstractmethod
    def limits_bytes(self) -> bool:
        """Whether clone(max_bytes=...) can hold a volume to a size: ZFS
        always (`quota`); btrfs where simple quotas are, or can be turned, on.
        Asking may turn them on, so only callers with a limit to set ask."""

    @property
    @abc.abstractmethod
    def location(self) -> str:
        """The pool's root as configured: a directory (btrfs) or dataset (zfs)."""

    @abc.abstractmethod
    def check(self) -> None:
        """Raise StorageError unless the pool exists on the right filesystem
        and the tools/libraries are present; the message says what was found
        and what is needed."""

    @abc.abstractmethod
    def ensure_layout(self) -> None:
        """Create `bases/`, `branches/`, `.staging/`, `.trash/` if missing."""

    @abc.abstractmethod
    def create_volume(self, kind: Kind, name: str, meta: Mapping[str, str]) -> Path:
        """Create an empty writable volume with `meta`; return its mountpoint.

        Raise AlreadyExists if it exists. The volume is listed from the moment
        it exists, with `meta` already on it (callers write state=creating).
        """

    @abc.abstractmethod
    def snapshot(self, kind: Kind, name: str, snap: str) -> SnapshotRef:
        """Take a read-only, crash-consistent snapshot `snap` of a volume.

        NotFound if the volume is missing, AlreadyExists if `snap` exists."""

    @abc.abstractmethod
    def clone(
        self,
        source: SnapshotRef,
        kind: Kind,
        name: str,
        meta: Mapping[str, str],
        *,
        max_bytes: int = 0,
    ) -> Path:
        """Make a writable clone of `source` as `kind/name` with `meta`,
        limited (max_bytes > 0, where `limits_bytes`) to that many bytes of
        its own writes: what it shares with `source` is not counted, and a
        write beyond the limit fails with EDQUOT (a full clone, not a full pool).

        Atomic: on return the clone is in place with its metadata; after a
        crash mid-way it is absent, only under `.staging/`, or (btrfs, made in
        place) in place still holding its source's metadata, which names the
        source: all of them leftovers gc() removes and list() skips. Its
        metadata may become durable only with the next set_meta: a clone found
        after a crash with no readable metadata of its own is such a leftover. AlreadyExists if
        `kind/name` exists, NotFound if `source` does not. Returns the clone's
        mountpoint."""

    @abc.abstractmethod
    def set_meta(
        self, kind: Kind, name: str, meta: Mapping[str, str], *, durable: bool = True
    ) -> None:
        """Merge `meta` into a volume's metadata (a value of "" removes the
        key), durably. NotFound if the volume is missing. With `durable`
        False, visible at once but durable only at the filesystem's next
        commit, where the driver can save the wait: for a caller that made
        the change durable elsewhere (the warm hand-over's record)."""

    @abc.abstractmethod
    def destroy(self, kind: Kind, name: str) -> None:
        """Remove a volume and its snapshots. Missing is success.

        Moves it into `.trash/` first, then destroys it. A snapshot another
        volume was cloned from outlives it (it is that clone's reset source):
        on ZFS the volume stays hidden until gc() finds it free; on btrfs the
        snapshot alone stays, until destroy_snapshot() or gc() once no volume
        names it as origin. Never called under a live postmaster: the caller
        stops postgres first (btrfs would not refuse)."""

    @abc.abstractmethod
    def destroy_snapshot(self, ref: SnapshotRef) -> bool:
        """Remove one snapshot. Missing is success (True). Returns False and
        keeps it when clones still depend on it."""

    @abc.abstractmethod
    def list(self) -> list[Volume]:
        """Every volume under `bases/` and `branches/`, from storage alone.

        Excludes `.staging/` and `.trash/`."""

    @abc.abstractmethod
    def usage(self, kind: Kind, name: str) -> int:
        """Bytes a volume holds that its origin does not (written bytes) —
        an estimate is fine where the filesystem cannot tell exactly."""

    @abc.abstractmethod
    def pool_usage(self) -> PoolUsage:
        """Used and total bytes of the pool's filesystem."""

    def free_bytes(self) -> int:
        """Bytes new data may still take, asked at every create (admission):
        drivers answer from one statvfs where they can, without a command."""
        usage = self.pool_usage()
        return usage.total_bytes - usage.used_bytes

    @abc.abstractmethod
    # builtins.list: inside the class body `list` names the method above.
    def gc(self) -> builtins.list[str]:
        """Remove leftovers: everything in `.staging/`, everything in
        `.trash/` that nothing depends on any more. Return what was removed."""
