"""Branches: writable clones of a base version or of another branch, each with
its own postmaster on its own port.

Create = (CHECKPOINT + snapshot, for a branch parent) -> port -> clone with
state=creating -> start postgres -> SELECT 1 -> state=ready; each step
registers its undo, so a failure leaves no clone, process or port behind.
Slow work runs under the branch's own lock, never under the inventory lock.
This module does not speak gRPC.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import shutil
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from pathlib import Path

import structlog

from cowbranchd import deadline, postgres
from cowbranchd.errors import (
    AlreadyExists,
    CowbranchError,
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    PermissionDenied,
    ResourceExhausted,
)
from cowbranchd.model import (
    META_WARM,
    BaseRecord,
    BranchRecord,
    Selector,
    State,
    meta_patch,
    now,
    parse_parent,
    validate_id,
    validate_idle_suspend,
    validate_labels,
    validate_request_id,
    validate_role,
    validate_ttl,
)
from cowbranchd.postgres.settings import validate_client_settings
from cowbranchd.storage.base import Kind, SnapshotRef

from . import follow
from .auth import ADMIN, Caller
from .bases import Bases
from .freeze import BranchFreeze
from .inventory import BranchEntry, Context
from .lifecycle import (
    Connection,
    claim,
    connection,
    dismantle,
    materialise,
    record_hand_over,
    socket_dsn,
    start_postmaster,
    stop_postmaster,
)
from .limits import size_limit, size_limit_failure
from .revert import Revert
from .warm import WarmClone, WarmPool

__all__ = ["Branches", "Connection", "CreateSpec"]

log = structlog.get_logger("cowbranchd.branches")

USAGE_CACHE_S = 10.0


@dataclass(frozen=True)
class CreateSpec:
    parent: str
    branch_id: str = ""
    request_id: str = ""
    labels: Mapping[str, str] = field(default_factory=dict)
    ttl: timedelta | None = None
    postgres_settings: Mapping[str, str] = field(default_factory=dict)
    protected: bool = False
    max_bytes: int = 0  # 0: storage.max_branch_bytes
    owner: Caller = ADMIN
    role: str = ""  # "": the parent's role, or the base's branch role
    idle_suspend: timedelta | None = None  # None: daemon.idle_suspend; zero: never
    at: datetime | None = None  # a followed base as it was then (follow.py); None: now


class Branches(BranchFreeze):
    def __init__(self, ctx: Context, bases: Bases, warm: WarmPool | None = None) -> None:
        self.ctx = ctx
        self.bases = bases
        self.warm = warm
        self._usage_cache: dict[str, tuple[float, int]] = {}
        self._idle_since: dict[str, tuple[float, int]] = {}

    def _check_space(self) -> None:
        """RESOURCE_EXHAUSTED below the configured free-space reserve, asked
        of storage at every create (one statvfs), so a burst cannot slip past
        a sampled value."""
        free = self.ctx.driver.free_bytes()
        reserve = self.ctx.config.storage.min_free_bytes
        if free < reserve:
            raise ResourceExhausted(
                f"the pool has {free // 2**20} MiB free, below storage.min_free_bytes "
                f"({reserve // 2**20} MiB): delete branches or grow the pool"
            )

    # -- queries -------------------------------------------------------------

    def get(self, branch_id: str, caller: Caller | None = None) -> BranchEntry:
        """The branch; with `caller`, only if it may act on it (its owner or
        an admin): PERMISSION_DENIED otherwise."""
        validate_id("name", branch_id)
        with self.ctx.inventory.lock:
            entry = self.ctx.inventory.branches.get(branch_id)
        if entry is None or entry.error is not None:
            raise NotFound(f"branches/{branch_id} does not exist")
        if caller is not None and not caller.owns(entry.record.owner):
            raise PermissionDenied(
                f"branches/{branch_id} belongs to another owner: only its owner or an admin "
                "may see its connection, delete, reset, update or branch from it"
            )
        return entry

    def _check_quotas(self, owner: Caller) -> None:
        """RESOURCE_EXHAUSTED when `owner` is at a per-owner quota (admins have
        none). Caller holds the inventory lock. Written bytes come from the
        usage cache (at most USAGE_CACHE_S old): a burst of creates may pass
        the line by what was written meanwhile; each branch's own max_bytes
        is the hard limit."""
        tenants = self.ctx.config.tenants
        if owner.admin or not (tenants.max_branches or tenants.max_written_bytes):
            return
        owned = [
            e
            for e in self.ctx.inventory.branches.values()
            if e.record.owner == owner.name and e.error is None
        ]
        if tenants.max_branches and len(owned) >= tenants.max_branches:
            raise ResourceExhausted(
                f"owner {owner.name!r} is at its quota tenants.max_branches "
                f"({tenants.max_branches} branches): delete some of its branches"
            )
        if tenants.max_written_bytes:
            written = sum(self._cached_usage(e) for e in owned)
            if written >= tenants.max_written_bytes:
                raise ResourceExhausted(
                    f"owner {owner.name!r} is at its quota tenants.max_written_bytes: its "
                    f"branches wrote {written // 2**20} MiB of "
                    f"{tenants.max_written_bytes // 2**20} MiB; delete some of its branches"
                )

    def matching(self, selector: Selector) -> list[BranchEntry]:
        with self.ctx.inventory.lock:
            entries = list(self.ctx.inventory.branches.values())
        return sorted(
            (e for e in entries if e.error is None and selector.matches(e.record.labels)),
            key=lambda e: e.branch_id,
        )

    def state(self, entry: BranchEntry) -> State:
        """The state clients see: stored state, corrected by what runs."""
        record = entry.record
        if entry.deleting:
            return State.DELETING
        if record.state is State.READY and not (entry.postmaster and entry.postmaster.alive()):
            return State.STOPPED
        return record.state

    def connection(self, entry: BranchEntry) -> Connection:
        return connection(self.ctx, entry)

    def _refresh_usage(self, owner: Caller) -> None:
        """Bring the usage cache of `owner`'s branches up to date (storage
        calls: not under the inventory lock)."""
        with self.ctx.inventory.lock:
            entries = list(self.ctx.inventory.branches.values())
        owned = [e for e in entries if e.record.owner == owner.name]
        for entry in owned:
            self.written_bytes(entry)

    def _cached_usage(self, entry: BranchEntry) -> int:
        """The last written_bytes seen for the branch, however old; 0 if none."""
        cached = self._usage_cache.get(entry.branch_id)
        return cached[1] if cached is not None else 0

    def written_bytes(self, entry: BranchEntry) -> int:
        """From storage, cached briefly: on btrfs it walks the branch's extents
        (a command), which a ListBranches of hundreds must not repeat."""
        cached = self._usage_cache.get(entry.branch_id)
        if cached is not None and time.monotonic() - cached[0] < USAGE_CACHE_S:
            return cached[1]
        try:
            value = self.ctx.driver.usage(Kind.BRANCHES, entry.volume)
        except CowbranchError:
            return 0
        self._usage_cache[entry.branch_id] = (time.monotonic(), value)
        return value

    # -- create --------------------------------------------------------------

    def create(self, spec: CreateSpec) -> BranchEntry:
        branch_id = validate_id("branch_id", spec.branch_id) if spec.branch_id else ""
        request_id = validate_request_id(spec.request_id)
        parent = parse_parent("parent", spec.parent)
        labels = validate_labels("labels", spec.labels)
        ttl = validate_ttl("ttl", spec.ttl) or self.ctx.config.daemon.default_ttl
        settings = validate_client_settings(spec.postgres_settings)
        max_bytes = size_limit(self.ctx.config.storage, spec.max_bytes)
        role = validate_role("role", spec.role)
        idle_suspend = validate_idle_suspend(
            "idle_suspend",
            self.ctx.config.daemon.idle_suspend if spec.idle_suspend is None else spec.idle_suspend,
        )
        owner = spec.owner
        if parent.branch is not None:
            self.get(parent.branch, owner)  # only its owner (or an admin) branches from it
            if spec.at is not None:
                raise InvalidArgument("at", "only for a followed base (bases/{base})")
        else:
            assert parent.base is not None
            base = self.bases.get(parent.base).record
            follow.check_branch(self.ctx, base, parent.version, spec.at, owner)
        if self.ctx.config.tenants.max_written_bytes and not owner.admin:
            self._refresh_usage(owner)
        self._check_space()

        inv = self.ctx.inventory
        while True:
            with inv.lock:
                existing = inv.by_request_id(request_id, owner.name)
                if existing is None:
                    branch_id = branch_id or self._generate_id()
                    if branch_id in inv.branches:
                        raise AlreadyExists(
                            f"branches/{branch_id} already exists (created with another request_id)"
                        )
                    self._check_quotas(owner)
                    if len(inv.branches) >= self.ctx.config.daemon.max_branches:
                        raise ResourceExhausted(
                            f"all {self.ctx.config.daemon.max_branches} branch slots are in use "
                            "(daemon.max_branches); delete some branches"
                        )
                    record = BranchRecord(
                        branch_id=branch_id,
                        base_id=parent.base or "",
                        parent=str(parent),
                        source_snapshot="",
                        state=State.CREATING,
                        create_time=now(),
                        port=0,
                        labels=labels,
                        expire_time=now() + ttl if ttl else None,
                        protected=spec.protected,
                        request_id=request_id,
                        settings=settings,
                        max_bytes=max_bytes,
                        owner=owner.name,
                        role=role,
                        idle_suspend=idle_suspend,
                    )
                    entry = BranchEntry(record=record, path=Path())
                    entry.lock.acquire()
                    inv.branches[branch_id] = entry
                    break
            # Same request_id as a create in flight or done: wait for it and
            # answer with its result; if it failed, nothing exists, so retry.
            deadline.wait(existing.settled, f"the create with request_id {request_id!r}")
            if existing.error is None:
                existing.unclaimed_since = None  # the retry its caller never made
                return existing
        try:
            self._build(entry, parent.branch, spec.at)
        except BaseException as exc:
            entry.error = exc
            raise
        finally:
            entry.settled.set()
            entry.lock.release()
        return entry

    def _generate_id(self) -> str:
        return "br-" + secrets.token_hex(4)

    def _build(
        self, entry: BranchEntry, parent_branch: str | None, at: datetime | None = None
    ) -> None:
        started = time.perf_counter()
        inv = self.ctx.inventory
        driver = self.ctx.driver
        record = entry.record
        branch_id = record.branch_id
        before_start: Callable[[BranchEntry], None] | None = None
        with Revert() as undo:

            def forget() -> None:
                with inv.lock:
                    if inv.branches.get(branch_id) is entry:
                        del inv.branches[branch_id]

            undo.add("forget branch", forget)
            own = False  # a snapshot made for this child alone: never warm
            if parent_branch is not None:
                source, own = self._snapshot_branch(parent_branch, branch_id)
                if own:
                    undo.add("destroy parent snapshot", lambda: driver.destroy_snapshot(source))
                with inv.lock:
                    parent_record = inv.branches[parent_branch].record
                base_id = parent_record.base_id
                record = record.evolve(role=record.role or parent_record.role)
                base_record = self._base_record(base_id)
            else:
                base_record, source = self.bases.resolve(parse_parent("parent", record.parent))
                base_id = base_record.base_id
                if follow.is_followed(base_record):
                    source, before_start = follow.plan_branch(
                        self.ctx, self.bases.get(base_id), at
                    )
                record = record.evolve(parent=f"bases/{base_id}/versions/{source.snap[1:]}")
            if base_record is not None:
                record = record.evolve(role=base_record.role_for(record.role))
            t_source = time.perf_counter()
            record = record.evolve(base_id=base_id, source_snapshot=str(source))
            entry.record = record
            warm = None
            steps: dict[str, float] = {}
            if (
                not own
                and not record.settings
                and self.warm is not None
                and before_start is None
            ):
                warm = self.warm.take(source, record.max_bytes)
            if warm is not None and self._hand_over(warm, entry, steps):
                undo.add("dismantle", lambda: dismantle(self.ctx, entry))
                t_clone = t_start = time.perf_counter()
                # Over the warm clone's metadata, only what differs: the id,
                # times, labels, request_id; and it is no longer warm. Made
                # durable by its hand-over record (host filesystem, one
                # fsync), then written to the volume without waiting for the
                # pool's flush; start-up replays the record if need be.
                ready = entry.record.evolve(state=State.READY)
                flags = {META_WARM: ""}
                record_hand_over(
                    self.ctx, entry.volume, {**meta_patch(warm.entry.record, ready), **flags}
                )
                t_record = time.perf_counter()
                self._store(entry, ready, before=warm.entry.record, flags=flags, durable=False)
                steps["record"] = (t_record - t_start) * 1000
                steps["store"] = (time.perf_counter() - t_record) * 1000
            else:
                warm = None
                port = self.ctx.ports.allocate()
                undo.add("release port", lambda: self.ctx.ports.release(entry.record.port or port))
                uid = self.ctx.uids.allocate() if self.ctx.uids is not None else 0
                if uid:
                    undo.add("release uid", lambda: self._release_uid(uid))
                entry.record = entry.record.evolve(port=port, uid=uid)
                cloned = entry.record

                def build() -> float:
                    return materialise(
                        self.ctx,
                        entry,
                        source,
                        cloned.to_meta(),
                        undo,
                        allow_new_port=True,
                        before_start=before_start,
                    )

                try:
                    t_clone = build()
                except AlreadyExists:
                    # No branch has this id (checked above), yet storage holds
                    # the name: a deleted branch's data kept for the branches
                    # cloned from it (ZFS frees the name with the last of
                    # them). The branch gets a volume name of its own, as a
                    # reset does ('_' is never in an id).
                    log.info("volume_name_taken", branch=branch_id, volume=entry.volume)
                    entry.volume = f"{branch_id}_{secrets.token_hex(3)}"
                    t_clone = build()
                t_start = time.perf_counter()
                # Usually one key (state; port too if a retry moved it).
                self._store(entry, entry.record.evolve(state=State.READY), before=cloned)
            undo.success()
        log.info(
            "branch_created",
            branch=branch_id,
            parent=record.parent,
            port=entry.record.port,
            warm=warm is not None,
            ms_source=round((t_source - started) * 1000, 1),
            ms_clone=round((t_clone - t_source) * 1000, 1),
            ms_start=round((t_start - t_clone) * 1000, 1),
            **{f"ms_{step}": round(ms, 2) for step, ms in steps.items()},
            ms_total=round((time.perf_counter() - started) * 1000, 1),
        )
        self.ctx.metrics.branch_created(time.perf_counter() - started, warm=warm is not None)

    def _hand_over(self, clone: WarmClone, entry: BranchEntry, steps: dict[str, float]) -> bool:
        """Make a warm clone this branch: it keeps its volume and its running
        postgres; its socket directory and log take the branch's name (the
        socket's path is resolved when clients connect; the log is an open
        descriptor). `claim` sets its own password and checks SELECT 1 over
        the daemon's session to the clone. False (the warm clone destroyed,
        nothing else changed) if that fails: the caller goes cold. Fills
        `steps` with ms per step, for the create's timing log."""
        ctx = self.ctx
        warm = clone.entry
        t0 = time.perf_counter()
        entry.volume, entry.path, entry.postmaster = warm.volume, warm.path, warm.postmaster
        entry.record = entry.record.evolve(port=warm.record.port, uid=warm.record.uid)
        for src, dst in (
            (ctx.socket_dir(warm.branch_id), ctx.socket_dir(entry.branch_id)),
            (ctx.log_path(warm.branch_id), ctx.log_path(entry.branch_id)),
        ):
            shutil.rmtree(dst, ignore_errors=True)
            with contextlib.suppress(FileNotFoundError):
                os.rename(src, dst)
        steps["rename"] = (time.perf_counter() - t0) * 1000
        # The commit of the password may skip its WAL flush only where the
        # role's password before it is the clone's own (see claim).
        same_role = connection(ctx, warm).user == connection(ctx, entry).user
        session, clone.session = clone.session, None
        try:
            claim(ctx, entry, session=session, durable=not same_role, steps=steps)
        except CowbranchError as exc:
            log.warning("warm_hand_over_failed", branch=entry.branch_id, error=exc.message)
            assert self.warm is not None
            self.warm.discard(clone)
            shutil.rmtree(ctx.socket_dir(entry.branch_id), ignore_errors=True)
            entry.volume, entry.path, entry.postmaster = entry.branch_id, Path(), None
            entry.record = entry.record.evolve(port=0, uid=0)
            return False
        return True

    def _snapshot_branch(self, parent_id: str, child_id: str) -> tuple[SnapshotRef, bool]:
        """The snapshot of a parent branch the child clones, and whether it
        is the child's own: a frozen parent's shared one (freeze.py), or one
        taken for this child after a CHECKPOINT of the running parent (a
        suspended parent is snapshot as it is: shut down clean, its data
        directory needs no checkpoint, and no start)."""
        parent = self.get(parent_id)
        frozen = parent.frozen_source
        if frozen is not None:
            if parent.deleting:
                raise FailedPrecondition(f"branches/{parent_id} is being deleted")
            return frozen, False
        with deadline.holding(parent.lock, f"branches/{parent_id}"):
            state = self.state(parent)
            if parent.deleting or state not in (State.READY, State.SUSPENDED):
                raise FailedPrecondition(
                    f"branches/{parent_id} is {state.name}, not READY: "
                    "only a running or suspended branch can be branched"
                )
            if state is State.READY:
                postgres.checkpoint(socket_dsn(self.ctx, parent))
            return self.ctx.driver.snapshot(Kind.BRANCHES, parent.volume, f"c-{child_id}"), True

    def _base_record(self, base_id: str) -> BaseRecord | None:
        with self.ctx.inventory.lock:
            base = self.ctx.inventory.bases.get(base_id)
        return base.record if base else None

    # -- postmaster ------------------------------------------------------------

    def _start(self, entry: BranchEntry, *, allow_new_port: bool) -> None:
        start_postmaster(self.ctx, entry, allow_new_port=allow_new_port)

    def _stop(self, entry: BranchEntry, *, discard: bool = False) -> None:
        stop_postmaster(self.ctx, entry, discard=discard)

    def _release_uid(self, uid: int) -> None:
        if self.ctx.uids is not None:
            self.ctx.uids.release(uid)

    def stop_all(self) -> int:
        """Stop every branch's postgres (their volumes stay; a restart adopts
        them again). Returns how many were running."""
        with self.ctx.inventory.lock:
            entries = list(self.ctx.inventory.branches.values())
        stopped = 0
        for entry in entries:
            with entry.lock:
                if entry.postmaster is not None:
                    stopped += 1
                self._stop(entry)
        return stopped

    def check_size_limits(self) -> list[str]:
        """Mark FAILED ("size limit: ...") the READY branches that hit their
        size limit and cannot go on (limits.py); called by the reaper. A
        branch whose lock is taken is looked at next time."""
        with self.ctx.inventory.lock:
            limited = [
                e
                for e in self.ctx.inventory.branches.values()
                if e.record.max_bytes and e.record.state is State.READY and e.settled.is_set()
            ]
        if not limited:
            return []
        # Asked only with limited branches about: on btrfs the answer is cached.
        enforced = self.ctx.driver.limits_bytes
        failed = []
        for entry in limited:
            if not size_limit_failure(self.ctx, entry, enforced=enforced):
                continue
            if not entry.lock.acquire(blocking=False):
                continue
            try:
                why = size_limit_failure(self.ctx, entry, enforced=enforced)
                if entry.deleting or entry.record.state is not State.READY or not why:
                    continue
                self._stop(entry)
                self._mark_failed(entry, why)
            finally:
                entry.lock.release()
            failed.append(entry.branch_id)
            self.ctx.metrics.size_limit_stop()
            log.warning("branch_size_limit", branch=entry.branch_id, failure=why)
        return failed

    def restart(self, entry: BranchEntry) -> None:
        """Start a stopped branch on its own port (used at start-up)."""
        with entry.lock:
            postgres.prepare_clone(entry.pgdata)
            self._start(entry, allow_new_port=False)
