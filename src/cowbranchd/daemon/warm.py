"""Warm branches: clones of each base's latest version whose postgres is
already running, handed out by CreateBranch under the requested id.

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
from .lifecycle import dismantle, materialise, open_session, remove_runtime_files
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
        if not self.enabled or max_bytes != self.max_bytes:
            return None
        with self._lock:
            entries = self._ready.get(source)
            taken = entries.pop() if entries else None
        self._wake.set()
        return taken

    def ready(self) -> dict[SnapshotRef, int]:
        """How many warm clones of each source wait to be taken."""
        with self._lock:
            return {source: len(entries) for source, entries in self._ready.items()}

    def drop_base(self, base_id: str) -> None:
        """Destroy the warm clones of a base (before the base goes)."""
        with self._lock:
            doomed = [k for k in self._ready if k.name == base_id]
            entries = [e for k in doomed for e in self._ready.pop(k)]
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

    def _wanted(self) -> dict[SnapshotRef, str]:
        """The latest version of every ready base -> its base id; not of a
        followed base (its branches recover to a time: never warm)."""
        with self.ctx.inventory.lock:
            bases = list(self.ctx.inventory.bases.values())
        wanted: dict[SnapshotRef, str] = {}
        for base in bases:
            latest = base.record.latest_version
            if (
                base.record.state is State.READY
                and latest is not None
                and not is_followed(base.record)
            ):
                wanted[SnapshotRef(Kind.BASES, base.record.base_id, f"v{latest}")] = (
                    base.record.base_id
                )
        return wanted

    def _refill(self) -> None:
        wanted = self._wanted()
        with self._lock:
            stale = [k for k in self._ready if k not in wanted]
            old = [e for k in stale for e in self._ready.pop(k)]
        for clone in old:
            self.discard(clone)
        for source in wanted:
            while not self._stopping.is_set():
                with self._lock:
                    have = len(self._ready.get(source, []))
                failed_at = self._failed_at.get(source)
                if have >= self.size or (
                    failed_at is not None and now().timestamp() - failed_at < FAILURE_BACKOFF
                ):
                    break
                made = self._make(source)
                if made is None:
                    self._failed_at[source] = now().timestamp()
                    break
                with self._lock:
                    self._ready.setdefault(source, []).append(made)

    def _make(self, source: SnapshotRef) -> WarmClone | None:
        """Clone `source`, start its postgres and open the daemon's session
        to it; None (logged) on failure."""
        ctx = self.ctx
        # Not a valid branch id ('_'), so it can never collide with one.
        warm_id = "warm_" + secrets.token_hex(4)
        try:
            port = ctx.ports.allocate()
        except CowbranchError as exc:
            log.warning("warm_no_port", base=source.name, error=exc.message)
            return None
        try:
            uid = ctx.uids.allocate() if ctx.uids is not None else 0
        except CowbranchError as exc:
            ctx.ports.release(port)
            log.warning("warm_no_uid", base=source.name, error=exc.message)
            return None
        record = BranchRecord(
            uid=uid,
            branch_id=warm_id,
            base_id=source.name,
            parent=f"bases/{source.name}/versions/{source.snap[1:]}",
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
                undo.success()
        except CowbranchError as exc:
            log.warning("warm_start_failed", base=source.name, error=exc.message)
            remove_runtime_files(ctx, warm_id)
            return None
        log.debug("warm_ready", base=source.name, version=source.snap, branch=warm_id)
        return WarmClone(entry, session)
