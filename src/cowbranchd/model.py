"""Names, records and states of bases and branches, and the validation of
everything a client can send (ids, parents, selectors, labels, TTLs).

Pure logic: no I/O, no storage, no gRPC. Records convert to and from the
str->str metadata that storage drivers keep on each volume, which is how the
inventory survives crashes and restarts.
"""

from __future__ import annotations

import enum
import json
import re
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime, timedelta

from .errors import InvalidArgument

__all__ = [
    "META_SUPERSEDED",
    "META_WARM",
    "BaseRecord",
    "BranchRecord",
    "Parent",
    "Selector",
    "State",
    "meta_patch",
    "parse_parent",
    "validate_id",
    "validate_idle_suspend",
    "validate_labels",
    "validate_request_id",
    "validate_role",
    "validate_ttl",
]

ID_RE = re.compile(r"^[a-z][a-z0-9-]{0,62}$")
LABEL_KEY_RE = re.compile(r"^[a-z][a-z0-9_.-]{0,62}$")
LABEL_VALUE_RE = re.compile(r"^[A-Za-z0-9_.:/-]{0,63}$")
REQUEST_ID_RE = re.compile(r"^[\x21-\x7e]{1,128}$")
# A PostgreSQL role name (63 bytes at most); quoted wherever it is used.
ROLE_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_$-]{0,62}$")
MAX_LABELS = 32
MAX_TTL = timedelta(days=365)


class State(enum.Enum):
    CREATING = "creating"
    READY = "ready"
    STOPPED = "stopped"
    FAILED = "failed"
    DELETING = "deleting"
    # Its postgres stopped while idle; the daemon holds its port and starts
    # it again on the first connection (daemon/suspend.py).
    SUSPENDED = "suspended"


def _shown(value: str) -> str:
    """A caller's string as an error message may quote it: at most 80 characters."""
    return value if len(value) <= 80 else value[:77] + "..."


def validate_id(field_name: str, value: str) -> str:
    if not ID_RE.match(value):
        raise InvalidArgument(
            field_name,
            f"{_shown(value)!r} is not a valid id: use 1-63 characters of a-z, 0-9 and '-', "
            "starting with a letter",
        )
    return value


def validate_request_id(value: str) -> str:
    if value and not REQUEST_ID_RE.match(value):
        raise InvalidArgument("request_id", "must be 1-128 printable ASCII characters, no spaces")
    return value


def validate_role(field_name: str, value: str) -> str:
    if value and not ROLE_RE.match(value):
        raise InvalidArgument(
            field_name,
            f"{_shown(value)!r} is not a role name: 1-63 characters of letters, digits, '_', '$' "
            "and '-', starting with a letter or '_'",
        )
    return value


def validate_labels(field_name: str, labels: Mapping[str, str]) -> dict[str, str]:
    if len(labels) > MAX_LABELS:
        raise InvalidArgument(field_name, f"at most {MAX_LABELS} labels, got {len(labels)}")
    for key, value in labels.items():
        if not LABEL_KEY_RE.match(key):
            raise InvalidArgument(
                field_name,
                f"label key {key[:80]!r} is invalid: 1-63 characters of a-z, 0-9, '_', '.', '-', "
                "starting with a letter",
            )
        if not LABEL_VALUE_RE.match(value):
            raise InvalidArgument(
                field_name,
                f"label {key}={value[:80]!r}: values are at most 63 characters of "
                "A-Z, a-z, 0-9, '_', '.', ':', '/', '-'",
            )
    return dict(labels)


def validate_ttl(field_name: str, ttl: timedelta | None) -> timedelta | None:
    """None or zero means no expiry."""
    if ttl is None or ttl == timedelta(0):
        return None
    if ttl < timedelta(0):
        raise InvalidArgument(field_name, "must not be negative")
    if ttl > MAX_TTL:
        raise InvalidArgument(field_name, f"must be at most {MAX_TTL.days} days")
    return ttl


