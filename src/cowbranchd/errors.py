"""The one error tree of cowbranchd, shared by the daemon and its clients.

Every class carries the gRPC status code it stands for. The daemon raises
these; the servicer translates them to a status at the edge (anything else is
INTERNAL and logged); the client library translates a status back into the
same class, so `except NotFound` reads the same on both sides::

    CowbranchError
    ├── InvalidArgument       INVALID_ARGUMENT     (bad id, selector, ttl, path, setting)
    ├── NotFound              NOT_FOUND
    ├── AlreadyExists         ALREADY_EXISTS
    ├── ResourceExhausted     RESOURCE_EXHAUSTED   (ports, disk, branch slots)
    ├── FailedPrecondition    FAILED_PRECONDITION  (dirty base, base in use, protected)
    ├── PermissionDenied      PERMISSION_DENIED    (outside import roots, unreadable source)
    ├── Unavailable           UNAVAILABLE          (starting up, draining, unreachable)
    ├── DeadlineExceeded      DEADLINE_EXCEEDED
    ├── Unauthenticated       UNAUTHENTICATED
    ├── Cancelled             CANCELLED            (a long-running operation was cancelled)
    └── Internal              INTERNAL
        ├── CommandError      an external command failed (argv, exit code, stderr)
        ├── StorageError      the copy-on-write pool misbehaved
        └── PostgresError     postgres failed to start or stop (log tail)

This module may not import anything of the daemon: clients import it too.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import ClassVar

import grpc

__all__ = [
    "AlreadyExists",
    "Cancelled",
    "CommandError",
    "CowbranchError",
    "DeadlineExceeded",
    "FailedPrecondition",
    "Internal",
    "InvalidArgument",
    "NotFound",
    "PermissionDenied",
    "PostgresError",
    "ResourceExhausted",
    "StorageError",
    "Unauthenticated",
    "Unavailable",
    "error_for_code",
]


class CowbranchError(Exception):
    """Base of every cowbranchd error; `code` is its gRPC status."""

    code: ClassVar[grpc.StatusCode] = grpc.StatusCode.INTERNAL

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class InvalidArgument(CowbranchError):
    """A request field is malformed; the message names the field."""

    code = grpc.StatusCode.INVALID_ARGUMENT

    def __init__(self, field: str, problem: str) -> None:
        super().__init__(f"{field}: {problem}" if field else problem)
        self.field = field
        self.problem = problem


class NotFound(CowbranchError):
    code = grpc.StatusCode.NOT_FOUND


class AlreadyExists(CowbranchError):
    code = grpc.StatusCode.ALREADY_EXISTS


class ResourceExhausted(CowbranchError):
    code = grpc.StatusCode.RESOURCE_EXHAUSTED


class FailedPrecondition(CowbranchError):
    code = grpc.StatusCode.FAILED_PRECONDITION


class PermissionDenied(CowbranchError):
    """The caller may not do this, or may not read what it named."""

    code = grpc.StatusCode.PERMISSION_DENIED


class Unavailable(CowbranchError):
    code = grpc.StatusCode.UNAVAILABLE


class DeadlineExceeded(CowbranchError):
    code = grpc.StatusCode.DEADLINE_EXCEEDED


class Unauthenticated(CowbranchError):
    code = grpc.StatusCode.UNAUTHENTICATED


class Cancelled(CowbranchError):
    """Work was cancelled at the caller's request; nothing of it is left."""

    code = grpc.StatusCode.CANCELLED


class Internal(CowbranchError):
    code = grpc.StatusCode.INTERNAL


class CommandError(Internal):
    """An external command exited non-zero; carries argv, exit code and stderr."""

    def __init__(self, argv: Sequence[str], returncode: int, stderr: str) -> None:
        self.argv = tuple(argv)
        self.returncode = returncode
        self.stderr = stderr.strip()
        super().__init__(
            f"command {' '.join(self.argv)!s} exited {returncode}: {self.stderr or '(no stderr)'}"
        )


class StorageError(Internal):
    """The pool is missing, of the wrong kind, or an operation on it failed."""


class PostgresError(Internal):
    """A branch's postgres failed; `log_tail` holds the end of its log."""

    def __init__(self, message: str, log_tail: str = "") -> None:
        self.log_tail = log_tail
        full = f"{message}\n--- postgres log (tail) ---\n{log_tail}" if log_tail else message
        super().__init__(full)


_BY_CODE: dict[grpc.StatusCode, type[CowbranchError]] = {
    cls.code: cls
    for cls in (
        InvalidArgument,
        NotFound,
        AlreadyExists,
        ResourceExhausted,
        FailedPrecondition,
        PermissionDenied,
        Unavailable,
        DeadlineExceeded,
        Unauthenticated,
        Cancelled,
        Internal,
    )
}


def error_for_code(code: grpc.StatusCode, message: str) -> CowbranchError:
    """The error instance a client raises for a status `code` with `message`."""
    cls = _BY_CODE.get(code, CowbranchError)
    if cls is InvalidArgument:
        return InvalidArgument("", message)
    err = cls(message)
    if cls is CowbranchError:
        err.message = f"{code.name}: {message}"
    return err
