"""Plain values of the client side: `Branch`, `Base`, `BaseVersion`, converted
from the protos once, plus the small pure helpers every client shares
(durations like `30m`, label selectors, resource names, label sanitizing).

This module talks to nobody: no channel, no daemon. The sync client, the async
client, cowbranchctl and the pytest plugin all build on it, so each rule lives
here exactly once.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from types import MappingProxyType
from typing import TYPE_CHECKING, Any

import grpc
from google.protobuf import timestamp_pb2

from cowbranchd.errors import InvalidArgument, error_for_code
from cowbranchd.v1 import bases_pb2, branches_pb2, operations_pb2

if TYPE_CHECKING:
    import psycopg
    from psycopg.rows import TupleRow

__all__ = [
    "Base",
    "BaseVersion",
    "Branch",
    "BranchDiff",
    "DurationLike",
    "Operation",
    "SelectorLike",
    "base_name",
    "branch_name",
    "format_duration",
    "format_selector",
    "parse_duration",
    "sanitize_label_value",
]

DurationLike = timedelta | int | float | str
"""A duration: a timedelta, seconds as a number, or text like `90s`, `30m`, `2h`, `1d`, `1h30m`."""

SelectorLike = str | Mapping[str, str] | None
"""A label selector: `key=value,key!=value,key` text, or a mapping of `key=value` terms."""

_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}
_DURATION_PART = re.compile(r"(\d+(?:\.\d+)?)([smhdw])")
_SELECTOR_TERM = re.compile(r"^[a-z][a-z0-9_.-]{0,62}(?:(?:=|!=)[A-Za-z0-9_.-]{0,63})?$")
_LABEL_VALUE_BAD = re.compile(r"[^A-Za-z0-9_.-]+")


def parse_duration(value: DurationLike, *, field: str = "ttl") -> timedelta:
    """`value` as a timedelta; text is `<number><unit>` parts with units s, m, h, d, w.

    A bare number is seconds. Negative durations are refused (InvalidArgument
    naming `field`).
    """
    if isinstance(value, timedelta):
        result = value
    elif isinstance(value, int | float) and not isinstance(value, bool):
        result = timedelta(seconds=value)
    elif isinstance(value, str):
        text = value.strip().lower().replace(" ", "")
        if re.fullmatch(r"\d+(?:\.\d+)?", text):
            result = timedelta(seconds=float(text))
        elif text and _DURATION_PART.sub("", text) == "":
            seconds = sum(float(n) * _UNITS[u] for n, u in _DURATION_PART.findall(text))
            result = timedelta(seconds=seconds)
        else:
            raise InvalidArgument(
                field, f"{value!r} is not a duration; use e.g. 90s, 30m, 2h, 1d or 1h30m"
            )
    else:
        raise InvalidArgument(field, f"{value!r} is not a duration")
    if result < timedelta(0):
        raise InvalidArgument(field, f"{value!r} is negative")
    return result


def format_duration(value: timedelta) -> str:
    """`value` in the compact form parse_duration reads (`1d2h`, `30m`, `0s`), whole seconds."""
    seconds = int(value.total_seconds())
    sign, seconds = ("-", -seconds) if seconds < 0 else ("", seconds)
    parts = []
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60), ("s", 1)):
        count, seconds = divmod(seconds, size)
        if count:
            parts.append(f"{count}{unit}")
    return sign + ("".join(parts) or "0s")


def format_selector(selector: SelectorLike) -> str:
    """The wire form of a label selector, checked term by term.

    A mapping becomes `k1=v1,k2=v2` (sorted, so the same mapping always gives
    the same text); text is stripped and checked. Empty or None selects everything.
    """
    if selector is None:
        return ""
    if isinstance(selector, Mapping):
        terms = [f"{k}={v}" for k, v in sorted(selector.items())]
    else:
        terms = [t.strip() for t in selector.split(",") if t.strip()]
    for term in terms:
        if not _SELECTOR_TERM.match(term):
            raise InvalidArgument("label_selector", f"{term!r} is not key, key=value or key!=value")
    return ",".join(terms)


def sanitize_label_value(text: str, *, limit: int = 63) -> str:
    """`text` squeezed into a label value: other characters become `_`, at most `limit` chars.

    Over-long text keeps its end (the most specific part of a pytest node id)
    behind a `..` marker.
    """
    cleaned = _LABEL_VALUE_BAD.sub("_", text).strip("_")
    if len(cleaned) > limit:
        cleaned = ".." + cleaned[-(limit - 2) :]
    return cleaned


def branch_name(name_or_id: str) -> str:
    """`branches/{id}` for a bare id or an already full name."""
    return name_or_id if name_or_id.startswith("branches/") else f"branches/{name_or_id}"


def base_name(name_or_id: str) -> str:
    """`bases/{id}` for a bare id or an already full name (versions are kept as given)."""
    return name_or_id if name_or_id.startswith("bases/") else f"bases/{name_or_id}"


def _time(message: Any, field_name: str) -> datetime | None:
    if not message.HasField(field_name):
        return None
    stamp: timestamp_pb2.Timestamp = getattr(message, field_name)
    return stamp.ToDatetime(tzinfo=UTC)


def _iso(value: datetime | None) -> str | None:
    return None if value is None else value.isoformat().replace("+00:00", "Z")


@dataclass(frozen=True)
class Branch:
    """A branch as the daemon last described it: a writable PostgreSQL clone."""

    name: str
    parent: str
    state: str
    host: str
    port: int
    user: str
    password: str = field(repr=False)
    database: str
    socket_dir: str
    dsn: str = field(repr=False)
    labels: Mapping[str, str]
    create_time: datetime | None
    expire_time: datetime | None
    protected: bool
    written_bytes: int
    request_id: str
    failure: str
    owner: str = "admin"
    # None: never suspended when idle.
    idle_suspend: timedelta | None = None
    # A template (FreezeBranch): its children clone its frozen data.
    frozen: bool = False

    @property
    def branch_id(self) -> str:
        """The id part of `name` (`branches/{branch_id}`)."""
        return self.name.removeprefix("branches/")

    @classmethod
    def from_proto(cls, message: branches_pb2.Branch) -> Branch:
        """The value of a `cowbranchd.v1.Branch` message."""
        conn = message.connection
        return cls(
            name=message.name,
            parent=message.parent,
            state=branches_pb2.Branch.State.Name(message.state),
            host=conn.host,
            port=conn.port,
            user=conn.user,
            password=conn.password,
            database=conn.database,
            socket_dir=conn.socket_dir,
            dsn=conn.dsn,
            labels=MappingProxyType(dict(message.labels)),
            create_time=_time(message, "create_time"),
            expire_time=_time(message, "expire_time"),
            protected=message.protected,
            written_bytes=message.written_bytes,
            request_id=message.request_id,
            failure=message.failure,
            owner=message.owner or "admin",
            idle_suspend=message.idle_suspend.ToTimedelta() or None
            if message.HasField("idle_suspend")
            else None,
            frozen=message.frozen,
        )

    def connection_kwargs(self, *, via_socket: bool = False) -> dict[str, Any]:
        """Keyword arguments for `psycopg.connect`: host, port, user, password, dbname.

        `via_socket` connects through the branch's Unix socket directory, which
        only works on the daemon's host; the default is TCP, like `dsn`.
        """
        return {
            "host": self.socket_dir if via_socket else self.host,
            "port": self.port,
            "user": self.user,
            "password": self.password,
            "dbname": self.database,
        }

    def connect(self, **kwargs: Any) -> psycopg.Connection[TupleRow]:
        """A new psycopg connection to this branch; `kwargs` go to `psycopg.connect`."""
        import psycopg  # noqa: PLC0415 - psycopg is only needed by callers who connect

        return psycopg.connect(**{**self.connection_kwargs(), **kwargs})

    async def connect_async(self, **kwargs: Any) -> psycopg.AsyncConnection[TupleRow]:
        """A new psycopg AsyncConnection to this branch; `kwargs` go to its `connect`."""
        import psycopg  # noqa: PLC0415

        return await psycopg.AsyncConnection.connect(**{**self.connection_kwargs(), **kwargs})

    def to_dict(self) -> dict[str, Any]:
        """The stable JSON form (see docs/clients.md, "JSON output")."""
        return {
            "name": self.name,
            "branch_id": self.branch_id,
            "parent": self.parent,
            "state": self.state,
            "connection": {
                "host": self.host,
                "port": self.port,
                "user": self.user,
                "password": self.password,
                "database": self.database,
                "socket_dir": self.socket_dir,
                "dsn": self.dsn,
            },
            "labels": dict(sorted(self.labels.items())),
            "create_time": _iso(self.create_time),
            "expire_time": _iso(self.expire_time),
            "protected": self.protected,
            "written_bytes": self.written_bytes,
            "request_id": self.request_id,
            "failure": self.failure,
            "owner": self.owner,
            "idle_suspend_seconds": self.idle_suspend.total_seconds()
            if self.idle_suspend
            else None,
            "frozen": self.frozen,
        }


@dataclass(frozen=True)
class BaseVersion:
    """One immutable snapshot of a base (`bases/{base}/versions/{n}`)."""

    name: str
    version: int
    create_time: datetime | None
    branch_count: int

    @classmethod
    def from_proto(cls, message: bases_pb2.BaseVersion) -> BaseVersion:
        """The value of a `cowbranchd.v1.BaseVersion` message."""
        return cls(
            name=message.name,
            version=message.version,
            create_time=_time(message, "create_time"),
            branch_count=message.branch_count,
        )

    def to_dict(self) -> dict[str, Any]:
        """The stable JSON form."""
        return {
            "name": self.name,
            "version": self.version,
            "create_time": _iso(self.create_time),
            "branch_count": self.branch_count,
        }


@dataclass(frozen=True)
class Base:
    """A base: a golden PostgreSQL data directory with numbered versions."""

    name: str
    pg_version: int
    versions: tuple[BaseVersion, ...]
    create_time: datetime | None
    labels: Mapping[str, str]
    size_bytes: int
    user: str
    database: str
    branch_role: str = ""
    roles: tuple[str, ...] = ()

    @property
    def base_id(self) -> str:
        """The id part of `name` (`bases/{base_id}`)."""
        return self.name.removeprefix("bases/")

    @property
    def latest_version(self) -> BaseVersion | None:
        """The newest version, or None for a base without any."""
        return max(self.versions, key=lambda v: v.version, default=None)

    @classmethod
    def from_proto(cls, message: bases_pb2.Base) -> Base:
        """The value of a `cowbranchd.v1.Base` message."""
        return cls(
            name=message.name,
            pg_version=message.pg_version,
            versions=tuple(BaseVersion.from_proto(v) for v in message.versions),
            create_time=_time(message, "create_time"),
            labels=MappingProxyType(dict(message.labels)),
            size_bytes=message.size_bytes,
            user=message.user,
            database=message.database,
            branch_role=message.branch_role,
            roles=tuple(message.roles),
        )

    def to_dict(self) -> dict[str, Any]:
        """The stable JSON form."""
        return {
            "name": self.name,
            "base_id": self.base_id,
            "pg_version": self.pg_version,
            "versions": [v.to_dict() for v in self.versions],
            "create_time": _iso(self.create_time),
            "labels": dict(sorted(self.labels.items())),
            "size_bytes": self.size_bytes,
            "user": self.user,
            "database": self.database,
            "branch_role": self.branch_role,
            "roles": list(self.roles),
        }


@dataclass(frozen=True)
class Operation:
    """A long-running operation (an import or a refresh) as last seen."""

    name: str
    target: str
    done: bool
    phase: str
    bytes_done: int
    bytes_total: int
    start_time: datetime | None
    end_time: datetime | None
    error_code: int
    error_message: str
    result: str
    owner: str

    @classmethod
    def from_proto(cls, message: operations_pb2.Operation) -> Operation:
        """The value of a `cowbranchd.v1.Operation` message."""
        return cls(
            name=message.name,
            target=message.target,
            done=message.done,
            phase=message.phase,
            bytes_done=message.bytes_done,
            bytes_total=message.bytes_total,
            start_time=_time(message, "start_time"),
            end_time=_time(message, "end_time"),
            error_code=message.error_code,
            error_message=message.error_message,
            result=message.result,
            owner=message.owner,
        )

    @property
    def failed(self) -> bool:
        return self.done and self.error_code != 0

    def raise_if_failed(self) -> None:
        """Raise the error a failed operation ended with, as the class a call
        failing with the same status raises (`except Cancelled`, ...)."""
        if self.failed:
            code = next(
                (c for c in grpc.StatusCode if c.value[0] == self.error_code),
                grpc.StatusCode.UNKNOWN,
            )
            raise error_for_code(code, self.error_message)

    def to_dict(self) -> dict[str, Any]:
        """The stable JSON form."""
        return {
            "name": self.name,
            "target": self.target,
            "done": self.done,
            "phase": self.phase,
            "bytes_done": self.bytes_done,
            "bytes_total": self.bytes_total,
            "start_time": _iso(self.start_time),
            "end_time": _iso(self.end_time),
            "error_code": self.error_code,
            "error_message": self.error_message,
            "result": self.result,
            "owner": self.owner,
        }


@dataclass(frozen=True)
class BranchDiff:
    """What a branch changed since it was made: a unified diff of its schema
    against its parent's, and per table the rows inserted, updated, deleted."""

    name: str
    parent: str
    schema_diff: str
    tables: tuple[dict[str, Any], ...]

    @classmethod
    def from_proto(cls, message: branches_pb2.BranchDiff) -> BranchDiff:
        """The value of a `cowbranchd.v1.BranchDiff` message."""
        return cls(
            name=message.name,
            parent=message.parent,
            schema_diff=message.schema_diff,
            tables=tuple(
                {
                    "database": t.database,
                    "schema": t.schema,
                    "table": t.table,
                    "inserted": t.inserted,
                    "updated": t.updated,
                    "deleted": t.deleted,
                }
                for t in message.tables
            ),
        )

    def to_dict(self) -> dict[str, Any]:
        """The stable JSON form."""
        return {
            "name": self.name,
            "parent": self.parent,
            "schema_diff": self.schema_diff,
            "tables": list(self.tables),
        }