def validate_idle_suspend(field_name: str, value: timedelta | None) -> timedelta | None:
    """None or zero means never suspend."""
    if value is None or value == timedelta(0):
        return None
    if value < timedelta(seconds=1):
        raise InvalidArgument(field_name, "must be zero (never) or at least 1s")
    if value > MAX_TTL:
        raise InvalidArgument(field_name, f"must be at most {MAX_TTL.days} days")
    return value


@dataclass(frozen=True)
class Parent:
    """What a branch comes from: a base version, or another branch."""

    base: str | None = None
    version: int | None = None  # None with a base: its latest version
    branch: str | None = None

    def __str__(self) -> str:
        if self.branch is not None:
            return f"branches/{self.branch}"
        if self.version is None:
            return f"bases/{self.base}"
        return f"bases/{self.base}/versions/{self.version}"


def parse_parent(field_name: str, value: str) -> Parent:
    parts = value.split("/")
    if len(parts) == 2 and parts[0] == "bases":
        return Parent(base=validate_id(field_name, parts[1]))
    if len(parts) == 4 and parts[0] == "bases" and parts[2] == "versions":
        base = validate_id(field_name, parts[1])
        if not parts[3].isdigit() or not 0 < int(parts[3]) < 1_000_000:
            raise InvalidArgument(field_name, f"version {parts[3][:20]!r} is not a positive number")
        return Parent(base=base, version=int(parts[3]))
    if len(parts) == 2 and parts[0] == "branches":
        return Parent(branch=validate_id(field_name, parts[1]))
    shown = value if len(value) <= 80 else value[:77] + "..."
    raise InvalidArgument(
        field_name,
        f"{shown!r} is not bases/{{base}}, bases/{{base}}/versions/{{n}} or branches/{{branch}}",
    )


def parse_name(field_name: str, value: str, collection: str) -> str:
    """`branches/x` (or a bare `x`) -> `x`, validated."""
    prefix = collection + "/"
    return validate_id(field_name, value.removeprefix(prefix))


@dataclass(frozen=True)
class Selector:
    """A label selector: `key=value,key!=value,key,!key`; all terms must hold."""

    equal: tuple[tuple[str, str], ...] = ()
    not_equal: tuple[tuple[str, str], ...] = ()
    present: tuple[str, ...] = ()
    absent: tuple[str, ...] = ()

    @classmethod
    def parse(cls, text: str, field_name: str = "label_selector") -> Selector:
        if len(text) > 4096:
            raise InvalidArgument(field_name, "longer than 4096 characters")
        equal: list[tuple[str, str]] = []
        not_equal: list[tuple[str, str]] = []
        present: list[str] = []
        absent: list[str] = []
        for raw in text.split(","):
            term = raw.strip()
            if not term:
                if text.strip():
                    raise InvalidArgument(field_name, f"empty term in {text[:80]!r}")
                continue
            if "!=" in term:
                key, value = (s.strip() for s in term.split("!=", 1))
                not_equal.append(
                    (_selector_key(field_name, key), _selector_value(field_name, value))
                )
            elif "=" in term:
                key, value = (s.strip() for s in term.split("=", 1))
                value = value.removeprefix("=").strip()  # accept `==`
                equal.append((_selector_key(field_name, key), _selector_value(field_name, value)))
            elif term.startswith("!"):
                absent.append(_selector_key(field_name, term[1:].strip()))
            else:
                present.append(_selector_key(field_name, term))
        return cls(tuple(equal), tuple(not_equal), tuple(present), tuple(absent))

    def matches(self, labels: Mapping[str, str]) -> bool:
        return (
            all(labels.get(k) == v for k, v in self.equal)
            and all(labels.get(k) != v for k, v in self.not_equal)
            and all(k in labels for k in self.present)
            and all(k not in labels for k in self.absent)
        )


def _selector_key(field_name: str, key: str) -> str:
    if not LABEL_KEY_RE.match(key):
        raise InvalidArgument(field_name, f"{key[:80]!r} is not a valid label key")
    return key


def _selector_value(field_name: str, value: str) -> str:
    if not LABEL_VALUE_RE.match(value):
        raise InvalidArgument(field_name, f"{value[:80]!r} is not a valid label value")
    return value


def _ts(value: datetime | None) -> str:
    return "" if value is None else value.astimezone(UTC).isoformat()


