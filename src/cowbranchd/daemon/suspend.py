"""Idle suspend and transparent resume: a READY branch with no client
connection for its `idle_suspend` has its postgres stopped (fast shutdown: a
clean data directory) and becomes SUSPENDED, keeping its port, uid, password
and data; the daemon's acceptor (acceptor.py) listens on that port, and the
first connection to the unchanged DSN starts postgres there again and is
relayed to it, as is every connection that comes while it starts (the
acceptor keeps them from a closed port); later ones reach postgres directly.

Idle means: at every reaper pass for `idle_suspend`, the postmaster had no
child but its background processes, and its children's CPU time did not grow
(a connection opened and closed between two passes shows there). Read from
/proc, one postmaster at a time: no connection to postgres.

A mixin of `Branches`, between it and `BranchChanges`. No gRPC.
"""

from __future__ import annotations

import time
from pathlib import Path

import structlog

from cowbranchd import deadline
from cowbranchd.errors import CowbranchError
from cowbranchd.model import BranchRecord, State
from cowbranchd.ports import bind_addresses

from .acceptor import Waking
from .changes import BranchChanges
from .inventory import BranchEntry
from .lifecycle import start_postmaster, stop_postmaster

__all__ = ["BranchSuspend", "client_activity"]

log = structlog.get_logger("cowbranchd.branches")

# Process titles of a postmaster's own background processes (PostgreSQL
# 13-17): any other child is a client's backend or work done for one.
BACKGROUND_TITLES = (
    "checkpointer",
    "background writer",
    "walwriter",
    "autovacuum launcher",
    "logical replication launcher",
    "stats collector",
    "archiver",
    "io worker",
)


