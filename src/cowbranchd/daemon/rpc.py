"""How every RPC is served: the gate (starting up, draining, storage hung),
admission of slow work, the caller's deadline, one log line per call, and
errors translated to status codes at this one edge (anything not in the error
tree is INTERNAL and logged with its traceback). Also the proto <-> model
conversions the servicers share. Nothing here decides anything about bases or
branches.
"""

from __future__ import annotations

import contextlib
import functools
import threading
import time
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from typing import Any, TypeVar

import grpc
import structlog
from google.protobuf import duration_pb2, timestamp_pb2

from cowbranchd import deadline
from cowbranchd.errors import CowbranchError, InvalidArgument, Unavailable

__all__ = ["Admission", "Gate", "admissions", "duration", "rpc", "rpc_stream", "timestamp"]

log = structlog.get_logger("cowbranchd.rpc")

Req = TypeVar("Req")
Resp = TypeVar("Resp")


class Gate:
    """Whether RPCs are served: closed while starting up and while draining;
    writes alone are held while the storage backend hangs."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._reason: str | None = "cowbranchd is starting up (reconciling storage); retry shortly"
        self._writes_held: str | None = None

    def hold_writes(self, reason: str | None) -> None:
        with self._lock:
            self._writes_held = reason

    def check_write(self) -> None:
        with self._lock:
            reason = self._writes_held
        if reason is not None:
            raise Unavailable(f"{reason}; retry later")

    def open(self) -> None:
        with self._lock:
            self._reason = None

    def close(self, reason: str) -> None:
        with self._lock:
            self._reason = reason

    def check(self) -> None:
        with self._lock:
            reason = self._reason
        if reason is not None:
            raise Unavailable(reason)


class Admission:
    """Bounded work of one kind: at most `running` calls at once and `queued`
    more waiting for a turn; beyond that UNAVAILABLE at once (the client
    library retries it with backoff), so slow work never takes every worker
    thread and reads, health included, keep answering."""

    def __init__(self, kind: str, running: int, queued: int) -> None:
        self.kind = kind
        self.running = running
        self.queued = queued
        self._turns = threading.BoundedSemaphore(running)
        self._lock = threading.Lock()
        self._inside = 0

    @contextlib.contextmanager
    def turn(self) -> Iterator[None]:
        with self._lock:
            if self._inside >= self.running + self.queued:
                raise Unavailable(
                    f"too many {self.kind} calls in flight ({self.running} running, "
                    f"{self.queued} queued): retry with backoff"
                )
            self._inside += 1
        try:
            deadline.acquire(self._turns, f"a turn among {self.kind} calls")
            try:
                yield
            finally:
                self._turns.release()
        finally:
            with self._lock:
                self._inside -= 1

    @property
    def in_flight(self) -> int:
        with self._lock:
            return self._inside


def admissions(running: int, queued: int) -> dict[str, Admission]:
    """One Admission per kind of slow work (reads are never queued)."""
    return {
        "branch writes": Admission("branch writes", running, queued),
        "base writes": Admission("base writes", max(1, running // 4), queued),
    }


# Which calls are slow work of which kind.
_KIND = {
    "CreateBranch": "branch writes",
    "DeleteBranch": "branch writes",
    "ResetBranch": "branch writes",
    "UpdateBranch": "branch writes",
    "CreateBase": "base writes",
    "CreateBaseVersion": "base writes",
    "DeleteBase": "base writes",
    "ImportBase": "base writes",
    "RefreshBase": "base writes",
    "DiffBranch": "branch writes",  # clones and starts the parent: slow work
}


def rpc(
    method: Callable[[Any, Req, grpc.ServicerContext], Resp],
) -> Callable[[Any, Req, grpc.ServicerContext], Resp]:
    """Gate, admit, bound by the caller's deadline, time, log, count (metrics)
    and translate errors for one servicer method. The servicer holds `gate`,
    `admission` and `metrics`."""
    name = method.__name__
    kind = _KIND.get(name)

    @functools.wraps(method)
    def wrapper(self: Any, request: Req, context: grpc.ServicerContext) -> Resp:
        started = time.perf_counter()
        fields = _log_fields(request)
        try:
            self.gate.check()
            with contextlib.ExitStack() as stack:
                stack.enter_context(deadline.scope(context.time_remaining()))
                if kind is not None:
                    self.gate.check_write()
                    stack.enter_context(self.admission[kind].turn())
                response = method(self, request, context)
        except CowbranchError as exc:
            _measure(self, name, exc.code.name, started)
            log.info(
                "rpc",
                method=name,
                code=exc.code.name,
                error=exc.message,
                ms=round((time.perf_counter() - started) * 1000, 2),
                **fields,
            )
            context.abort(exc.code, exc.message)
        except Exception as exc:
            _measure(self, name, "INTERNAL", started)
            log.exception(
                "rpc",
                method=name,
                code="INTERNAL",
                ms=round((time.perf_counter() - started) * 1000, 2),
                **fields,
            )
            context.abort(grpc.StatusCode.INTERNAL, f"internal error: {exc}")
        _measure(self, name, "OK", started)
        log.info(
            "rpc",
            method=name,
            code="OK",
            ms=round((time.perf_counter() - started) * 1000, 2),
            **fields,
        )
        return response

    return wrapper


def rpc_stream(
    method: Callable[[Any, Req, grpc.ServicerContext], Iterator[Resp]],
) -> Callable[[Any, Req, grpc.ServicerContext], Iterator[Resp]]:
    """`rpc` for a server-streaming method: gate, one log line, metrics and
    errors to status codes, also for errors raised midway through the stream.
    No admission turn and no deadline scope: a followed stream may last for
    hours, so the servicer bounds how many run at once and the method itself
    bounds every wait."""
    name = method.__name__

    @functools.wraps(method)
    def wrapper(self: Any, request: Req, context: grpc.ServicerContext) -> Iterator[Resp]:
        started = time.perf_counter()
        fields = _log_fields(request)
        code, error = "OK", ""
        try:
            self.gate.check()
            yield from method(self, request, context)
        except CowbranchError as exc:
            code, error = exc.code.name, exc.message
            context.abort(exc.code, exc.message)
        except GeneratorExit:  # the caller went away
            code = "CANCELLED"
            raise
        except Exception as exc:
            code, error = "INTERNAL", str(exc)
            log.exception("rpc_stream_failed", method=name, **fields)
            context.abort(grpc.StatusCode.INTERNAL, f"internal error: {exc}")
        finally:
            _measure(self, name, code, started)
            log.info(
                "rpc",
                method=name,
                code=code,
                **({"error": error} if error else {}),
                ms=round((time.perf_counter() - started) * 1000, 2),
                **fields,
            )

    return wrapper


def _measure(servicer: Any, method: str, code: str, started: float) -> None:
    """Count the call in the daemon's metrics (every servicer holds `metrics`)."""
    servicer.metrics.rpc_done(method, code, time.perf_counter() - started)


def _log_fields(request: object) -> dict[str, str]:
    fields: dict[str, str] = {}
    for attr in ("request_id", "branch_id", "base_id", "parent", "name"):
        value = getattr(request, attr, "")
        if isinstance(value, str) and value:
            fields[attr] = value[:128]
    return fields


def timestamp(value: datetime | None) -> timestamp_pb2.Timestamp | None:
    if value is None:
        return None
    ts = timestamp_pb2.Timestamp()
    ts.FromDatetime(value.astimezone(UTC))
    return ts


def duration(field_name: str, message: duration_pb2.Duration) -> timedelta:
    if message.seconds < 0 or message.nanos < 0:
        raise InvalidArgument(field_name, "must not be negative")
    if message.seconds > 10 * 365 * 86400:
        raise InvalidArgument(field_name, "is too long")
    return timedelta(seconds=message.seconds, microseconds=message.nanos // 1000)
