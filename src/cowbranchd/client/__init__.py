"""The Python client library of cowbranchd: `Client` (sync) and `AsyncClient`
(asyncio), the `Branch`/`Base` values they return, and the error tree.

    with Client() as client:                     # COWBRANCHD_ADDRESS or the default socket
        with client.branch(parent="bases/shop") as branch:
            with branch.connect() as conn:       # a psycopg connection
                conn.execute("select 1")
        # the branch is deleted here

Errors are the classes of `cowbranchd.errors` (`NotFound`, `AlreadyExists`,
`Unavailable`, ...), raised `from` the grpc error. Only UNAVAILABLE is retried
(backoff with jitter, see `RetryPolicy`); creates always carry a request id,
so a retried create returns the branch the first attempt made.

This module speaks gRPC only; it may not import daemon code.
"""

from __future__ import annotations

from cowbranchd.errors import (
    AlreadyExists,
    CowbranchError,
    DeadlineExceeded,
    FailedPrecondition,
    Internal,
    InvalidArgument,
    NotFound,
    ResourceExhausted,
    Unauthenticated,
    Unavailable,
)

from .aio import AsyncClient, AsyncLease
from .sync import Client, Lease
from .transport import DEFAULT_ADDRESS, RetryPolicy
from .types import (
    Base,
    BaseVersion,
    Branch,
    DurationLike,
    SelectorLike,
    format_duration,
    format_selector,
    parse_duration,
)

__all__ = [
    "DEFAULT_ADDRESS",
    "AlreadyExists",
    "AsyncClient",
    "AsyncLease",
    "Base",
    "BaseVersion",
    "Branch",
    "Client",
    "CowbranchError",
    "DeadlineExceeded",
    "DurationLike",
    "FailedPrecondition",
    "Internal",
    "InvalidArgument",
    "Lease",
    "NotFound",
    "ResourceExhausted",
    "RetryPolicy",
    "SelectorLike",
    "Unauthenticated",
    "Unavailable",
    "format_duration",
    "format_selector",
    "parse_duration",
]
