"""The daemon's configuration: a TOML file read once at start into a frozen,
validated dataclass. Every key has a default; unknown keys are errors, so a
typo never silently falls back to a default.

See docs/configuration.md for every key. This module does no I/O beyond
reading the file.
"""

from __future__ import annotations

import os.path
import re
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from datetime import timedelta
from pathlib import Path
from typing import Any

from .errors import InvalidArgument

__all__ = ["Config", "listen_address", "load_config", "parse_duration"]

_DURATION_RE = re.compile(r"(\d+(?:\.\d+)?)(ms|s|m|h|d)")
_UNITS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0}
_SIZE_RE = re.compile(r"^(\d+)\s*([KMGT]?)i?B?$", re.IGNORECASE)


def parse_duration(field_name: str, text: str) -> timedelta:
    """`90s`, `15m`, `2h30m`, `1d`, `250ms` -> timedelta."""
    stripped = text.strip()
    pos = 0
    total = 0.0
    for match in _DURATION_RE.finditer(stripped):
        if match.start() != pos:
            break
        total += float(match.group(1)) * _UNITS[match.group(2)]
        pos = match.end()
    if not stripped or pos != len(stripped):
        raise InvalidArgument(
            field_name, f"{text!r} is not a duration like 250ms, 30s, 15m, 2h, 1d"
        )
    return timedelta(seconds=total)


def parse_size(field_name: str, text: str | int) -> int:
    if isinstance(text, int):
        return text
    match = _SIZE_RE.match(text.strip())
    if not match:
        raise InvalidArgument(field_name, f"{text!r} is not a size like 512M or 8G")
    power = " KMGT".index(match.group(2).upper() or " ")
    return int(match.group(1)) * int(1024**power)


@dataclass(frozen=True)
class DaemonConfig:
    socket: Path = Path("/run/cowbranchd/api.sock")
    # Group that may use the socket (its directory is 0750 root:<group>); empty: root only.
    socket_group: str = ""
    tcp_address: str = ""  # e.g. "0.0.0.0:7443"; empty disables TCP
    tls_cert: str = ""
    tls_key: str = ""
    token_file: str = ""  # bearer token required on every call; empty: none
    # TCP without TLS or without a token hands every branch to anyone who can
    # reach the port, so the daemon refuses it unless the operator says so here.
    insecure_tcp: bool = False
    # Directories CreateBase/CreateBaseVersion may import a data directory
    # from; empty: none. Absolute and normalised, so matching against them is sound.
    import_roots: tuple[str, ...] = ()
    state_dir: Path = Path("/var/lib/cowbranchd")
    log_format: str = "auto"  # auto | json | console
    log_level: str = "info"
    max_branches: int = 500
    # Branch writes (create, delete, reset, update) running at once, and how
    # many more may wait for a turn; beyond that a write is UNAVAILABLE at
    # once (clients retry with backoff). Base writes get a quarter of the turns.
    max_concurrent_writes: int = 8
    max_queued_writes: int = 24
    # Started clones of each hot parent kept ready for CreateBranch (each base's
    # latest version, recently used frozen branches); each is an idle postgres
    # (~15 MiB) holding a port.
    warm_branches: int = 0
    # At most this many frozen branches (templates) have warm clones at once:
    # the most recently branched from (daemon/warm.py).
    warm_templates: int = 8
    default_ttl: timedelta | None = None
    # How long a branch whose create finished after its caller had gone is
    # kept for a retry with the same request_id before it is deleted.
    unclaimed_grace: timedelta = timedelta(seconds=60)
    reap_interval: timedelta = timedelta(seconds=5)
    # After a client's lease stream breaks (process killed), how long before
    # the branches it held are deleted (daemon/leases.py).
    lease_grace: timedelta = timedelta(seconds=10)
    # Lease streams open at once; each holds a gRPC worker thread of its own
    # (the pool is sized for them on top of the other calls' threads).
    max_leases: int = 64
    # Stop a branch's postgres after this long without a client connection
    # (it resumes on the next one), for branches that do not choose; "0": never.
    idle_suspend: timedelta | None = None
    drain_timeout: timedelta = timedelta(seconds=30)
    max_message_bytes: int = 4 * 1024 * 1024
    # Prometheus metrics over HTTP, e.g. "127.0.0.1:9187"; empty: off (daemon/metrics.py).
    metrics_address: str = ""


