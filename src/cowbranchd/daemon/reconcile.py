"""Start-up reconcile: rebuild the inventory from storage alone and bring it
in line with the process table, before the daemon reports SERVING.

Order (DESIGN.md): check driver -> ensure layout -> remove staging/trash ->
list volumes -> remove half-built (`creating`) leftovers -> adopt live
postmasters (pid + create time) or restart them, marking FAILED what will not
start; listen again for suspended ones -> reserve ports in use. Branches
outlive a daemon restart.
"""

from __future__ import annotations

from datetime import UTC, datetime

import structlog

from cowbranchd import postgres
from cowbranchd.errors import CowbranchError
from cowbranchd.model import META_SUPERSEDED, META_WARM, BaseRecord, BranchRecord, State
from cowbranchd.storage.base import Kind, SnapshotRef, Volume

from .branches import Branches
from .freeze import is_frozen_snapshot
from .inventory import BaseEntry, BranchEntry, Context
from .lifecycle import dismantle, replay_hand_overs, withdraw

__all__ = ["reconcile"]

log = structlog.get_logger("cowbranchd.reconcile")


def reconcile(ctx: Context, branches: Branches) -> dict[str, int]:
    """Returns counts of what was found and done, for the start-up log line."""
    driver = ctx.driver
    driver.check()
    driver.ensure_layout()
    counts = {
        "bases": 0,
        "adopted": 0,
        "restarted": 0,
        "suspended": 0,
        "failed": 0,
        "removed": 0,
    }
    counts["removed"] += len(driver.gc())
    # Warm hand-overs whose metadata the pool had not yet flushed at a crash.
    volumes = replay_hand_overs(ctx, driver.list())
    branch_ids = {
        record.branch_id
        for v in volumes
        if v.kind is Kind.BRANCHES and (record := _branch_record(v)) is not None
    }
    for volume in volumes:
        if volume.kind is Kind.BASES:
            counts["bases"] += _adopt_base(ctx, volume)
    unreadable = [v for v in volumes if v.kind is Kind.BRANCHES and _branch_record(v) is None]
    for volume in unreadable:
        _keep_unreadable_branch(ctx, volume)
        counts["failed"] += 1
    branch_volumes, superseded = _one_volume_per_branch(
        [v for v in volumes if v.kind is Kind.BRANCHES and v not in unreadable]
    )
    for volume in superseded:
        log.warning("removing_superseded_volume", volume=volume.name)
        dismantle(ctx, _entry(volume), release=False)  # port and uid are the branch's
        counts["removed"] += 1
    for volume in branch_volumes:
        try:
            outcome = _adopt_branch(ctx, branches, volume)
        except Exception as exc:
            # One tenant's branch may be broken in ways nobody foresaw; the
            # daemon and every other branch must still come up.
            log.exception("adopt_failed", branch=volume.name)
            entry = ctx.inventory.branches.get(_branch_id(volume))
            if entry is not None:
                branches._mark_failed(entry, f"could not adopt at start-up: {exc}")
            outcome = "failed"
        counts[outcome] += 1
    # Snapshots a branch took for a child (`c-<child>`) whose child is gone,
    # and freezes that crashed before their record (`f-` no record names
    # and no branch was cloned from).
    by_volume = {e.volume: e for e in ctx.inventory.branches.values()}
    sources = {e.record.source_snapshot for e in ctx.inventory.branches.values()}
    for volume in volumes:
        owner = by_volume.get(volume.name) if volume.kind is Kind.BRANCHES else None
        if owner is None:
            continue
        for snap in volume.snapshots:
            ref = SnapshotRef(Kind.BRANCHES, volume.name, snap)
            orphan = (snap.startswith("c-") and snap[2:] not in branch_ids) or (
                is_frozen_snapshot(snap) and snap != owner.record.frozen and str(ref) not in sources
            )
            if orphan and driver.destroy_snapshot(ref):
                counts["removed"] += 1
    counts["removed"] += len(driver.gc())
    log.info("reconciled", **counts)
    return counts


def _one_volume_per_branch(volumes: list[Volume]) -> tuple[list[Volume], list[Volume]]:
    """A reset clones a new volume before it destroys the old one; a crash in
    between leaves two finished volumes for one branch. The one reset more
    often is the branch; the others are superseded. (Half-built and warm
    volumes are dealt with one by one.)"""
    finished: dict[str, list[Volume]] = {}
    others: list[Volume] = []
    marked: list[Volume] = []
    for volume in volumes:
        record = BranchRecord.from_meta(volume.name, volume.meta)
        if volume.meta.get(META_SUPERSEDED) == "1":
            marked.append(volume)  # a reset finished with it; its destroy failed
        elif record.state is State.CREATING or volume.meta.get(META_WARM) == "1":
            others.append(volume)
        else:
            finished.setdefault(record.branch_id, []).append(volume)
    keep, superseded = list(others), marked
    for group in finished.values():
        group.sort(key=lambda v: int(v.meta.get("resets") or 0), reverse=True)
        keep.append(group[0])
        superseded.extend(group[1:])
    return keep, superseded


def _branch_record(volume: Volume) -> BranchRecord | None:
    """The volume's record, or None when its metadata cannot be read."""
    if volume.meta_error:
        return None
    try:
        return BranchRecord.from_meta(volume.name, volume.meta)
    except (ValueError, TypeError, AttributeError):
        return None


