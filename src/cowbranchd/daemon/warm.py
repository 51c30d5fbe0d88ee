"""Warm branches: clones of each hot parent whose postgres is already
running, handed out by CreateBranch under the requested id. Hot parents are
every base's latest version, and every frozen branch (a template, freeze.py)
asked for a child in the last HOT_WINDOW seconds or frozen that recently
(the `daemon.warm_templates` most recent of them).

PostgreSQL's own start is about half of a cold create. With
`daemon.warm_branches = N`, a background thread keeps N such clones per base;
a create from that base version with no per-branch settings takes one: the
branch keeps the clone's volume (`branches/warm_<hex>`; postgres holds its
data directory's absolute path, so a live clone is never renamed), its socket
directory and log take the branch's name, its own password is set and
`SELECT 1` answered over the daemon's socket connection to the clone, opened
when the clone started and kept (so no backend starts on the request's
path), and the branch's metadata (with its id) is written over the clone's:
no clone and no postgres start on the request's path. The refill starts
REFILL_DELAY after a take, so the hand-out, its answer and the client's first
connection do not share the CPU and the disk with a clone's start. Warm clones are not
branches: they are not listed, hold no branch slot, and are destroyed at
start-up (meta `warm=1`) and shutdown.

Warm clones carry the default size limit (storage.max_branch_bytes), set
when they are cloned; a create asking for another limit goes cold rather
than changing a running clone's limit at hand-over.
"""

from __future__ import annotations

import contextlib
import secrets
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psycopg
import structlog

from cowbranchd.errors import CowbranchError
from cowbranchd.model import META_WARM, BranchRecord, State, meta_patch, now
from cowbranchd.storage.base import Kind, SnapshotRef

from .follow import is_followed
from .inventory import BranchEntry, Context
from .lifecycle import (
    dismantle,
    materialise,
    open_session,
    prepare_hand_over,
    remove_runtime_files,
)
from .revert import Revert

__all__ = ["WarmClone", "WarmPool"]

log = structlog.get_logger("cowbranchd.warm")

# Seconds between checks when nothing wakes the refill thread.
REFILL_INTERVAL = 5.0
# After a failed warm start, wait this long before trying that base again.
FAILURE_BACKOFF = 30.0
# Seconds between a take and the refill it wakes: the hand-out's answer and
# the client's first query go first.
REFILL_DELAY = 0.05
# A frozen branch nobody branched from for this long has no warm clones:
# templates come and go with migrations, and each warm clone is a postgres.
HOT_WINDOW = 600.0


@dataclass(frozen=True)
class Parent:
    """What a warm clone of one source is made as."""

    base_id: str
    parent: str  # as BranchRecord.parent
    role: str = ""  # "": the base's branch role


@dataclass
class WarmClone:
    """A started clone and the daemon's open socket connection to it (None
    once given away to `claim`, which closes it)."""

    entry: BranchEntry
    session: psycopg.Connection[Any] | None = None


