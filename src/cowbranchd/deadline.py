"""Deadlines: every wait inside the daemon is bounded by its caller's.

The servicer opens a `scope` per RPC from the gRPC deadline the client sent
(or the daemon's `max_call_time` when it sent none). Code below asks
`bounded(timeout, what)` how long it may wait for anything — an external
command, a lock, a postgres start, a CHECKPOINT — and gets the smaller of its
own timeout and what is left of the call, or DeadlineExceeded naming what it
was about to wait for. A rollback runs `unbounded()`: undoing half-built work
must finish even when the deadline has passed (that is the small grace a call
may outlive its deadline by).

The deadline lives in a ContextVar: each RPC's worker thread sees its own, and
a scope always restores what was there before (worker threads are reused).
This module does no I/O.
"""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Iterator
from contextvars import ContextVar

from .errors import DeadlineExceeded

__all__ = ["acquire", "bounded", "holding", "remaining", "scope", "unbounded", "wait"]

_NO_DEADLINE_S = 10.0**7  # beyond this (~4 months), a "deadline" means none
_deadline: ContextVar[float | None] = ContextVar("cowbranchd_deadline", default=None)


@contextlib.contextmanager
def scope(seconds: float | None) -> Iterator[None]:
    """Bound everything under this block to `seconds` from now (None: no bound
    of its own; an enclosing, earlier deadline still holds)."""
    outer = _deadline.get()
    if seconds is not None and seconds > _NO_DEADLINE_S:
        seconds = None  # gRPC reports "no deadline" as an enormous time left
    inner = None if seconds is None else time.monotonic() + max(0.0, seconds)
    if outer is not None and (inner is None or outer < inner):
        inner = outer
    token = _deadline.set(inner)
    try:
        yield
    finally:
        _deadline.reset(token)


@contextlib.contextmanager
def unbounded() -> Iterator[None]:
    """No deadline under this block: for undo steps that must complete."""
    token = _deadline.set(None)
    try:
        yield
    finally:
        _deadline.reset(token)


def remaining() -> float | None:
    """Seconds left of the current call (may be <= 0), or None without one."""
    deadline = _deadline.get()
    return None if deadline is None else deadline - time.monotonic()


def bounded(timeout: float | None, what: str) -> float | None:
    """The time `what` may take: `timeout`, cut to what is left of the call.
    DeadlineExceeded naming `what` when nothing is left."""
    left = remaining()
    if left is None:
        return timeout
    if left <= 0:
        raise DeadlineExceeded(f"the call's deadline passed before {what}")
    return left if timeout is None else min(timeout, left)


def acquire(lock: threading.Lock | threading.RLock | threading.Semaphore, what: str) -> None:
    """Take `lock` within the deadline, or DeadlineExceeded naming `what`."""
    timeout = bounded(None, what)
    if timeout is None:
        lock.acquire()  # no deadline: wait (Semaphore reads timeout=-1 as "none left")
        return
    if not lock.acquire(timeout=timeout):
        raise DeadlineExceeded(f"gave up waiting for {what} after {timeout:.1f}s")


def wait(event: threading.Event, what: str, timeout: float | None = None) -> None:
    """Wait for `event` within the deadline (and `timeout`), or DeadlineExceeded."""
    limit = bounded(timeout, what)
    if not event.wait(limit):
        raise DeadlineExceeded(f"gave up waiting for {what} after {limit:.1f}s")


@contextlib.contextmanager
def holding(
    lock: threading.Lock | threading.RLock | threading.Semaphore, what: str
) -> Iterator[None]:
    """`with holding(lock, "branches/x"):` — `acquire` within the deadline."""
    acquire(lock, what)
    try:
        yield
    finally:
        lock.release()
