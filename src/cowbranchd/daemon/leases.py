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
"""

from __future__ import annotations

import secrets
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from datetime import timedelta

import structlog

from cowbranchd.errors import CowbranchError, ResourceExhausted, Unavailable
from cowbranchd.model import BranchRecord, parse_name

from .auth import Caller
from .branches import Branches
from .inventory import BranchEntry

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
        log.info("lease_opened", lease=lease.lease_id, caller=caller.name, holder=lease.holder)
        return lease

    def hold(self, lease: Lease, names: Iterable[str]) -> None:
        """Put branches in the lease: all of them, or none when one is unknown
        or not the caller's (PERMISSION_DENIED)."""
        entries = [
            self.branches.get(parse_name("hold", name, "branches"), lease.caller) for name in names
        ]
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

    def keep(self, lease: Lease, names: Iterable[str]) -> None:
        """Let go of branches without deleting them; unknown names are ignored."""
        ids = [parse_name("keep", name, "branches") for name in names]
        with self._lock:
            for branch_id in ids:
                lease.held.pop(branch_id, None)

    def held_count(self, lease: Lease) -> int:
        with self._lock:
            return len(lease.held)

    def close(self, lease: Lease) -> list[str]:
        """The clean end: delete what the lease still holds, now."""
        with self._lock:
            self._live.pop(lease.lease_id, None)
        deleted = self._delete_held(lease)
        log.info("lease_closed", lease=lease.lease_id, deleted=deleted)
        return deleted

    def broke(self, lease: Lease) -> None:
        """The stream ended without a close: delete what it holds after the
        grace. Not while the daemon drains: its own shutdown broke it."""
        with self._lock:
            if self._live.pop(lease.lease_id, None) is None:
                return  # closed cleanly already
            if self._stopping or not lease.held:
                return
            lease.broken_at = time.monotonic()
            self._broken[lease.lease_id] = lease
            self._lock.notify_all()
        log.warning(
            "lease_broken",
            lease=lease.lease_id,
            caller=lease.caller.name,
            holder=lease.holder,
            held=sorted(lease.held),
            grace_s=self.grace,
        )

    def stop(self) -> None:
        """Draining: end every lease's stream, delete nothing."""
        with self._lock:
            self._stopping = True
            live = list(self._live.values())
            self._broken.clear()
            self._lock.notify_all()
        for lease in live:
            lease.cancel()

    @property
    def in_use(self) -> int:
        with self._lock:
            return len(self._live)

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
            for lease in due:
                deleted = self._delete_held(lease)
                log.info("lease_expired", lease=lease.lease_id, deleted=deleted)

    def _delete_held(self, lease: Lease) -> list[str]:
        """Delete the lease's branches, except protected ones and those a
        live lease holds (the same client, reconnected)."""
        with self._lock:
            held = list(lease.held.values())
            lease.held.clear()
            elsewhere = {
                id(entry) for other in self._live.values() for entry in other.held.values()
            }
        deleted = []
        for entry in held:
            if id(entry) in elsewhere:
                continue

            def protected(record: BranchRecord) -> bool:
                return record.protected

            try:
                if self.branches.delete_entry(entry, unless=protected):
                    deleted.append(f"branches/{entry.branch_id}")
            except CowbranchError as exc:  # the TTL is still the backstop
                log.error(
                    "lease_delete_failed",
                    lease=lease.lease_id,
                    branch=entry.branch_id,
                    error=exc.message,
                )
        return deleted