@dataclass(frozen=True)
class StorageConfig:
    driver: str = "auto"  # auto | btrfs | zfs
    # btrfs: a directory on a btrfs mount; zfs: a dataset (tank/cowbranchd).
    # Empty: a loop-file-backed btrfs pool under state_dir (demo/quickstart).
    root: str = ""
    loop_size: int = 8 * 1024**3
    min_free_bytes: int = 256 * 1024**2
    # Per-branch size limit (only what the branch writes itself counts); 0:
    # none. Off by default: on btrfs it turns on simple quotas, a change to
    # the operator's filesystem. See docs/configuration.md.
    max_branch_bytes: int = 0
    # The largest max_bytes a CreateBranch may ask for; 0: max_branch_bytes.
    max_branch_bytes_cap: int = 0


@dataclass(frozen=True)
class PostgresConfig:
    os_user: str = "postgres"
    bin_dirs: tuple[str, ...] = ("/usr/lib/postgresql/{version}/bin",)
    port_range: tuple[int, int] = (54000, 54999)
    listen_addresses: str = "127.0.0.1"
    host: str = "127.0.0.1"  # host put in the DSNs handed out
    # Each branch's Unix socket directory lives under here; it must be
    # reachable by os_user, so it is not inside the 0750 runtime directory.
    socket_root: Path = Path("/run/cowbranchd-pg")
    start_timeout: timedelta = timedelta(seconds=30)
    # One OS user per branch: each postmaster runs as its own uid/gid from
    # this range, on an idmapped mount of its clone (btrfs; files still land
    # on disk as os_user). Empty: every branch runs as os_user (also the
    # fallback where the filesystem cannot idmap, e.g. zfs-fuse).
    branch_uids: tuple[int, int] | None = (300000, 365535)
    # Applied to every branch (before the client's own postgres_settings).
    settings: Mapping[str, str] = field(default_factory=dict)
    # Each branch's postgres log: once it passes log_max_bytes the daemon
    # moves it to <id>.log.1 (and .1 to .2, ...), keeping log_files of them.
    log_max_bytes: int = 10 * 1024 * 1024
    log_files: int = 2


@dataclass(frozen=True)
class TenantsConfig:
    """Who calls (docs/security.md, "Tenants"). Without tokens_dir and
    sockets every caller is the admin, as on a single-user machine."""

    # One file per tenant: the file's name is the tenant, its content the
    # bearer token (root-owned, not readable by group or others). Re-read when
    # the directory changes.
    tokens_dir: str = ""
    # tenant -> the group whose members may use <socket_dir>/<tenant>/api.sock;
    # a caller on that socket is that tenant without any token.
    sockets: Mapping[str, str] = field(default_factory=dict)
    socket_dir: Path = Path("/run/cowbranchd-tenants")
    # What ListBranches shows a tenant of other owners' branches: "redacted"
    # (listed without connection secrets) or "hidden".
    others: str = "redacted"
    # Per owner (admins are exempt); 0: no limit.
    max_branches: int = 0
    max_written_bytes: int = 0
    # Tenants that may also create, version and delete bases (admins always may).
    base_changes: tuple[str, ...] = ()


@dataclass(frozen=True)
class ImportsConfig:
    """Imported bases (ImportBase, docs/bases.md)."""

    # Keep each base's newest K versions; older ones are removed once no
    # branch depends on them. 0: keep all.
    keep_versions: int = 0
    # base -> how often its newest import's recipe is replayed (RefreshBase),
    # counted from its newest version, e.g. { prod = "24h" }.
    refresh: Mapping[str, timedelta] = field(default_factory=dict)
    # Followed bases (ImportBase follow=DSN): how often the running standby
    # is snapshot, how far back a branch's `at` may reach (older follow
    # snapshots go once no branch uses them), how much WAL the standby keeps
    # for branches between snapshots (its wal_keep_size), and the tenants
    # besides admins that may branch them (they are not masked).
    follow_snapshot_interval: timedelta = timedelta(minutes=1)
    follow_window: timedelta = timedelta(hours=24)
    follow_wal_keep: str = "1GB"
    follow_branchers: tuple[str, ...] = ()


