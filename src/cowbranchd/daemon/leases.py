"""Leases: branches tied to the life of a client process's stream.

A client keeps one Lease stream open while it runs and names the branches
the lease holds. When the stream breaks without a clean close (the process
was killed, its runner went away), the branches still held are deleted once
`daemon.lease_grace` has passed, unless the client asked to keep them, they
are protected, or another live lease holds them by then (a client that
reconnected). A clean close deletes them at once, with the same exceptions.

Leases live in memory only: a daemon restart ends them without deleting
anything (the clients hold their branches again on their next call; TTLs are
the backstop), and so does draining.

Each lease occupies one worker thread of the gRPC server for its whole life,
so their number is capped (`daemon.max_leases`) and the server's pool is
sized for that many more threads: leases never take the threads of other
calls. This module does not speak gRPC.

Metrics: a broken lease, and what its grace's end deleted or spared, are
counted as they happen; open leases and the branches they hold are read by
each scrape from copies published under the lock at every change, so a
scrape never takes the lock.
"""

from __future__ import annotations

import secrets
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from datetime import timedelta

import structlog

from cowbranchd.errors import CowbranchError, FailedPrecondition, ResourceExhausted, Unavailable
from cowbranchd.model import BranchRecord, parse_name

from .auth import Caller
from .branches import Branches
from .inventory import BranchEntry
from .metrics import LeaseCensus, LeaseEnd

__all__ = ["Lease", "Leases"]

log = structlog.get_logger("cowbranchd.leases")

MAX_HOLDER_CHARS = 200
MAX_HELD = 10000  # per lease: a runaway client cannot grow the daemon's memory without bound


@dataclass(eq=False)
class Lease:
    """One client's lease: what it holds, what it keeps, and how to end its stream."""

    lease_id: str
    caller: Caller
    holder: str
    cancel: Callable[[], object]
    # branch id -> the entry checked when it was put in the lease: a branch
    # deleted and made again under the same id is another entry, never touched.
    held: dict[str, BranchEntry] = field(default_factory=dict)
    # The same for branches let go of with keep: what a broken lease reports
    # it spared (at most MAX_HELD).
    kept: dict[str, BranchEntry] = field(default_factory=dict)
    # `held` as of the last change, for scrapes (see Leases._publish).
    held_view: tuple[BranchEntry, ...] = ()
    broken_at: float | None = None

    @property
    def name(self) -> str:
        return f"leases/{self.lease_id}"


