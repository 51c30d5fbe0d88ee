"""The daemon's in-memory view of its bases and branches, and the context the
orchestration layers share (config, storage driver, port allocator).

The truth lives on storage (volume metadata) and in the process table
(postmaster.pid); this view is rebuilt from both at start-up by reconcile.py
and kept in step by bases.py and branches.py. Only quick dictionary work
happens under `Inventory.lock`; slow I/O happens under a per-entry lock.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from cowbranchd.config import Config
from cowbranchd.model import BaseRecord, BranchRecord
from cowbranchd.ports import PortAllocator, UidAllocator
from cowbranchd.postgres import Postmaster
from cowbranchd.storage.base import Kind, SnapshotRef, StorageDriver

from .acceptor import Acceptor
from .credentials import SecretKeeper
from .metrics import Metrics

__all__ = ["BaseEntry", "BranchEntry", "Context", "Inventory"]


@dataclass(eq=False)
class BaseEntry:
    record: BaseRecord
    path: Path
    lock: threading.Lock = field(default_factory=threading.Lock)


@dataclass(eq=False)
class BranchEntry:
    record: BranchRecord
    path: Path
    # Its storage volume's name: the branch id, except for a branch handed
    # out warm, which keeps the warm clone's volume (postgres holds the data
    # directory's absolute path, so a live clone cannot be renamed).
    volume: str = ""
    postmaster: Postmaster | None = None
    # Serialises slow operations on one branch (create, delete, reset).
    lock: threading.RLock = field(default_factory=threading.RLock)
    # Set once creation has ended, successfully or not; waiters for the same
    # request_id block on it instead of creating twice.
    settled: threading.Event = field(default_factory=threading.Event)
    error: BaseException | None = None
    deleting: bool = False
    # When its create finished after the caller had gone (cancelled, timed
    # out, died): kept for a retry with its request_id, reaped after a grace.
    unclaimed_since: float | None = None

    def __post_init__(self) -> None:
        self.volume = self.volume or self.record.branch_id

    @property
    def branch_id(self) -> str:
        return self.record.branch_id

    @property
    def pgdata(self) -> Path:
        return self.path / "pgdata"

    @property
    def source(self) -> SnapshotRef | None:
        return SnapshotRef.parse(self.record.source_snapshot)

    @property
    def owns_source(self) -> bool:
        """Whether its source snapshot exists for it alone and goes with it:
        the `c-<branch>` snapshot of a parent branch. A base version's and a
        frozen branch's snapshot are shared by all their children."""
        source = self.source
        return source is not None and source.kind is Kind.BRANCHES and source.snap == (
            f"c-{self.branch_id}"
        )

    @property
    def frozen_source(self) -> SnapshotRef | None:
        """The snapshot every child of this frozen branch clones (freeze.py); None
        if it is not frozen."""
        if not self.record.frozen:
            return None
        return SnapshotRef(Kind.BRANCHES, self.volume, self.record.frozen)


class Inventory:
    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.bases: dict[str, BaseEntry] = {}
        self.branches: dict[str, BranchEntry] = {}
        # Bases whose metadata could not be read, with why: kept on storage
        # untouched (never destroyed, never branched), reported by GetStatus.
        self.quarantined: dict[str, str] = {}

    def by_request_id(self, request_id: str, owner: str) -> BranchEntry | None:
        """The branch `owner` created with `request_id` (keys are per owner:
        two tenants choosing the same key get two branches). Caller holds `lock`."""
        if not request_id:
            return None
        for entry in self.branches.values():
            record = entry.record
            if record.request_id == request_id and (record.owner or "admin") == owner:
                return entry
        return None

    def children_of(self, kind: Kind, name: str) -> Iterator[BranchEntry]:
        """Branches cloned directly from a snapshot of volume `kind/name`.
        Caller holds `lock`."""
        for entry in self.branches.values():
            source = entry.source
            if source is not None and source.kind is kind and source.name == name:
                yield entry

    def descendants_of_base(self, base_id: str) -> list[BranchEntry]:
        """Every branch that depends on the base, children before their parents'
        deletion order reversed: deleting in the returned order is safe."""
        with self.lock:
            found: list[BranchEntry] = []
            frontier = list(self.children_of(Kind.BASES, base_id))
            while frontier:
                entry = frontier.pop()
                found.append(entry)
                frontier.extend(self.children_of(Kind.BRANCHES, entry.volume))
        return list(reversed(found))


@dataclass(frozen=True)
class Context:
    config: Config
    driver: StorageDriver
    ports: PortAllocator
    inventory: Inventory
    # Branch uids when every branch runs as its own OS user on an idmapped
    # mount of its clone; None: all run as config.postgres.os_user.
    uids: UidAllocator | None = None
    # Events the orchestration records (latencies, size-limit stops).
    metrics: Metrics = field(default_factory=Metrics, repr=False)
    # Listens on the ports of suspended branches and wakes them (suspend.py).
    acceptor: Acceptor = field(default_factory=Acceptor, repr=False)
    # Made from config.daemon.state_dir: the daemon key every password derives from.
    secrets: SecretKeeper = field(init=False, repr=False)

    def __post_init__(self) -> None:
        keeper = SecretKeeper(self.config.daemon.state_dir / "keys" / "daemon.key")
        object.__setattr__(self, "secrets", keeper)

    def base_password(self, record: BaseRecord) -> str:
        """The base superuser's password: derived (bases made before passwords
        were derived carry theirs in metadata, and keep it)."""
        return record.password or self.secrets.base_password(record.base_id, record.create_time)

    @property
    def isolation(self) -> str:
        """`uid` (one OS user per branch) or `shared` (one for all)."""
        return "uid" if self.uids is not None else "shared"

    @property
    def mount_root(self) -> Path:
        """Where each isolated branch's data directory is presented to its uid."""
        return self.config.daemon.state_dir / "mnt"

    def run_dir(self, entry: BranchEntry) -> Path:
        """The data directory its postmaster runs on: the idmapped mount of the
        clone's pgdata when the branch has a uid of its own, else pgdata."""
        if entry.record.uid:
            return self.mount_root / entry.volume
        return entry.pgdata

    @property
    def log_dir(self) -> Path:
        """Postgres logs: root's, 0700 (a log may hold another tenant's statements)."""
        return self.config.daemon.state_dir / "logs"

    def socket_dir(self, branch_id: str) -> Path:
        return self.config.postgres.socket_root / branch_id

    def log_path(self, branch_id: str) -> Path:
        return self.log_dir / f"{branch_id}.log"