@dataclass(frozen=True)
class DemoConfig:
    # A small base made at start when the pool has no base at all.
    enabled: bool = True
    base_id: str = "demo"


@dataclass(frozen=True)
class Config:
    daemon: DaemonConfig = field(default_factory=DaemonConfig)
    storage: StorageConfig = field(default_factory=StorageConfig)
    postgres: PostgresConfig = field(default_factory=PostgresConfig)
    tenants: TenantsConfig = field(default_factory=TenantsConfig)
    imports: ImportsConfig = field(default_factory=ImportsConfig)
    demo: DemoConfig = field(default_factory=DemoConfig)

    @property
    def runtime_dir(self) -> Path:
        return self.daemon.socket.parent


# Size keys for which 0 means "no limit".
_ZERO_MEANS_NONE = frozenset({"max_branch_bytes", "max_branch_bytes_cap", "max_written_bytes"})
# Integer keys for which 0 is allowed (none, or no limit).
_ZERO_ALLOWED = frozenset(
    {
        "daemon.warm_branches",
        "daemon.warm_templates",
        "tenants.max_branches",
        "imports.keep_versions",
    }
)
TENANT_NAME = re.compile(r"[a-z][a-z0-9-]{0,62}")
MAX_LEASES = 128


def _convert(section: str, key: str, default: object, value: Any) -> object:
    where = f"{section}.{key}"
    if isinstance(default, bool):
        if not isinstance(value, bool):
            raise InvalidArgument(where, "must be true or false")
        return value
    if isinstance(default, int) and key.endswith(("_size", "_bytes", "_bytes_cap")):
        size = parse_size(where, value)
        if size < 0 or (size == 0 and key not in _ZERO_MEANS_NONE):
            raise InvalidArgument(where, "must be positive")
        return size
    if isinstance(default, int):
        lowest = 0 if where in _ZERO_ALLOWED else 1
        if not isinstance(value, int) or isinstance(value, bool) or value < lowest:
            raise InvalidArgument(where, f"must be an integer >= {lowest}")
        return value
    if isinstance(default, timedelta) or key.endswith("_ttl") or key == "idle_suspend":
        if value in ("", 0) or (key == "idle_suspend" and value == "0"):
            return None
        if not isinstance(value, str):
            raise InvalidArgument(where, "must be a duration string like '30s'")
        return parse_duration(where, value)
    if isinstance(default, Path):
        if not isinstance(value, str) or not value.startswith("/"):
            raise InvalidArgument(where, "must be an absolute path")
        return Path(value)
    if key == "port_range":
        return _port_range(where, value)
    if key == "branch_uids":
        return _uid_range(where, value)
    if key == "import_roots":
        return _import_roots(where, value)
    if key == "metrics_address":
        if not isinstance(value, str):
            raise InvalidArgument(where, "must be a string like '127.0.0.1:9187'")
        if value:
            listen_address(where, value)
        return value
    if key == "bin_dirs":
        if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
            raise InvalidArgument(where, "must be a list of strings")
        return tuple(value)
    if key == "sockets":
        return _tenant_sockets(where, value)
    if key == "refresh":
        return _refresh_schedule(where, value)
    if key in ("base_changes", "follow_branchers"):
        if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
            raise InvalidArgument(where, "must be a list of tenant names")
        for name in value:
            _tenant_name(where, name)
        return tuple(value)
    if key == "settings":
        if not isinstance(value, dict):
            raise InvalidArgument(where, "must be a table of name = value")
        return {str(k): str(v) for k, v in value.items()}
    if not isinstance(value, str):
        raise InvalidArgument(where, "must be a string")
    return value