class Leases:
    def __init__(self, branches: Branches, grace: timedelta, limit: int) -> None:
        self.branches = branches
        self.grace = grace.total_seconds()
        self.limit = limit
        self._lock = threading.Condition()
        self._live: dict[str, Lease] = {}
        self._broken: dict[str, Lease] = {}
        self._stopping = False
        # (live leases, broken ones) as of the last change, for scrapes.
        self._published: tuple[tuple[Lease, ...], tuple[Lease, ...]] = ((), ())
        branches.ctx.metrics.watch_leases(self.census)

    def start(self) -> None:
        threading.Thread(target=self._run, name="lease-reaper", daemon=True).start()

    # -- the stream's life ----------------------------------------------------------

    def open(self, caller: Caller, holder: str, cancel: Callable[[], object]) -> Lease:
        """A new lease for `caller`; RESOURCE_EXHAUSTED at `daemon.max_leases`."""
        lease = Lease(
            lease_id="ls-" + secrets.token_hex(6),
            caller=caller,
            holder=holder[:MAX_HOLDER_CHARS],
            cancel=cancel,
        )
        with self._lock:
            if self._stopping:
                raise Unavailable("cowbranchd is shutting down; open the lease again after it")
            if len(self._live) >= self.limit:
                raise ResourceExhausted(
                    f"all {self.limit} leases are in use (daemon.max_leases): each holds a "
                    "worker thread; close unused clients or raise the limit"
                )
            self._live[lease.lease_id] = lease
            self._publish()
        log.info("lease_opened", lease=lease.lease_id, caller=caller.name, holder=lease.holder)
        return lease

    def find(self, name: str, caller: Caller) -> Lease:
        """The caller's open lease `leases/{id}` (CreateBranchRequest.lease);
        FAILED_PRECONDITION when it is unknown, ended or another caller's."""
        lease_id = parse_name("lease", name, "leases")
        with self._lock:
            lease = self._live.get(lease_id)
        if lease is None or lease.caller.name != caller.name:
            raise FailedPrecondition(
                f"lease {name} is not open for this caller (ended, unknown, or another "
                "caller's): open a Lease stream and use the name it answers with"
            )
        return lease

    def hold(self, lease: Lease, names: Iterable[str]) -> None:
        """Put branches in the lease: all of them, or none when one is unknown
        or not the caller's (PERMISSION_DENIED)."""
        entries = [
            self.branches.get(parse_name("hold", name, "branches"), lease.caller) for name in names
        ]
        self.hold_entries(lease, entries)

    def hold_entries(self, lease: Lease, entries: list[BranchEntry]) -> None:
        """Put branches the caller may act on in the lease (RESOURCE_EXHAUSTED past MAX_HELD)."""
        inv = self.branches.ctx.inventory
        with self._lock:
            if len(lease.held) + len(entries) > MAX_HELD:
                # Clients need not say when they deleted a branch themselves:
                # forget those first.
                with inv.lock:
                    gone = [b for b, e in lease.held.items() if inv.branches.get(b) is not e]
                for branch_id in gone:
                    del lease.held[branch_id]
            if len(lease.held) + len(entries) > MAX_HELD:
                raise ResourceExhausted(
                    f"a lease holds at most {MAX_HELD} branches; keep or delete some first"
                )
            for entry in entries:
                lease.held[entry.branch_id] = entry
                lease.kept.pop(entry.branch_id, None)
            self._publish(lease)

    def keep(self, lease: Lease, names: Iterable[str]) -> None:
        """Let go of branches without deleting them; unknown names are ignored."""
        ids = [parse_name("keep", name, "branches") for name in names]
        with self._lock:
            if len(lease.kept) >= MAX_HELD:
                lease.kept = {b: e for b, e in lease.kept.items() if not e.deleting}
            for branch_id in ids:
                entry = lease.held.pop(branch_id, None)
                # Past MAX_HELD a keep still works; only the spared count misses it.
                if entry is not None and len(lease.kept) < MAX_HELD:
                    lease.kept[branch_id] = entry
            self._publish(lease)

    def held_count(self, lease: Lease) -> int:
        with self._lock:
            return len(lease.held)

    def close(self, lease: Lease) -> list[str]:
        """The clean end: delete what the lease still holds, now."""
        with self._lock:
            self._live.pop(lease.lease_id, None)
            self._publish()
        deleted, _ = self._delete_held(lease)
        log.info("lease_closed", lease=lease.lease_id, deleted=deleted)
        return deleted

    def broke(self, lease: Lease) -> None:
        """The stream ended without a close: delete what it holds after the
        grace. Not while the daemon drains: its own shutdown broke it."""
        with self._lock:
            if self._live.pop(lease.lease_id, None) is None:
                return  # closed cleanly already
            draining = self._stopping
            held = sorted(lease.held)
            if not draining and (held or lease.kept):
                lease.broken_at = time.monotonic()
                self._broken[lease.lease_id] = lease
                self._lock.notify_all()
            self._publish()
        if draining:
            return
        self.branches.ctx.metrics.lease_broken()
        if held:
            log.warning(
                "lease_broken",
                lease=lease.lease_id,
                caller=lease.caller.name,
                holder=lease.holder,
                held=held,
                grace_s=self.grace,
            )

    def stop(self) -> None:
        """Draining: end every lease's stream, delete nothing."""
        with self._lock:
            self._stopping = True
            live = list(self._live.values())
            self._broken.clear()
            self._lock.notify_all()
            self._publish()
        for lease in live:
            lease.cancel()

    @property
    def in_use(self) -> int:
        with self._lock:
            return len(self._live)

    def census(self) -> LeaseCensus:
        """Open leases and the live branches they hold, for a scrape: read from
        what `_publish` made, without the lock."""
        live, broken = self._published
        held_open = {id(e) for lease in live for e in lease.held_view if not e.deleting}
        held_broken = {id(e) for lease in broken for e in lease.held_view if not e.deleting}
        return LeaseCensus(
            open=len(live),
            slots=self.limit,
            held_open=len(held_open),
            held_broken=len(held_broken - held_open),
        )

    def _publish(self, *changed: Lease) -> None:
        """Copy what a scrape reads after a change; the caller holds the lock.
        Replacing whole tuples lets a scrape read them while they change."""
        for lease in changed:
            lease.held_view = tuple(lease.held.values())
        self._published = (tuple(self._live.values()), tuple(self._broken.values()))

    # -- deleting -------------------------------------------------------------------

    def _run(self) -> None:
        while True:
            with self._lock:
                due: list[Lease] = []
                while not due and not self._stopping:
                    now = time.monotonic()
                    due = [
                        lease
                        for lease in self._broken.values()
                        if lease.broken_at is not None and lease.broken_at + self.grace <= now
                    ]
                    if not due:
                        waits = [
                            lease.broken_at + self.grace - now
                            for lease in self._broken.values()
                            if lease.broken_at is not None
                        ]
                        self._lock.wait(min(waits, default=None))
                if self._stopping:
                    return
                for lease in due:
                    self._broken.pop(lease.lease_id, None)
                self._publish()
            for lease in due:
                deleted, end = self._delete_held(lease)
                self.branches.ctx.metrics.lease_ended(end)
                log.info(
                    "lease_expired",
                    lease=lease.lease_id,
                    deleted=deleted,
                    kept=end.kept,
                    protected=end.protected,
                    held_elsewhere=end.held_elsewhere,
                )

    def _delete_held(self, lease: Lease) -> tuple[list[str], LeaseEnd]:
        """Delete the lease's branches, except protected ones and those a
        live lease holds (the same client, reconnected); what was deleted and
        what spared."""
        with self._lock:
            held = list(lease.held.values())
            kept = [e for e in lease.kept.values() if not e.deleting]
            lease.held.clear()
            lease.kept.clear()
            self._publish(lease)
            elsewhere = {
                id(entry) for other in self._live.values() for entry in other.held.values()
            }
        deleted = []
        protected = held_elsewhere = 0
        for entry in held:
            if id(entry) in elsewhere:
                held_elsewhere += 1
                continue
            check = _UnlessProtected()
            try:
                if self.branches.delete_entry(entry, unless=check):
                    deleted.append(f"branches/{entry.branch_id}")
                elif check.spared:
                    protected += 1
            except CowbranchError as exc:  # the TTL is still the backstop
                log.error(
                    "lease_delete_failed",
                    lease=lease.lease_id,
                    branch=entry.branch_id,
                    error=exc.message,
                )
        end = LeaseEnd(
            deleted=len(deleted),
            kept=len(kept),
            protected=protected,
            held_elsewhere=held_elsewhere,
        )
        return deleted, end


class _UnlessProtected:
    """The `unless` of a lease's delete: spares a protected branch, and says
    whether it did (False too when the branch was gone already)."""

    def __init__(self) -> None:
        self.spared = False

    def __call__(self, record: BranchRecord) -> bool:
        self.spared = record.protected
        return record.protected
