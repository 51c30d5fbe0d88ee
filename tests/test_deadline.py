"""The per-call deadline: every wait is cut to what is left of the call."""

from __future__ import annotations

import threading

import pytest

from cowbranchd import deadline
from cowbranchd.errors import DeadlineExceeded


def test_no_scope_means_no_bound() -> None:
    """Outside a call nothing is cut: a timeout stays as given, None stays None."""
    assert deadline.remaining() is None
    assert deadline.bounded(5.0, "x") == 5.0
    assert deadline.bounded(None, "x") is None


def test_a_scope_cuts_longer_waits_and_nests_to_the_earlier() -> None:
    """Inside a 2 s call a 60 s wait becomes at most 2 s; an inner, longer scope
    cannot extend the outer deadline; gRPC's enormous "no deadline" is none."""
    with deadline.scope(2.0):
        cut = deadline.bounded(60.0, "x")
        assert cut is not None and 0 < cut <= 2.0
        with deadline.scope(30.0):
            inner = deadline.remaining()
            assert inner is not None and inner <= 2.0
    with deadline.scope(1e300):
        assert deadline.remaining() is None
    assert deadline.remaining() is None


def test_a_passed_deadline_names_what_was_about_to_wait() -> None:
    """With no time left, the next wait is DeadlineExceeded naming it; undo
    work runs unbounded all the same."""
    with deadline.scope(0.0):
        with pytest.raises(DeadlineExceeded, match="before CHECKPOINT"):
            deadline.bounded(10.0, "CHECKPOINT")
        with deadline.unbounded():
            assert deadline.bounded(10.0, "undo") == 10.0


def test_lock_and_event_waits_give_up_at_the_deadline() -> None:
    """A held lock, a semaphore with no turn left and an unset event each give
    up with DeadlineExceeded naming what was waited for."""
    lock, turns, event = threading.Lock(), threading.BoundedSemaphore(1), threading.Event()
    lock.acquire()
    turns.acquire()
    with deadline.scope(0.05):
        with pytest.raises(DeadlineExceeded, match="branches/x"):
            deadline.acquire(lock, "branches/x")
        with pytest.raises(DeadlineExceeded, match="a turn"):
            deadline.acquire(turns, "a turn")
        with pytest.raises(DeadlineExceeded, match="the create"):
            deadline.wait(event, "the create")


def test_without_a_deadline_a_semaphore_waits_for_its_turn() -> None:
    """No deadline: acquire blocks until a turn is free (it once failed at once)."""
    turns = threading.BoundedSemaphore(1)
    turns.acquire()
    threading.Timer(0.1, turns.release).start()
    deadline.acquire(turns, "a turn")
    turns.release()