def _port_range(where: str, value: Any) -> tuple[int, int]:
    text = str(value)
    match = re.fullmatch(r"(\d+)-(\d+)", text)
    if not match:
        raise InvalidArgument(where, f"{text!r} is not a range like 54000-54999")
    first, last = int(match.group(1)), int(match.group(2))
    if not 1024 <= first <= last <= 65535:
        raise InvalidArgument(where, "must lie within 1024-65535, first <= last")
    return first, last


def listen_address(where: str, text: str) -> tuple[str, int]:
    """`127.0.0.1:9187`, `[::1]:9187`, `localhost:9187` -> (host, port)."""
    match = re.fullmatch(r"\[([0-9A-Fa-f:.]+)\]:(\d{1,5})|([A-Za-z0-9.-]+):(\d{1,5})", text)
    if not match:
        raise InvalidArgument(
            where, f"{text!r} is not host:port like '127.0.0.1:9187' or '[::1]:9187'"
        )
    host = match.group(1) or match.group(3)
    port = int(match.group(2) or match.group(4))
    if not 1 <= port <= 65535:
        raise InvalidArgument(where, f"port {port} is not within 1-65535")
    return host, port


def _import_roots(where: str, value: Any) -> tuple[str, ...]:
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise InvalidArgument(where, "must be a list of absolute directory paths")
    for path in value:
        # Only the normalised form is accepted, never silently rewritten: the
        # daemon matches imported paths against these roots, and a root
        # written as '/srv/a/../b' would read as one directory and match as
        # another.
        if not path.startswith("/"):
            raise InvalidArgument(where, f"{path!r} is not an absolute path")
        if "\0" in path:
            raise InvalidArgument(where, f"{path!r} holds a NUL character")
        # normpath resolves '.', '..' and doubled or trailing slashes, but keeps
        # POSIX's special leading '//'.
        normal = "/" + os.path.normpath(path).lstrip("/")
        if normal == "/":
            raise InvalidArgument(where, f"{path!r} would allow importing from anywhere")
        if path != normal:
            raise InvalidArgument(where, f"{path!r} is not normalised; write {normal!r}")
    return tuple(value)


def _tenant_name(where: str, name: str) -> str:
    if not TENANT_NAME.fullmatch(name) or name == "admin":
        raise InvalidArgument(
            where, f"{name!r} is not a tenant name: ^[a-z][a-z0-9-]{{0,62}}$, not 'admin'"
        )
    return name


def _tenant_sockets(where: str, value: Any) -> dict[str, str]:
    if not isinstance(value, dict) or not all(isinstance(v, str) for v in value.values()):
        raise InvalidArgument(where, "must be a table of tenant = \"group\"")
    for name, group in value.items():
        _tenant_name(where, name)
        if not re.fullmatch(r"[a-z_][a-z0-9_-]{0,31}\$?", group):
            raise InvalidArgument(f"{where}.{name}", f"{group!r} is not a group name")
    return dict(value)


def _refresh_schedule(where: str, value: Any) -> dict[str, timedelta]:
    if not isinstance(value, dict) or not all(isinstance(v, str) for v in value.values()):
        raise InvalidArgument(where, 'must be a table of base = "interval", e.g. { prod = "24h" }')
    schedule = {}
    for base, text in value.items():
        if not TENANT_NAME.fullmatch(base):
            raise InvalidArgument(where, f"{base!r} is not a base id")
        interval = parse_duration(f"{where}.{base}", text)
        if interval < timedelta(seconds=10):
            raise InvalidArgument(f"{where}.{base}", "must be at least 10s")
        schedule[base] = interval
    return schedule


def _uid_range(where: str, value: Any) -> tuple[int, int] | None:
    if value == "":
        return None
    match = re.fullmatch(r"(\d+)-(\d+)", str(value))
    if not match:
        raise InvalidArgument(where, f"{value!r} is not a range like 300000-365535 (or \"\")")
    first, last = int(match.group(1)), int(match.group(2))
    if not 100000 <= first <= last < 2**31 - 1:
        raise InvalidArgument(
            where, "must lie within 100000-2147483646, first <= last (clear of system users)"
        )
    return first, last


_SECTIONS: dict[str, type[Any]] = {
    "daemon": DaemonConfig,
    "storage": StorageConfig,
    "postgres": PostgresConfig,
    "tenants": TenantsConfig,
    "imports": ImportsConfig,
    "demo": DemoConfig,
}


