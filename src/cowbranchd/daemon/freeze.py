"""Frozen branches: templates whose children clone one shared snapshot.

A child of an ordinary branch gets a `c-<child>` snapshot of its own, taken
after a CHECKPOINT of the running parent, and starts with crash recovery. A
template (the pytest plugin's migrated schema, say) has many children, so
FreezeBranch stops its postgres cleanly, snapshots its volume once as
`f-<hex>` (named in the record's `frozen`), and leaves it SUSPENDED: every
later child clones that snapshot like a base version (no checkpoint, no
recovery, warm clones from warm.py), and shares it rather than owning it.

Crash-safe order: stop, snapshot, then the record (`frozen` and SUSPENDED in
one write). A crash before the record leaves an `f-` snapshot no record
names and nothing cloned; start-up removes it (reconcile.py). The snapshot
outlives the template's volume while children use it (storage keeps a
snapshot that is some volume's origin) and goes with the last of them.
A mixin of `Branches`; no gRPC.
"""

from __future__ import annotations

import secrets

import structlog

from cowbranchd import deadline
from cowbranchd.errors import CowbranchError, FailedPrecondition
from cowbranchd.model import State
from cowbranchd.storage.base import Kind

from .inventory import BranchEntry
from .lifecycle import stop_postmaster
from .suspend import BranchSuspend
from .warm import WarmPool

__all__ = ["BranchFreeze", "is_frozen_snapshot"]

log = structlog.get_logger("cowbranchd.branches")

PREFIX = "f-"


def is_frozen_snapshot(snap: str) -> bool:
    return snap.startswith(PREFIX)


class BranchFreeze(BranchSuspend):
    warm: WarmPool | None

    def state(self, entry: BranchEntry) -> State:
        raise NotImplementedError

    def freeze(self, entry: BranchEntry) -> BranchEntry:
        """Make `entry` a template (see the module docstring); a frozen one
        is returned as it is. The caller checked who may."""
        branch_id = entry.branch_id
        with deadline.holding(entry.lock, f"branches/{branch_id}"):
            if entry.record.frozen:
                return entry
            state = self.state(entry)
            if entry.deleting or state not in (State.READY, State.SUSPENDED):
                raise FailedPrecondition(
                    f"branches/{branch_id} is {state.name}: only a READY or SUSPENDED "
                    "branch can be frozen"
                )
            running = state is State.READY
            if running:
                # A clean shutdown: children then start without recovery.
                stop_postmaster(self.ctx, entry)
            snap = PREFIX + secrets.token_hex(3)
            try:
                ref = self.ctx.driver.snapshot(Kind.BRANCHES, entry.volume, snap)
                try:
                    if running:
                        self._arm(entry)  # its port, as for an idle suspend
                    self._store(entry, entry.record.evolve(frozen=snap, state=State.SUSPENDED))
                except CowbranchError:
                    if running:
                        self.ctx.acceptor.disarm(branch_id)
                    self.ctx.driver.destroy_snapshot(ref)  # nothing cloned it yet
                    raise
            except CowbranchError:
                if running:
                    self._restart_or_fail(entry, "freeze failed")
                raise
        log.info("branch_frozen", branch=branch_id, snapshot=snap)
        if self.warm is not None:
            self.warm.want(ref)  # made to be branched from: warm clones now
        return entry
