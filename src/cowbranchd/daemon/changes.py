"""Changes to existing branches: delete, reset, update, failure marks, the
one metadata write path (`_store`), and the reaper's TTL and unclaimed-branch
sweep. A mixin of `Branches` (branches.py), which owns the queries, creation
and the postmasters; split only to keep each module readable. No gRPC.
"""

from __future__ import annotations

import secrets
import time
from collections.abc import Callable, Mapping
from datetime import timedelta

import structlog

from cowbranchd import deadline
from cowbranchd.errors import CowbranchError, FailedPrecondition, NotFound
from cowbranchd.model import (
    META_SUPERSEDED,
    BranchRecord,
    Parent,
    State,
    meta_patch,
    now,
    validate_idle_suspend,
    validate_labels,
    validate_ttl,
)
from cowbranchd.storage.base import Kind, SnapshotRef

from .auth import Caller
from .bases import Bases
from .inventory import BranchEntry, Context
from .lifecycle import dismantle, materialise, withdraw
from .revert import Revert
from .warm import WarmPool

__all__ = ["BranchChanges"]

log = structlog.get_logger("cowbranchd.branches")


class BranchChanges:
    """What `Branches` provides to the methods below."""

    ctx: Context
    bases: Bases
    warm: WarmPool | None
    _usage_cache: dict[str, tuple[float, int]]

    def get(self, branch_id: str, caller: Caller | None = None) -> BranchEntry:
        raise NotImplementedError

    def _start(self, entry: BranchEntry, *, allow_new_port: bool) -> None:
        raise NotImplementedError

    def _stop(self, entry: BranchEntry, *, discard: bool = False) -> None:
        raise NotImplementedError

    def resume(self, entry: BranchEntry) -> bool:
        raise NotImplementedError

    # -- delete / reset / update ------------------------------------------------

    def delete(
        self,
        branch_id: str,
        *,
        allow_missing: bool = False,
        force: bool = False,
        caller: Caller | None = None,
    ) -> None:
        try:
            entry = self.get(branch_id, caller)
        except NotFound:
            if allow_missing:
                return
            raise
        if entry.record.protected and not force:
            raise FailedPrecondition(
                f"branches/{branch_id} is protected: unprotect it first or pass force"
            )
        self.delete_entry(entry)

    def delete_entry(
        self, entry: BranchEntry, *, unless: Callable[[BranchRecord], bool] | None = None
    ) -> bool:
        """Delete the branch; False if it was gone already, or if `unless` holds
        for its record once its lock is held (a decision taken before the lock,
        such as the reaper's, is checked again against what changed since)."""
        started = time.perf_counter()
        inv = self.ctx.inventory
        with deadline.holding(entry.lock, f"branches/{entry.branch_id}"):
            with inv.lock:
                if inv.branches.get(entry.branch_id) is not entry:
                    return False  # deleted meanwhile
                if unless is not None and unless(entry.record):
                    return False
                entry.deleting = True
            frozen = entry.frozen_source
            if frozen is not None and self.warm is not None:
                self.warm.drop_source(frozen)  # its warm clones first, as for a base
            try:
                dismantle(self.ctx, entry)
            except BaseException:
                entry.deleting = False
                raise
            source = entry.source
            if source is not None and entry.owns_source:
                self.ctx.driver.destroy_snapshot(source)
            with inv.lock:
                inv.branches.pop(entry.branch_id, None)
            self._usage_cache.pop(entry.branch_id, None)
        log.info(
            "branch_deleted",
            branch=entry.branch_id,
            ms_total=round((time.perf_counter() - started) * 1000, 1),
        )
        self.ctx.metrics.branch_deleted(time.perf_counter() - started)
        return True

    def reset(
        self, branch_id: str, caller: Caller | None = None, *, version: int = 0
    ) -> BranchEntry:
        """Back to what the branch was made from; with `version`, to that
        version of its base instead (a QA branch moved to newer data), which
        becomes its parent. Same port, same password either way."""
        started = time.perf_counter()
        entry = self.get(branch_id, caller)
        driver = self.ctx.driver
        with deadline.holding(entry.lock, f"branches/{branch_id}"):
            source = entry.source
            if source is None or entry.deleting:
                raise FailedPrecondition(
                    f"branches/{branch_id} cannot be reset while it is deleting"
                )
            if entry.record.frozen:
                raise FailedPrecondition(
                    f"branches/{branch_id} is frozen (a template its children clone): "
                    "delete it and freeze a new one instead"
                )
            # Its port back from the acceptor, and one path for what follows.
            self.resume(entry)
            # A new volume first, the old one destroyed last: a crash midway
            # leaves the old volume (restarted at the next start) or both,
            # and then the higher `resets` count wins (reconcile.py). It also
            # never re-clones a name just destroyed, which zfs-fuse can trip on.
            old_volume, old_path = entry.volume, entry.path
            new_volume = f"{branch_id}_{secrets.token_hex(3)}"  # '_' is never in an id
            record = entry.record.evolve(
                state=State.CREATING, failure="", resets=entry.record.resets + 1
            )
            if version:
                source, record = self._moved_to_version(entry, source, record, version)
            self._stop(entry, discard=True)
            withdraw(self.ctx, old_volume)
            entry.volume = new_volume
            try:
                with Revert() as undo:
                    # On failure, not released: port, uid and socket stay the branch's.
                    materialise(
                        self.ctx,
                        entry,
                        source,
                        record.to_meta(),
                        undo,
                        allow_new_port=False,
                        release=False,
                    )
                    undo.success()
            except CowbranchError as exc:
                entry.volume, entry.path = old_volume, old_path
                try:  # the branch as it was, rather than a FAILED one
                    self._start(entry, allow_new_port=False)
                except CowbranchError:
                    self._mark_failed(entry, f"reset failed: {exc.message}")
                raise
            self._store(entry, record.evolve(state=State.READY), before=record)
            try:
                # Marked first: should the destroy fail, the next start removes
                # the old volume instead of bringing the branch back from it
                # (after a delete, say).
                driver.set_meta(Kind.BRANCHES, old_volume, {META_SUPERSEDED: "1"})
                driver.destroy(Kind.BRANCHES, old_volume)
            except CowbranchError as exc:  # the next start's reconcile removes it
                log.error("reset_old_volume_kept", branch=branch_id, error=exc.message)
            self._usage_cache.pop(branch_id, None)
        log.info("branch_reset", branch=branch_id, parent=entry.record.parent)
        self.ctx.metrics.branch_reset(time.perf_counter() - started)
        return entry

    def _moved_to_version(
        self, entry: BranchEntry, source: SnapshotRef, record: BranchRecord, version: int
    ) -> tuple[SnapshotRef, BranchRecord]:
        """The snapshot of `version` of the branch's base, and `record` with
        that version as its parent. Only a branch of a base version can move:
        a branch of a branch is a copy of that branch's data, not of a base."""
        if source.kind is not Kind.BASES:
            raise FailedPrecondition(
                f"branches/{entry.branch_id} was made from {entry.record.parent}, not from a "
                "base version: only a branch of a base can be reset to another version"
            )
        parent = Parent(base=source.name, version=version)
        _, snapshot = self.bases.resolve(parent)
        return snapshot, record.evolve(parent=str(parent), source_snapshot=str(snapshot))

    def _store(
        self,
        entry: BranchEntry,
        after: BranchRecord,
        *,
        before: BranchRecord | None = None,
        flags: Mapping[str, str] | None = None,
        durable: bool = True,
    ) -> None:
        """The one way a branch's metadata changes: `after` becomes its record,
        and what differs from `before` (default: its record now) is written to
        its own volume (never to a volume named by its id: after a reset or a
        warm hand-over they differ), with any volume `flags`. `durable` False
        only where the patch was made durable elsewhere (StorageDriver.set_meta)."""
        patch = {**meta_patch(before or entry.record, after), **(flags or {})}
        if patch:
            self.ctx.driver.set_meta(Kind.BRANCHES, entry.volume, patch, durable=durable)
        entry.record = after

    def _mark_failed(self, entry: BranchEntry, why: str) -> None:
        failed = entry.record.evolve(state=State.FAILED, failure=why[:500])
        try:
            self._store(entry, failed)
        except CowbranchError as exc:
            entry.record = failed
            log.error("mark_failed_failed", branch=entry.branch_id, error=exc.message)

    def update(
        self,
        branch_id: str,
        *,
        labels: Mapping[str, str] | None = None,
        ttl: timedelta | None = None,
        set_ttl: bool = False,
        protected: bool | None = None,
        idle_suspend: timedelta | None = None,
        set_idle_suspend: bool = False,
        caller: Caller | None = None,
    ) -> BranchEntry:
        entry = self.get(branch_id, caller)
        changes: dict[str, object] = {}
        if set_idle_suspend:
            changes["idle_suspend"] = validate_idle_suspend("branch.idle_suspend", idle_suspend)
        if labels is not None:
            changes["labels"] = validate_labels("branch.labels", labels)
        if set_ttl:
            valid = validate_ttl("ttl", ttl)
            changes["expire_time"] = now() + valid if valid else None
        if protected is not None:
            changes["protected"] = protected
        with deadline.holding(entry.lock, f"branches/{branch_id}"):
            self._store(entry, entry.record.evolve(**changes))
        return entry

    def mark_unclaimed(self, entry: BranchEntry) -> None:
        """The caller of this finished create is gone: keep the branch for a
        retry with its request_id, for `daemon.unclaimed_grace`, then reap it."""
        entry.unclaimed_since = time.monotonic()
        log.warning("branch_unclaimed", branch=entry.branch_id, request_id=entry.record.request_id)

    def reap_expired(self) -> list[str]:
        """Delete unprotected branches whose expire_time has passed, and
        branches nobody received once their grace is over."""
        moment = now()
        grace = self.ctx.config.daemon.unclaimed_grace.total_seconds()
        unclaimed_before = time.monotonic() - grace
        with self.ctx.inventory.lock:
            expired = [
                e
                for e in self.ctx.inventory.branches.values()
                if (
                    (
                        e.record.expire_time is not None
                        and e.record.expire_time <= moment
                        and not e.record.protected
                    )
                    or (e.unclaimed_since is not None and e.unclaimed_since < unclaimed_before)
                )
                and e.settled.is_set()
                and not e.deleting
            ]
        reaped = []
        for entry in expired:

            def kept(record: BranchRecord, entry: BranchEntry = entry) -> bool:
                # Claimed, protected or given more time since the decision above.
                if entry.unclaimed_since is not None and entry.unclaimed_since < unclaimed_before:
                    return False
                return record.protected or record.expire_time is None or record.expire_time > now()

            try:
                if self.delete_entry(entry, unless=kept):
                    reaped.append(entry.branch_id)
            except CowbranchError as exc:
                log.error("reap_failed", branch=entry.branch_id, error=exc.message)
        if reaped:
            log.info("branches_expired", branches=reaped)
        return reaped