def _parse_ts(value: str) -> datetime | None:
    return datetime.fromisoformat(value) if value else None


def _seconds(value: timedelta | None) -> str:
    return f"{value.total_seconds():g}" if value else ""


def _parse_seconds(value: str) -> timedelta | None:
    return timedelta(seconds=float(value)) if value and float(value) > 0 else None


@dataclass(frozen=True)
class BranchRecord:
    """A branch as stored in its volume's metadata (runtime facts excluded)."""

    branch_id: str
    base_id: str  # the base at the root of its ancestry (credentials, PG version)
    parent: str  # canonical: bases/x/versions/n or branches/y
    source_snapshot: str  # the storage snapshot it was cloned from, e.g. "bases/x@v1"
    state: State
    create_time: datetime
    port: int
    labels: dict[str, str] = field(default_factory=dict)
    expire_time: datetime | None = None
    protected: bool = False
    request_id: str = ""
    settings: dict[str, str] = field(default_factory=dict)
    failure: str = ""
    # How often it was reset: each reset clones a new volume, and the one
    # with the highest count is the branch if a crash left two.
    resets: int = 0
    # The OS user (and group) its postmaster runs as; 0: the shared os_user.
    uid: int = 0
    # The most its own writes may take on storage (its volume's limit); 0: none.
    max_bytes: int = 0
    # Who created it (a tenant's name or "admin"); "": made before owners
    # existed, the admin's.
    owner: str = ""
    # The database role its connection hands out; "": the base's branch role.
    role: str = ""
    # Stop its postgres after this long without a client connection; None: never.
    idle_suspend: timedelta | None = None
    # The snapshot of its own volume every child clones once it is frozen
    # (FreezeBranch: a template), e.g. "f-3a9c0e"; "": not frozen.
    frozen: str = ""

    def to_meta(self) -> dict[str, str]:
        return {
            "state": self.state.value,
            "id": self.branch_id,
            "resets": str(self.resets),
            "base": self.base_id,
            "parent": self.parent,
            "source": self.source_snapshot,
            "created": _ts(self.create_time),
            "expires": _ts(self.expire_time),
            "port": str(self.port),
            "labels": json.dumps(self.labels, sort_keys=True, separators=(",", ":")),
            "protected": "true" if self.protected else "false",
            "request_id": self.request_id,
            "settings": json.dumps(self.settings, sort_keys=True, separators=(",", ":")),
            "failure": self.failure[:500],
            "uid": str(self.uid) if self.uid else "",
            "max_bytes": str(self.max_bytes) if self.max_bytes else "",
            "owner": self.owner,
            "role": self.role,
            "idle_suspend": _seconds(self.idle_suspend),
            "frozen": self.frozen,
        }

    @classmethod
    def from_meta(cls, volume: str, meta: Mapping[str, str]) -> BranchRecord:
        return cls(
            branch_id=meta.get("id") or volume,
            base_id=meta.get("base", ""),
            parent=meta.get("parent", ""),
            source_snapshot=meta.get("source", ""),
            state=State(meta.get("state", "creating")),
            create_time=_parse_ts(meta.get("created", "")) or datetime.fromtimestamp(0, UTC),
            port=int(meta.get("port") or 0),
            labels=json.loads(meta.get("labels") or "{}"),
            expire_time=_parse_ts(meta.get("expires", "")),
            protected=meta.get("protected") == "true",
            request_id=meta.get("request_id", ""),
            settings=json.loads(meta.get("settings") or "{}"),
            failure=meta.get("failure", ""),
            resets=int(meta.get("resets") or 0),
            uid=int(meta.get("uid") or 0),
            max_bytes=int(meta.get("max_bytes") or 0),
            owner=meta.get("owner", ""),
            role=meta.get("role", ""),
            idle_suspend=_parse_seconds(meta.get("idle_suspend", "")),
            frozen=meta.get("frozen", ""),
        )

    def evolve(self, **changes: object) -> BranchRecord:
        return replace(self, **changes)  # type: ignore[arg-type]


