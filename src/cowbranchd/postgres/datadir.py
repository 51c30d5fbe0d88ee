"""PostgreSQL data directories at rest: binaries, version, control state, pid file.

Everything here works on files while no postmaster is involved (or reads what a
postmaster left behind); nothing here spawns a server or knows about storage.
The public names are re-exported by `cowbranchd.postgres`.
"""

from __future__ import annotations

import glob
import grp
import os
import pwd
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import structlog

from cowbranchd.errors import FailedPrecondition, InvalidArgument, NotFound
from cowbranchd.run import RunAs, run
from cowbranchd.safefs import (
    UnsafePath,
    open_dir,
    read_regular,
    remove_tree_entries,
    unlink_if_present,
    walk_tree,
)

from .settings import DAEMON_OWNED_SETTINGS

__all__ = [
    "DAEMON_OWNED_SETTINGS",
    "Binaries",
    "PidFile",
    "check_clean_shutdown",
    "find_binaries",
    "foreign_owned",
    "installed_versions",
    "pg_version",
    "prepare_clone",
    "read_pid_file",
    "validate_settings",
]

log = structlog.get_logger("cowbranchd.postgres")

# Daemon-owned, yet only a default: an operator may choose another.
_OPERATOR_MAY_SET = frozenset({"recovery_init_sync_method"})
_SETTING_NAME = re.compile(r"^[a-z_][a-z0-9_.]*$")
_MAX_NAME = 63  # NAMEDATALEN - 1: postgres truncates longer names anyway
_MAX_VALUE = 4096
_MAX_SETTINGS = 200

# postmaster.pid holds eight short lines (pidfile.h); PG_VERSION one number.
_MAX_PID_FILE = 4096
_MAX_VERSION_FILE = 64
_CONTROLDATA_TIMEOUT = 60.0
_CLUSTER_STATE = re.compile(r"^Database cluster state:\s*(.+?)\s*$", re.MULTILINE)


@dataclass(frozen=True)
class Binaries:
    """One installed PostgreSQL major version: where its programs live."""

    major: int
    bindir: str

    @property
    def postgres(self) -> str:
        return os.path.join(self.bindir, "postgres")

    @property
    def initdb(self) -> str:
        return os.path.join(self.bindir, "initdb")

    @property
    def pg_controldata(self) -> str:
        return os.path.join(self.bindir, "pg_controldata")

    @property
    def psql(self) -> str:
        return os.path.join(self.bindir, "psql")


def _is_complete(bindir: str) -> bool:
    return all(
        os.access(os.path.join(bindir, prog), os.X_OK)
        for prog in ("postgres", "initdb", "pg_controldata")
    )


def installed_versions(bin_dirs: Sequence[str]) -> list[int]:
    """Major versions with a complete set of binaries under any `{version}` template."""
    found: set[int] = set()
    for template in bin_dirs:
        if "{version}" not in template:
            continue
        head, _, tail = template.partition("{version}")
        pattern = re.compile(re.escape(head) + r"(\d+)" + re.escape(tail) + r"$")
        for path in glob.glob(glob.escape(head) + "*" + glob.escape(tail)):
            m = pattern.match(path)
            if m and _is_complete(path):
                found.add(int(m.group(1)))
    return sorted(found)


def find_binaries(major: int, bin_dirs: Sequence[str]) -> Binaries:
    """The binaries of PostgreSQL `major`, from the first template that has them all."""
    for template in bin_dirs:
        bindir = template.format(version=major)
        if _is_complete(bindir):
            return Binaries(major=major, bindir=bindir)
    installed = ", ".join(map(str, installed_versions(bin_dirs))) or "none"
    raise NotFound(
        f"PostgreSQL {major} is needed but not installed "
        f"(installed: {installed}; searched {', '.join(bin_dirs)})"
    )


def pg_version(pgdata: str | os.PathLike[str]) -> int:
    """The major version a data directory was created by, from its PG_VERSION file
    (read without following links or blocking: the tree may be a tenant's)."""
    shown = os.path.join(pgdata, "PG_VERSION")
    try:
        with open_dir(pgdata) as dir_fd:
            raw = read_regular(dir_fd, "PG_VERSION", limit=_MAX_VERSION_FILE, shown=shown)
    except FileNotFoundError:
        raw = None
    if raw is None:
        raise FailedPrecondition(f"{pgdata} is not a PostgreSQL data directory (no PG_VERSION)")
    text = raw.decode(errors="replace").strip()
    if not text.isdigit():
        # "9.6" and older: the daemon relies on PG_VERSION being the major alone (10+).
        raise FailedPrecondition(f"{shown}: unsupported PostgreSQL version {text[:20]!r}")
    return int(text)


def check_clean_shutdown(
    pgdata: str | os.PathLike[str], binaries: Binaries, *, os_user: RunAs
) -> None:
    """Raise FailedPrecondition unless pg_controldata says the cluster was shut down.

    pg_controldata runs as `os_user`, the tree's owner: as root it would read
    whatever a planted `global/pg_control` link points at and print it."""
    # LC_ALL=C: the labels and states are translated otherwise.
    proc = run(
        [binaries.pg_controldata, "-D", os.fspath(pgdata)],
        env={"LC_ALL": "C"},
        user=os_user,
        timeout=_CONTROLDATA_TIMEOUT,
    )
    m = _CLUSTER_STATE.search(proc.stdout)
    if m is None:
        raise FailedPrecondition(f"{pgdata}: pg_controldata shows no cluster state")
    state = m.group(1)
    if state != "shut down":
        raise FailedPrecondition(
            f"{pgdata} was not shut down cleanly (cluster state: {state!r}); "
            "stop its postgres with a fast shutdown first"
        )