class WarmPool:
    def __init__(self, ctx: Context, size: int) -> None:
        self.ctx = ctx
        self.size = size
        self._lock = threading.Lock()
        self._ready: dict[SnapshotRef, list[WarmClone]] = {}
        self._failed_at: dict[SnapshotRef, float] = {}
        # Frozen branches' snapshots -> when a child was last asked of them.
        self._asked_at: dict[SnapshotRef, float] = {}
        self._wake = threading.Event()
        self._stopping = threading.Event()
        self._thread: threading.Thread | None = None

    @property
    def enabled(self) -> bool:
        return self.size > 0

    def start(self) -> None:
        if not self.enabled or self._thread is not None:
            return
        self._thread = threading.Thread(target=self._run, name="warm", daemon=True)
        self._thread.start()

    @property
    def max_bytes(self) -> int:
        """The size limit every warm clone is made with: the default."""
        return self.ctx.config.storage.max_branch_bytes

    def take(self, source: SnapshotRef, max_bytes: int) -> WarmClone | None:
        """A warm clone of `source` limited to `max_bytes`, now the caller's, or None."""
        if not self.enabled:
            return None
        if source.kind is Kind.BRANCHES:
            self.want(source)
        if max_bytes != self.max_bytes:
            return None
        with self._lock:
            entries = self._ready.get(source)
            taken = entries.pop() if entries else None
        self._wake.set()
        return taken

    def want(self, source: SnapshotRef) -> None:
        """A frozen branch's snapshot is hot now (a child was asked of it, or
        it was just frozen): keep warm clones of it for HOT_WINDOW."""
        if not self.enabled:
            return
        with self._lock:
            fresh = source not in self._asked_at
            self._asked_at[source] = time.monotonic()
        if fresh:
            self._wake.set()

    def ready(self) -> dict[str, int]:
        """How many warm clones wait to be taken, per parent (as in Branch.parent)."""
        with self._lock:
            return {
                entries[0].entry.record.parent: len(entries)
                for entries in self._ready.values()
                if entries
            }

    def drop_base(self, base_id: str) -> None:
        """Destroy the warm clones of a base (before the base goes)."""
        self._drop(lambda k: k.kind is Kind.BASES and k.name == base_id)

    def drop_source(self, source: SnapshotRef) -> None:
        """Destroy the warm clones of one source (a frozen branch, before it goes)."""
        with self._lock:
            self._asked_at.pop(source, None)
        self._drop(lambda k: k == source)

    def _drop(self, doomed: Callable[[SnapshotRef], bool]) -> None:
        with self._lock:
            keys = [k for k in self._ready if doomed(k)]
            entries = [e for k in keys for e in self._ready.pop(k)]
        for clone in entries:
            self.discard(clone)

    def stop(self) -> None:
        """Stop refilling and destroy every warm clone (they are cheap to
        make again, and a restart would not adopt them)."""
        self._stopping.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout=60)
        with self._lock:
            entries = [e for group in self._ready.values() for e in group]
            self._ready.clear()
        for clone in entries:
            self.discard(clone)

    def discard(self, clone: WarmClone) -> None:
        if clone.session is not None:
            with contextlib.suppress(psycopg.Error):
                clone.session.close()
        try:
            dismantle(self.ctx, clone.entry)
        except CowbranchError as exc:
            log.error("warm_discard_failed", branch=clone.entry.branch_id, error=exc.message)

    # -- refill ------------------------------------------------------------------

    def _run(self) -> None:
        while not self._stopping.is_set():
            try:
                self._refill()
            except Exception:
                log.exception("warm_refill_failed")
            if self._wake.wait(REFILL_INTERVAL):
                self._stopping.wait(REFILL_DELAY)
            self._wake.clear()

    def _wanted(self) -> dict[SnapshotRef, Parent]:
        """The hot parents: the latest version of every ready base, not of a
        followed base (its branches recover to a time: never warm); and the
        frozen branches asked for a child within HOT_WINDOW."""
        with self.ctx.inventory.lock:
            bases = list(self.ctx.inventory.bases.values())
            frozen = [
                (e.frozen_source, e.record)
                for e in self.ctx.inventory.branches.values()
                if e.record.frozen and not e.deleting and e.error is None
            ]
        wanted: dict[SnapshotRef, Parent] = {}
        for base in bases:
            latest = base.record.latest_version
            if (
                base.record.state is State.READY
                and latest is not None
                and not is_followed(base.record)
            ):
                base_id = base.record.base_id
                wanted[SnapshotRef(Kind.BASES, base_id, f"v{latest}")] = Parent(
                    base_id, f"bases/{base_id}/versions/{latest}"
                )
        horizon = time.monotonic() - HOT_WINDOW
        with self._lock:
            for source in [k for k, t in self._asked_at.items() if t <= horizon]:
                del self._asked_at[source]
            hot = [
                (self._asked_at[source], source, record)
                for source, record in frozen
                if source is not None and source in self._asked_at
            ]
        hot.sort(key=lambda item: item[0], reverse=True)
        # daemon.warm_templates caps them: a tenant with many templates cannot
        # make the daemon run warm_branches postgres processes for each.
        for _, source, record in hot[: self.ctx.config.daemon.warm_templates]:
            wanted[source] = Parent(record.base_id, f"branches/{record.branch_id}", record.role)
        return wanted

    def _refill(self) -> None:
        wanted = self._wanted()
        with self._lock:
            stale = [k for k in self._ready if k not in wanted]
            old = [e for k in stale for e in self._ready.pop(k)]
        for clone in old:
            self.discard(clone)
        for source, parent in wanted.items():
            while not self._stopping.is_set():
                with self._lock:
                    have = len(self._ready.get(source, []))
                failed_at = self._failed_at.get(source)
                if have >= self.size or (
                    failed_at is not None and now().timestamp() - failed_at < FAILURE_BACKOFF
                ):
                    break
                made = self._make(source, parent)
                if made is None:
                    self._failed_at[source] = now().timestamp()
                    break
                with self._lock:
                    self._ready.setdefault(source, []).append(made)

    def _make(self, source: SnapshotRef, parent: Parent) -> WarmClone | None:
        """Clone `source`, start its postgres and open the daemon's session
        to it; None (logged) on failure."""
        ctx = self.ctx
        # Not a valid branch id ('_'), so it can never collide with one.
        warm_id = "warm_" + secrets.token_hex(4)
        try:
            port = ctx.ports.allocate()
        except CowbranchError as exc:
            log.warning("warm_no_port", parent=parent.parent, error=exc.message)
            return None
        try:
            uid = ctx.uids.allocate() if ctx.uids is not None else 0
        except CowbranchError as exc:
            ctx.ports.release(port)
            log.warning("warm_no_uid", parent=parent.parent, error=exc.message)
            return None
        record = BranchRecord(
            uid=uid,
            branch_id=warm_id,
            base_id=parent.base_id,
            parent=parent.parent,
            role=parent.role,
            source_snapshot=str(source),
            state=State.READY,
            create_time=now(),
            port=port,
            max_bytes=self.max_bytes,
        )
        entry = BranchEntry(record=record, path=Path())
        entry.settled.set()
        try:
            with Revert() as undo:
                undo.add("release port", lambda: ctx.ports.release(entry.record.port))
                if uid and ctx.uids is not None:
                    undo.add("release uid", lambda: ctx.uids.release(uid) if ctx.uids else None)
                meta = {**record.to_meta(), META_WARM: "1"}
                materialise(ctx, entry, source, meta, undo, allow_new_port=True)
                moved = meta_patch(record, entry.record)  # a retry may have moved its port
                if moved:
                    ctx.driver.set_meta(Kind.BRANCHES, warm_id, moved)
                session = open_session(ctx, entry)
                prepare_hand_over(ctx, warm_id)
                undo.success()
        except CowbranchError as exc:
            log.warning("warm_start_failed", parent=parent.parent, error=exc.message)
            remove_runtime_files(ctx, warm_id)
            return None
        log.debug("warm_ready", parent=parent.parent, source=str(source), branch=warm_id)
        return WarmClone(entry, session)