@dataclass(frozen=True)
class BaseRecord:
    """A base as stored in its volume's metadata."""

    base_id: str
    state: State
    create_time: datetime
    pg_version: int
    user: str
    database: str
    labels: dict[str, str] = field(default_factory=dict)
    size_bytes: int = 0
    # Empty for every base made now: its password is derived from the daemon
    # key (Context.base_password), never stored. Bases made before that kept
    # theirs in metadata, and still work with it.
    password: str = field(default="", repr=False)  # of its data directory, as of the latest version
    # version number -> creation time; the storage snapshot of version n is `v<n>`
    versions: dict[int, datetime] = field(default_factory=dict)
    # The role branches hand out by default ("": `user`, the superuser), and
    # the other roles a CreateBranch may ask for.
    branch_role: str = ""
    roles: tuple[str, ...] = ()
    # version -> how it was imported (source without secrets, transform
    # hashes, times, bytes, PostgreSQL version); versions not imported have none.
    provenance: dict[int, dict[str, object]] = field(default_factory=dict)

    def role_for(self, requested: str) -> str:
        """The role a branch asking for `requested` ("": the default) gets."""
        default = self.branch_role or self.user
        if not requested or requested == default:
            return default
        if requested not in self.roles:
            allowed = ", ".join(sorted({default, *self.roles}))
            raise InvalidArgument(
                "role", f"bases/{self.base_id} hands out only these roles: {allowed}"
            )
        return requested

    @property
    def latest_version(self) -> int | None:
        return max(self.versions) if self.versions else None

    def to_meta(self) -> dict[str, str]:
        return {
            "state": self.state.value,
            "created": _ts(self.create_time),
            "pg_version": str(self.pg_version),
            "user": self.user,
            **({"password": self.password} if self.password else {}),
            "database": self.database,
            "labels": json.dumps(self.labels, sort_keys=True, separators=(",", ":")),
            "size_bytes": str(self.size_bytes),
            "versions": json.dumps(
                {str(n): _ts(t) for n, t in sorted(self.versions.items())},
                separators=(",", ":"),
            ),
            "branch_role": self.branch_role,
            "roles": ",".join(self.roles),
            "provenance": json.dumps(
                {str(n): p for n, p in sorted(self.provenance.items())},
                sort_keys=True,
                separators=(",", ":"),
            )
            if self.provenance
            else "",
        }

    @classmethod
    def from_meta(cls, base_id: str, meta: Mapping[str, str]) -> BaseRecord:
        raw_versions: dict[str, str] = json.loads(meta.get("versions") or "{}")
        return cls(
            base_id=base_id,
            state=State(meta.get("state", "creating")),
            create_time=_parse_ts(meta.get("created", "")) or datetime.fromtimestamp(0, UTC),
            pg_version=int(meta.get("pg_version") or 0),
            user=meta.get("user", "postgres"),
            password=meta.get("password", ""),
            database=meta.get("database", "postgres"),
            labels=json.loads(meta.get("labels") or "{}"),
            size_bytes=int(meta.get("size_bytes") or 0),
            versions={
                int(n): _parse_ts(t) or datetime.fromtimestamp(0, UTC)
                for n, t in raw_versions.items()
            },
            branch_role=meta.get("branch_role", ""),
            roles=tuple(r for r in meta.get("roles", "").split(",") if r),
            provenance={
                int(n): p for n, p in json.loads(meta.get("provenance") or "{}").items()
            },
        )

    def evolve(self, **changes: object) -> BaseRecord:
        return replace(self, **changes)  # type: ignore[arg-type]


# Flags of a branch volume that are not facts of a branch record.
META_WARM = "warm"  # "1": a started clone waiting to be handed out, not a branch yet
META_SUPERSEDED = "superseded"  # "1": a reset replaced this volume; it is never the branch


def meta_patch(before: BranchRecord, after: BranchRecord) -> dict[str, str]:
    """The metadata to write to turn a volume holding `before` into one holding
    `after`: only keys that differ (on ZFS each key is a command; "" removes)."""
    old = before.to_meta()
    return {k: v for k, v in after.to_meta().items() if old.get(k, "") != v}


def now() -> datetime:
    return datetime.now(UTC)
