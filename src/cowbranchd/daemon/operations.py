"""Long-running operations (AIP-151): work that outlives an RPC runs on a
thread of its own, reports its phase and bytes, and can be waited on or
cancelled. Kept in memory: a daemon restart forgets them (their half-built
results are leftovers that reconcile removes). No gRPC here.
"""

from __future__ import annotations

import secrets
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime, timedelta

import structlog

from cowbranchd.errors import (
    Cancelled,
    CowbranchError,
    Internal,
    NotFound,
    ResourceExhausted,
    Unavailable,
)
from cowbranchd.model import now, validate_id

from .auth import Caller

__all__ = ["Operation", "Operations"]

log = structlog.get_logger("cowbranchd.operations")

KEEP_DONE = timedelta(hours=1)
MAX_KEPT = 100
MAX_RUNNING = 4


@dataclass
class Operation:
    """One piece of long work: what it is on, how far it got, how it ended."""

    op_id: str
    target: str
    owner: str
    phase: str = "queued"
    bytes_done: int = 0
    bytes_total: int = 0
    start_time: datetime = field(default_factory=now)
    end_time: datetime | None = None
    error: CowbranchError | None = None
    result: str = ""
    cancelled: threading.Event = field(default_factory=threading.Event)
    finished: threading.Event = field(default_factory=threading.Event)

    @property
    def done(self) -> bool:
        return self.finished.is_set()

    def progress(self, phase: str, done: int = 0, total: int = 0) -> None:
        """Report progress; raises Cancelled once cancellation was asked for,
        so the work stops at its next report."""
        self.phase, self.bytes_done, self.bytes_total = phase, done, total
        self.check()

    def check(self) -> None:
        if self.cancelled.is_set():
            raise Cancelled(f"operations/{self.op_id} was cancelled")


class Operations:
    """The daemon's operations: started, listed, waited on and cancelled by
    their owner or an admin."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._ops: dict[str, Operation] = {}
        self._threads: dict[str, threading.Thread] = {}
        self._closed = False

    def start(self, target: str, owner: Caller, work: Callable[[Operation], str]) -> Operation:
        """Run `work(op)` on a thread of its own; its return value is the
        operation's result, its error (CowbranchError or not) the failure."""
        op = Operation(op_id="op-" + secrets.token_hex(6), target=target, owner=owner.name)
        with self._lock:
            if self._closed:
                raise Unavailable("cowbranchd is shutting down; retry against the restarted daemon")
            self._forget_old()
            running = sum(1 for o in self._ops.values() if not o.done)
            if running >= MAX_RUNNING:
                raise ResourceExhausted(
                    f"{running} operations are running (at most {MAX_RUNNING}); wait for one to end"
                )
            busy = [o for o in self._ops.values() if o.target == target and not o.done]
            if busy:
                raise Unavailable(
                    f"{target} is busy with operations/{busy[0].op_id}; wait for it or cancel it"
                )
            self._ops[op.op_id] = op
            thread = threading.Thread(
                target=self._run, args=(op, work), name=f"op-{op.op_id}", daemon=True
            )
            self._threads[op.op_id] = thread
        thread.start()
        log.info("operation_started", operation=op.op_id, target=target, owner=owner.name)
        return op

    def _run(self, op: Operation, work: Callable[[Operation], str]) -> None:
        try:
            op.result = work(op)
            op.phase = "done"
        except CowbranchError as exc:
            op.error = exc
        except Exception as exc:
            log.exception("operation_crashed", operation=op.op_id)
            op.error = Internal(f"internal error: {exc}")
        finally:
            op.end_time = now()
            op.finished.set()
            with self._lock:
                self._threads.pop(op.op_id, None)
        log.info(
            "operation_ended",
            operation=op.op_id,
            target=op.target,
            result=op.result or None,
            error=op.error.message if op.error else None,
            s=round((op.end_time - op.start_time).total_seconds(), 2),
        )

    def _forget_old(self) -> None:
        """Caller holds the lock."""
        done = sorted(
            (o for o in self._ops.values() if o.done and o.end_time is not None),
            key=lambda o: o.end_time or o.start_time,
        )
        cutoff = now() - KEEP_DONE
        excess = max(0, len(self._ops) - MAX_KEPT)
        for n, o in enumerate(done):
            if n < excess or (o.end_time is not None and o.end_time < cutoff):
                del self._ops[o.op_id]

    def get(self, op_id: str, caller: Caller) -> Operation:
        validate_id("name", op_id)
        with self._lock:
            op = self._ops.get(op_id)
        if op is None or not caller.owns(op.owner):
            # Another owner's operation is as good as missing.
            raise NotFound(f"operations/{op_id} does not exist (or has been forgotten)")
        return op

    def visible(self, caller: Caller) -> list[Operation]:
        with self._lock:
            ops = list(self._ops.values())
        return sorted(
            (o for o in ops if caller.owns(o.owner)), key=lambda o: o.start_time, reverse=True
        )

    def cancel(self, op_id: str, caller: Caller) -> Operation:
        op = self.get(op_id, caller)
        if not op.done:
            op.cancelled.set()
            log.info("operation_cancel_requested", operation=op_id)
        return op

    def stop(self, timeout: float) -> None:
        """Cancel every running operation and wait up to `timeout` for them."""
        with self._lock:
            self._closed = True
            ops = [o for o in self._ops.values() if not o.done]
        for op in ops:
            op.cancelled.set()
        for op in ops:
            op.finished.wait(timeout)