def config_from_mapping(data: Mapping[str, Any]) -> Config:
    built: dict[str, object] = {}
    for section, values in data.items():
        cls = _SECTIONS.get(section)
        if cls is None:
            raise InvalidArgument(section, f"unknown section; known: {', '.join(_SECTIONS)}")
        if not isinstance(values, dict):
            raise InvalidArgument(section, "must be a table")
        defaults = cls()
        known = {f.name for f in fields(cls)}
        kwargs: dict[str, object] = {}
        for key, value in values.items():
            if key not in known:
                raise InvalidArgument(
                    f"{section}.{key}", f"unknown key; known: {', '.join(sorted(known))}"
                )
            kwargs[key] = _convert(section, key, getattr(defaults, key), value)
        built[section] = cls(**kwargs)
    config = Config(**built)  # type: ignore[arg-type]
    _check(config)
    return config


def _check(config: Config) -> None:
    if config.storage.driver not in ("auto", "btrfs", "zfs"):
        raise InvalidArgument("storage.driver", "must be auto, btrfs or zfs")
    if config.daemon.log_format not in ("auto", "json", "console"):
        raise InvalidArgument("daemon.log_format", "must be auto, json or console")
    if config.daemon.log_level not in ("debug", "info", "warning", "error"):
        raise InvalidArgument("daemon.log_level", "must be debug, info, warning or error")
    if bool(config.daemon.tls_cert) != bool(config.daemon.tls_key):
        raise InvalidArgument("daemon.tls_cert", "tls_cert and tls_key go together")
    if len(str(config.daemon.socket)) > 100:
        raise InvalidArgument("daemon.socket", "Unix socket paths must be under 100 characters")
    _check_tcp(config.daemon, config.tenants)
    if config.daemon.max_leases > MAX_LEASES:
        # Each listener serves at most 256 calls at once; leases must leave room.
        raise InvalidArgument("daemon.max_leases", f"must be at most {MAX_LEASES}")
    if config.tenants.others not in ("redacted", "hidden"):
        raise InvalidArgument("tenants.others", "must be redacted or hidden")
    if config.tenants.tokens_dir and not config.tenants.tokens_dir.startswith("/"):
        raise InvalidArgument("tenants.tokens_dir", "must be an absolute path")
    storage = config.storage
    if storage.max_branch_bytes_cap and storage.max_branch_bytes_cap < storage.max_branch_bytes:
        raise InvalidArgument(
            "storage.max_branch_bytes_cap",
            "must be at least storage.max_branch_bytes (or 0: the same)",
        )


def _check_tcp(daemon: DaemonConfig, tenants: TenantsConfig) -> None:
    """TCP is never open by accident: without TLS, tokens and branch passwords
    cross the network in clear; without a token, anyone who can reach the port
    may create, read and delete every branch."""
    if not daemon.tcp_address or daemon.insecure_tcp:
        return
    missing = []
    if not daemon.tls_cert:
        missing.append("TLS (daemon.tls_cert, daemon.tls_key)")
    if not daemon.token_file and not tenants.tokens_dir:
        missing.append("a token (daemon.token_file or tenants.tokens_dir)")
    if missing:
        raise InvalidArgument(
            "daemon.tcp_address",
            f"TCP without {' or '.join(missing)} lets anyone who can reach the port use "
            "every branch; configure them, or set daemon.insecure_tcp = true to accept that",
        )


def load_config(path: Path | None) -> Config:
    """Read `path` (None: all defaults). Errors name the file and the key."""
    if path is None:
        return Config()
    try:
        with path.open("rb") as fh:
            data = tomllib.load(fh)
    except OSError as exc:
        raise InvalidArgument("config", f"cannot read {path}: {exc.strerror}") from exc
    except tomllib.TOMLDecodeError as exc:
        raise InvalidArgument("config", f"{path}: {exc}") from exc
    try:
        return config_from_mapping(data)
    except InvalidArgument as exc:
        raise InvalidArgument(exc.field, f"{exc.problem} (in {path})") from exc