def client_activity(pid: int) -> tuple[int, int] | None:
    """(client processes, children's CPU ticks) of postmaster `pid`, or None
    if it is gone. Reads /proc/<pid>/task/<pid>/children and each child's
    cmdline (postgres sets its process title there), and /proc/<pid>/stat."""
    proc = Path("/proc") / str(pid)
    try:
        children = (proc / "task" / str(pid) / "children").read_text().split()
        fields = (proc / "stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return None
    # stat fields 16 and 17 (cutime, cstime): CPU of children already reaped.
    reaped_ticks = int(fields[13]) + int(fields[14])
    clients = 0
    for child in children:
        try:
            title = (Path("/proc") / child / "cmdline").read_bytes().decode(errors="replace")
        except OSError:
            continue  # exited meanwhile
        title = title.replace("\0", " ").removeprefix("postgres: ").strip()
        if not any(title.startswith(t) or f": {t}" in title for t in BACKGROUND_TITLES):
            clients += 1
    return clients, reaped_ticks


class BranchSuspend(BranchChanges):
    """Suspend (reaper) and resume (first connection, or the daemon's own need)."""

    _idle_since: dict[str, tuple[float, int]]

    def suspend_idle(self) -> list[str]:
        """Suspend the READY branches idle for their `idle_suspend`; called by
        the reaper. A branch whose lock is taken is looked at next time."""
        moment = time.monotonic()
        with self.ctx.inventory.lock:
            candidates = [
                e
                for e in self.ctx.inventory.branches.values()
                if e.record.idle_suspend
                and e.record.state is State.READY
                and e.settled.is_set()
                and e.error is None
                and not e.deleting
            ]
        seen = set()
        suspended = []
        for entry in candidates:
            branch_id = entry.branch_id
            master = entry.postmaster
            activity = client_activity(master.pid) if master is not None else None
            if activity is None:
                continue  # not running: STOPPED, nothing to suspend
            seen.add(branch_id)
            clients, ticks = activity
            since = self._idle_since.get(branch_id)
            if clients or since is None or since[1] != ticks:
                # Busy now, first seen, or a connection came and went since
                # the last pass: idle from now on at the earliest.
                self._idle_since[branch_id] = (moment, ticks)
                continue
            assert entry.record.idle_suspend is not None
            if moment - since[0] < entry.record.idle_suspend.total_seconds():
                continue
            if not entry.lock.acquire(blocking=False):
                continue
            try:
                if self._suspend(entry):
                    suspended.append(branch_id)
                    seen.discard(branch_id)
            finally:
                entry.lock.release()
        for gone in set(self._idle_since) - seen:
            del self._idle_since[gone]
        return suspended

    def _suspend(self, entry: BranchEntry) -> bool:
        """Stop the branch's postgres and listen on its port instead. Caller
        holds its lock. False if it is busy or changed since it was chosen."""
        with self.ctx.inventory.lock:
            current = self.ctx.inventory.branches.get(entry.branch_id) is entry
        master = entry.postmaster
        if not current or entry.deleting or entry.record.state is not State.READY:
            return False
        activity = client_activity(master.pid) if master is not None else None
        if activity is None or activity[0]:
            return False
        started = time.perf_counter()
        # Fast shutdown: a shutdown checkpoint, so the data directory is clean
        # (a child can be cloned from it without recovery, and it starts fast).
        stop_postmaster(self.ctx, entry)
        try:
            self._arm(entry)
            self._store(entry, entry.record.evolve(state=State.SUSPENDED))
        except CowbranchError as exc:
            # Its port was taken the moment postgres let go, or storage failed:
            # the branch goes on running rather than vanish from its DSN.
            self.ctx.acceptor.disarm(entry.branch_id)
            log.warning("suspend_failed", branch=entry.branch_id, error=exc.message)
            self._restart_or_fail(entry, "suspend failed")
            return False
        log.info(
            "branch_suspended",
            branch=entry.branch_id,
            port=entry.record.port,
            ms=round((time.perf_counter() - started) * 1000, 1),
        )
        return True

    def _arm(self, entry: BranchEntry) -> None:
        pg = self.ctx.config.postgres
        self.ctx.acceptor.arm(
            entry.branch_id,
            bind_addresses(pg.listen_addresses),
            entry.record.port,
            lambda clients: self._wake(entry, clients),
        )

    def rearm(self, entry: BranchEntry) -> bool:
        """At start-up, for a branch recorded SUSPENDED: listen on its port
        again. If that fails, start it (READY) or mark it FAILED; False then."""
        try:
            self._arm(entry)
        except CowbranchError as exc:
            log.warning("rearm_failed", branch=entry.branch_id, error=exc.message)
            self._restart_or_fail(entry, "resume at daemon start failed")
            return False
        return True

    def _restart_or_fail(self, entry: BranchEntry, why: str) -> None:
        try:
            start_postmaster(self.ctx, entry, allow_new_port=False)
            self._store(entry, entry.record.evolve(state=State.READY))
        except CowbranchError as exc:
            self._mark_failed(entry, f"{why}: {exc.message}")

    def _wake(self, entry: BranchEntry, waking: Waking) -> None:
        """The acceptor's callback, on a thread of its own: connections came
        to a suspended branch. The acceptor has let go of its port (and queues
        whatever else comes meanwhile): start postgres there and have them all
        relayed to it. What is not relayed, the acceptor closes."""
        started = time.perf_counter()
        resumed = False
        with entry.lock:
            with self.ctx.inventory.lock:
                current = self.ctx.inventory.branches.get(entry.branch_id) is entry
            if current and not entry.deleting and entry.record.state is State.SUSPENDED:
                try:
                    start_postmaster(self.ctx, entry, allow_new_port=False)
                except CowbranchError as exc:
                    log.error("resume_failed", branch=entry.branch_id, error=exc.message)
                    self._mark_failed(entry, f"resume failed: {exc.message}")
                    return
                resumed = True
            elif not (current and entry.postmaster and entry.postmaster.alive()):
                return  # deleted (or failed) while the clients waited
            suspended = entry.record
            if resumed:
                # READY for everyone at once; the metadata write follows
                # the relay, off the first query's path.
                entry.record = suspended.evolve(state=State.READY)
            relayed = waking.relay(self.ctx.config.postgres.host, entry.record.port)
            if resumed:
                self._store_resumed(entry, suspended)
        if resumed:
            ms = round((time.perf_counter() - started) * 1000, 1)
            log.info(
                "branch_resumed", branch=entry.branch_id, by="connection", ms=ms, relayed=relayed
            )

    def _store_resumed(self, entry: BranchEntry, before: BranchRecord | None = None) -> None:
        try:
            self._store(entry, entry.record.evolve(state=State.READY), before=before)
        except CowbranchError as exc:
            # Running all the same; a restart adopts the postmaster and fixes it.
            entry.record = entry.record.evolve(state=State.READY)
            log.error("resume_store_failed", branch=entry.branch_id, error=exc.message)

    def resume(self, entry: BranchEntry) -> bool:
        """Start a suspended branch now (before a reset, say); False if it
        was not suspended. On failure it stays suspended and the error rises."""
        with deadline.holding(entry.lock, f"branches/{entry.branch_id}"):
            if entry.record.state is not State.SUSPENDED:
                return False
            self.ctx.acceptor.disarm(entry.branch_id)
            try:
                start_postmaster(self.ctx, entry, allow_new_port=False)
            except CowbranchError:
                self._arm(entry)
                raise
            self._store_resumed(entry)
        log.info("branch_resumed", branch=entry.branch_id, by="daemon")
        return True