def _branch_id(volume: Volume) -> str:
    record = _branch_record(volume)
    return record.branch_id if record is not None else volume.name


def _meta_problem(volume: Volume, parse: type[BaseRecord] | type[BranchRecord]) -> str:
    if volume.meta_error:
        return volume.meta_error
    try:
        parse.from_meta(volume.name, volume.meta)
    except (ValueError, TypeError, AttributeError) as exc:
        return f"metadata of {volume.kind.value}/{volume.name} does not parse: {exc}"
    return ""


def _keep_unreadable_branch(ctx: Context, volume: Volume) -> None:
    """A branch whose metadata cannot be read is kept as FAILED (with why),
    its postgres stopped: nothing says which port or parent it had, and a
    delete must still find and remove it."""
    why = _meta_problem(volume, BranchRecord)
    log.error("branch_metadata_unreadable", volume=volume.name, error=why)
    for run_dir in (ctx.mount_root / volume.name, volume.path / "pgdata"):
        master = postgres.find_postmaster(str(run_dir))
        if master is not None:
            postgres.stop(master, fast_timeout=0)
    withdraw(ctx, volume.name)
    record = BranchRecord(
        branch_id=volume.name,
        base_id="",
        parent="",
        source_snapshot="",
        state=State.FAILED,
        create_time=datetime.fromtimestamp(0, UTC),
        port=0,
        failure=f"unreadable metadata: {why}"[:500],
    )
    entry = BranchEntry(record=record, path=volume.path, volume=volume.name)
    entry.settled.set()
    ctx.inventory.branches.setdefault(volume.name, entry)


def _adopt_base(ctx: Context, volume: Volume) -> int:
    problem = _meta_problem(volume, BaseRecord)
    if problem:
        # Never destroyed: a base is the operator's data. Kept out of service
        # and reported until someone repairs or deletes it by hand.
        log.error("base_quarantined", base=volume.name, error=problem)
        ctx.inventory.quarantined[volume.name] = problem
        return 0
    record = BaseRecord.from_meta(volume.name, volume.meta)
    if record.state is State.CREATING:
        log.warning("removing_half_built_base", base=volume.name)
        ctx.driver.destroy(Kind.BASES, volume.name)
        return 0
    # Trust the snapshots over the metadata: a crash between the snapshot and
    # the metadata update leaves a version the record does not list yet.
    versions = {
        int(s[1:]): record.versions.get(int(s[1:]), record.create_time)
        for s in volume.snapshots
        if s.startswith("v") and s[1:].isdigit()
    }
    if versions != record.versions:
        record = record.evolve(versions=versions)
        ctx.driver.set_meta(Kind.BASES, volume.name, record.to_meta())
    ctx.inventory.bases[volume.name] = BaseEntry(record=record, path=volume.path)
    return 1


def _entry(volume: Volume) -> BranchEntry:
    record = BranchRecord.from_meta(volume.name, volume.meta)
    entry = BranchEntry(record=record, path=volume.path, volume=volume.name)
    entry.settled.set()
    return entry


def _adopt_branch(ctx: Context, branches: Branches, volume: Volume) -> str:
    entry = _entry(volume)
    record = entry.record
    if volume.meta.get(META_WARM) == "1":
        # A warm clone of the previous run (or one caught mid-hand-over, whose
        # client never got an answer): cheaper to make anew than to track.
        dismantle(ctx, entry, release=False)  # nothing is reserved yet
        return "removed"
    if record.state is State.CREATING:
        # Half-built at a crash (or a reset that did not finish): nothing was
        # handed out for it unless it was a reset, and a reset re-clones anyway.
        log.warning("removing_half_built_branch", branch=volume.name)
        # Not released: a reset's port, uid and socket are its branch's.
        dismantle(ctx, entry, release=False)
        source = entry.source
        # A reset's new volume shares its source with the branch's surviving
        # volume; only a first create owns its parent's `c-` snapshot.
        if source is not None and entry.owns_source and record.resets == 0:
            ctx.driver.destroy_snapshot(source)
        return "removed"
    ctx.inventory.branches[record.branch_id] = entry
    if record.port:
        ctx.ports.reserve(record.port)
    if record.uid and ctx.uids is not None:
        ctx.uids.reserve(record.uid)
    master = postgres.find_postmaster(str(ctx.run_dir(entry)))
    if master is not None:
        entry.postmaster = master
        if record.state is State.SUSPENDED:  # resumed as the last daemon stopped
            branches._store(entry, record.evolve(state=State.READY))
        log.info("adopted_branch", branch=volume.name, pid=master.pid, port=record.port)
        return "adopted"
    if record.state is State.SUSPENDED:
        # Not started: the acceptor holds its port again, as before the restart.
        return "suspended" if branches.rearm(entry) else "failed"
    if record.state is not State.READY:
        return "failed"
    try:
        branches.restart(entry)
    except CowbranchError as exc:
        branches._mark_failed(entry, f"restart after daemon start failed: {exc.message}")
        log.error("restart_failed", branch=volume.name, error=exc.message)
        return "failed"
    log.info("restarted_branch", branch=volume.name, port=record.port)
    return "restarted"