def prepare_clone(pgdata: str | os.PathLike[str]) -> None:
    """Make a fresh clone startable as a primary of its own.

    Removes the parent's postmaster.pid, recovery/standby signal files and
    replication slots (a slot would pin WAL forever in a branch). Only the top
    level and pg_replslot are listed: no walk, so cost is independent of size.
    Everything goes by descriptor (`cowbranchd.safefs`): a tenant's superuser may have
    planted a link at any of these names, and this runs as root.
    """
    with open_dir(pgdata) as root:
        # recovery.conf: PG 12+ refuses to start while it exists.
        for name in ("postmaster.pid", "recovery.conf"):
            try:
                unlink_if_present(root, name)
            except IsADirectoryError:
                raise UnsafePath(os.path.join(pgdata, name), "is a directory") from None
        with os.scandir(root) as entries:
            signals = [e.name for e in entries if e.name.endswith(".signal")]
        for name in signals:
            try:
                unlink_if_present(root, name)
            except IsADirectoryError:
                raise UnsafePath(os.path.join(pgdata, name), "is a directory") from None
        shown = os.path.join(pgdata, "pg_replslot")
        try:
            with open_dir("pg_replslot", dir_fd=root, shown=shown) as slots:
                remove_tree_entries(slots, shown)
        except FileNotFoundError:
            pass


def _owner_name(uid: int, gid: int) -> str:
    try:
        user = pwd.getpwuid(uid).pw_name
    except KeyError:
        user = str(uid)
    try:
        group = grp.getgrgid(gid).gr_name
    except KeyError:
        group = str(gid)
    return f"{user}:{group} ({uid}:{gid})"


def foreign_owned(pgdata: str | os.PathLike[str], uid: int, gid: int, *, limit: int = 3) -> str:
    """Empty if the data directory and everything in it belong to uid:gid,
    else the first `limit` entries that do not, with their owners, e.g.
    "pg_logical/replorigin_checkpoint is postgres:root (101:0)".

    Metadata only (names and lstat, `safefs.walk_tree`): no file is opened,
    no link followed. An idmapped mount maps only uid:gid, and the kernel
    refuses every write through it to an inode whose owner or group it cannot
    map (even one whose owner it can), so a branch could read such a file and
    never write it."""
    found: list[str] = []
    with open_dir(pgdata) as root:
        top = os.fstat(root)
        if (top.st_uid, top.st_gid) != (uid, gid):
            found.append(f". is {_owner_name(top.st_uid, top.st_gid)}")
        for path, st in walk_tree(root, shown=os.fspath(pgdata)):
            if len(found) >= limit:
                break
            if (st.st_uid, st.st_gid) != (uid, gid):
                found.append(f"{path} is {_owner_name(st.st_uid, st.st_gid)}")
    return "; ".join(found)


@dataclass(frozen=True)
class PidFile:
    """What a postmaster wrote to postmaster.pid (see pidfile.h)."""

    pid: int
    data_dir: str
    start_time: int  # epoch seconds
    port: int
    socket_dir: str
    listen_addresses: str
    status: str  # "starting", "ready", "stopping", "standby", "" before known


def read_pid_file(pgdata: str | os.PathLike[str]) -> PidFile | None:
    """Parse postmaster.pid; None if absent or still being written.

    UnsafePath if it is a link, a FIFO or other special file, or larger than
    any postmaster writes: a tenant may put anything there."""
    shown = os.path.join(pgdata, "postmaster.pid")
    try:
        with open_dir(pgdata) as dir_fd:
            raw = read_regular(dir_fd, "postmaster.pid", limit=_MAX_PID_FILE, shown=shown)
    except FileNotFoundError:
        return None
    if raw is None:
        return None
    lines = raw.decode(errors="replace").split("\n")
    if len(lines) < 4 or not lines[0].strip().isdigit():
        return None

    def line(n: int) -> str:
        return lines[n - 1].strip() if len(lines) >= n else ""

    try:
        return PidFile(
            pid=int(line(1)),
            data_dir=line(2),
            start_time=int(line(3) or 0),
            port=int(line(4) or 0),
            socket_dir=line(5),
            listen_addresses=line(6),
            status=line(8),
        )
    except ValueError:
        return None


def validate_settings(settings: Mapping[str, str]) -> None:
    """Raise InvalidArgument("postgres_settings", ...) for settings no start may
    pass: a malformed one, or one the daemon sets itself. (What a *client* may
    ask for is narrower: `_settings.validate_client_settings`, at the edge;
    this also runs on the operator's own settings.)"""
    if len(settings) > _MAX_SETTINGS:
        raise InvalidArgument("postgres_settings", f"more than {_MAX_SETTINGS} settings")
    for name, value in settings.items():
        if not isinstance(name, str) or not _SETTING_NAME.match(name) or len(name) > _MAX_NAME:
            raise InvalidArgument(
                "postgres_settings",
                f"{name!r} is not a setting name (lower case, ^[a-z_][a-z0-9_.]*$, "
                f"at most {_MAX_NAME} characters)",
            )
        if name in DAEMON_OWNED_SETTINGS and name not in _OPERATOR_MAY_SET:
            raise InvalidArgument("postgres_settings", f"{name} is set by cowbranchd")
        if not isinstance(value, str):
            raise InvalidArgument("postgres_settings", f"{name}: value must be a string")
        if any(c in value for c in "\0\n\r"):
            raise InvalidArgument(
                "postgres_settings", f"{name}: value contains NUL or a line break"
            )
        if len(value) > _MAX_VALUE:
            raise InvalidArgument(
                "postgres_settings", f"{name}: value longer than {_MAX_VALUE} characters"
            )
