"""Where a base's data comes from, besides initdb and a prepared directory:
a running server (`from_server`: pg_basebackup) or a pg_dump archive or SQL
file (`from_dump`: a fresh initdb cluster, then pg_restore or psql).

Both leave a cleanly shut down data directory in `target` (an empty
directory, in the daemon a fresh staging volume) that the daemon starts with
its own settings: cowbranchd's postgresql.conf and pg_hba.conf, an empty
postgresql.auto.conf and pg_ident.conf (the source's settings, replication
included, do not come along), no signal file, replication slot or server log.

Every tool runs as an unprivileged OS user, never root: the dump is read and
the server is reached with that user's rights. A password never appears in
argv or in a file: it reaches libpq through PGPASSWORD in the tool's own
environment only. Errors: ImportFailed (the tool's words, naming the failing
item or statement), Cancelled, NotFound (no PostgreSQL of the source's major
installed), InvalidArgument (a DSN keyword or host that is refused).

What this module may not do: touch storage, follow a link in `target` as
root, or leave a process running after it returns or raises.
"""

from __future__ import annotations

import os
import re
import threading
from collections.abc import Sequence
from dataclasses import dataclass

import psutil
import psycopg
import structlog
from psycopg import conninfo as libpq
from psycopg import sql

from cowbranchd.errors import FailedPrecondition, InvalidArgument, NotFound
from cowbranchd.run import RunAs, ids_of
from cowbranchd.safefs import open_dir, replace_file, unlink_if_present

from .cluster import CONF_DEFAULTS, initdb, write_hba
from .datadir import (
    Binaries,
    check_clean_shutdown,
    find_binaries,
    installed_versions,
    prepare_clone,
)
from .masking import scrub_leftovers, staging
from .tools import Cancelled, ImportFailed, Progress, run_tool

__all__ = [
    "DSN_KEYWORDS",
    "DumpInfo",
    "Imported",
    "dump_info",
    "finish_import",
    "from_dump",
    "from_server",
    "standby_copy",
]

log = structlog.get_logger("cowbranchd.postgres")

# What a caller's DSN may say: not `passfile`, `service`, `sslkey` or other
# file names (read as the tool's user), and no Unix-socket host (_conninfo).
DSN_KEYWORDS = frozenset({
    "host", "hostaddr", "port", "user", "password", "dbname", "sslmode", "connect_timeout",
    "application_name", "target_session_attrs", "keepalives", "keepalives_idle",
    "keepalives_interval", "keepalives_count",
})
_PROGRESS = re.compile(r"(\d+)/(\d+) kB")
_VERSION = re.compile(r"[Dd]umped from database version:? (\d+)")
_TOC_DBNAME = re.compile(r"^;\s+dbname: (.+)$", re.MULTILINE)
_TOC_FORMAT = re.compile(r"^;\s+Format: (\w+)$", re.MULTILINE)
# "215; 1259 16390 TABLE public users owner": the owner is the last word.
_TOC_OWNER = re.compile(r"^\d+; \d+ \d+ \S+ .* (\S+)$", re.MULTILINE)
_PLAIN_OWNER = re.compile(r' OWNER TO ("(?:[^"]|"")+"|[^;\s]+);$', re.MULTILINE)
_SINGLE_ROW = re.compile(r'= "cowbranchd-(role|db):(.*)"')
_PROBE_TIMEOUT_S = 120.0
_PLAIN_HEAD = 65536
_FORMATS = {"CUSTOM": "custom", "DIRECTORY": "directory", "TAR": "tar"}


@dataclass(frozen=True)
class Imported:
    """What an import produced: a cleanly shut down cluster of `major`."""

    major: int
    superuser: str  # the bootstrap superuser (oid 10), whatever its name
    databases: tuple[str, ...]  # the connectable, non-template databases


@dataclass(frozen=True)
class DumpInfo:
    """What a dump is, found out as the import user."""

    format: str  # "custom", "directory", "tar" or "plain"
    major: int | None  # of the server it was dumped from, if the dump says
    database: str | None  # the dumped database (archives)
    owners: tuple[str, ...]  # roles owning objects in it


def _conninfo(dsn: str) -> tuple[str, dict[str, str]]:
    """The DSN without its password (for argv), and the tool's environment
    (PGPASSWORD). Other keywords than DSN_KEYWORDS, and socket hosts, are
    refused: the tool runs as the pool's postgres user, who may reach branch
    sockets, and reads any file a DSN names."""
    try:
        params = libpq.conninfo_to_dict(dsn)
    except psycopg.ProgrammingError as exc:
        raise InvalidArgument("dsn", f"not a libpq connection string: {exc}") from None
    unknown = sorted(set(params) - DSN_KEYWORDS)
    if unknown:
        raise InvalidArgument("dsn", f"keywords not allowed: {', '.join(unknown)}")
    hosts = [h for h in str(params.get("host") or "").split(",") if h]
    if not hosts and not params.get("hostaddr"):
        raise InvalidArgument("dsn", "needs a TCP host (host= or hostaddr=)")
    if any(h.startswith(("/", "@")) for h in hosts):
        raise InvalidArgument("dsn", "a Unix-socket host is refused; give a TCP host")
    password = str(params.pop("password", "") or "")
    # Nothing from the tool user's home: no ~/.pgpass, client certificate or key.
    env = {"PGPASSFILE": "/nonexistent", "PGSSLCERT": "/nonexistent", "PGSSLKEY": "/nonexistent"}
    if password:
        env["PGPASSWORD"] = password
    return libpq.make_conninfo(**{k: str(v) for k, v in params.items()}), env


def _newest(bin_dirs: Sequence[str]) -> Binaries:
    installed = installed_versions(bin_dirs)
    if not installed:
        raise NotFound(f"no PostgreSQL installed (searched {', '.join(bin_dirs)})")
    return find_binaries(installed[-1], bin_dirs)


def _binaries_for(major: int, what: str, bin_dirs: Sequence[str]) -> Binaries:
    try:
        return find_binaries(major, bin_dirs)
    except NotFound as exc:
        raise NotFound(f"{what} is PostgreSQL {major}: {exc.message}") from None


def _tool(binaries: Binaries, name: str) -> str:
    return os.path.join(binaries.bindir, name)


def _prepare_target(target: str, owner: RunAs) -> None:
    uid, gid = ids_of(owner)
    with open_dir(target) as fd:
        if os.listdir(fd):
            raise FailedPrecondition(f"{target} is not empty")
        os.fchown(fd, uid, gid)
        os.fchmod(fd, 0o700)


def from_server(
    dsn: str,
    target: str,
    *,
    bin_dirs: Sequence[str],
    os_user: str,
    progress: Progress | None = None,
    cancel: threading.Event | None = None,
    fast_checkpoint: bool = True,
) -> Imported:
    """Copy the server `dsn` names (a primary or a standby; the DSN's user
    needs the REPLICATION attribute) into the empty directory `target` with
    `pg_basebackup -X stream`, as `os_user`, then make it a cleanly shut down
    cluster of its own (`finish_import`). Phases: "copy" (bytes done/total
    from pg_basebackup --progress), "recover". `fast_checkpoint` asks the
    source for an immediate checkpoint instead of waiting for a spread one.
    """
    binaries = _base_backup(dsn, target, bin_dirs=bin_dirs, os_user=os_user, progress=progress,
                            cancel=cancel, fast_checkpoint=fast_checkpoint)
    if progress is not None:
        progress("recover", 0, 0)
    imported = finish_import(target, binaries, os_user=os_user, cancel=cancel)
    log.info("imported from server", target=target, major=binaries.major)
    return imported


def _base_backup(
    dsn: str,
    target: str,
    *,
    bin_dirs: Sequence[str],
    os_user: str,
    progress: Progress | None,
    cancel: threading.Event | None,
    fast_checkpoint: bool = True,
) -> Binaries:
    """pg_basebackup -X stream of `dsn` into the empty `target`, as `os_user`;
    the source's major version is asked first and must be installed."""
    info, env = _conninfo(dsn)
    probe = run_tool(
        [_newest(bin_dirs).psql, "-X", "-A", "-t", "-w", "-d",
         libpq.make_conninfo(info, replication="true"), "-c", "SHOW server_version_num"],
        user=os_user, env=env, cancel=cancel, timeout=_PROBE_TIMEOUT_S, capture_stdout=True,
    )
    if probe.returncode != 0 or not probe.stdout.strip().isdigit():
        raise ImportFailed(f"cannot reach the source server: {probe.stderr_tail[-1500:]}")
    major = int(probe.stdout.strip()) // 10000
    binaries = _binaries_for(major, "the source server", bin_dirs)
    _prepare_target(target, os_user)

    def on_line(line: str) -> None:
        m = _PROGRESS.search(line)
        if m and progress is not None:
            progress("copy", int(m.group(1)) * 1024, int(m.group(2)) * 1024)

    # The server names the files pg_basebackup writes (docs/bases.md: trusted
    # servers only until it runs as a uid of its own).
    result = run_tool(
        [_tool(binaries, "pg_basebackup"), "-d", info, "-D", target, "-X", "stream",
         "--progress", "--no-password", "--no-manifest",
         f"--checkpoint={'fast' if fast_checkpoint else 'spread'}"],
        user=os_user, env=env, cancel=cancel, on_line=on_line,
    )
    if result.returncode != 0:
        raise ImportFailed(f"pg_basebackup failed: {result.stderr_tail[-3000:]}")
    _check(cancel)
    return binaries


def standby_copy(
    dsn: str,
    target: str,
    *,
    passfile: str,
    bin_dirs: Sequence[str],
    os_user: str,
    progress: Progress | None = None,
    cancel: threading.Event | None = None,
) -> Binaries:
    """Copy the server `dsn` names into the empty `target` (as `from_server`
    does) and leave it a standby of that server, not yet started: cowbranchd's
    postgresql.conf and pg_hba.conf, `standby.signal`, and in
    postgresql.auto.conf only `primary_conninfo`: the DSN without its
    password plus `passfile`, a 0600 file of `os_user` written here that holds
    the password (never argv, never the data directory, which is snapshot
    and cloned). The base backup's backup_label stays: the standby's first
    start needs it."""
    binaries = _base_backup(dsn, target, bin_dirs=bin_dirs, os_user=os_user, progress=progress,
                            cancel=cancel)
    info, env = _conninfo(dsn)
    password = env.get("PGPASSWORD", "")
    uid, gid = ids_of(os_user)
    escaped = password.replace("\\", "\\\\").replace(":", "\\:")
    folder, name = os.path.split(passfile)
    with open_dir(folder) as fd:
        replace_file(fd, name, f"*:*:*:*:{escaped}\n".encode(), uid=uid, gid=gid, mode=0o600)
    # Nothing from the postgres user's home either (as for the tools).
    conninfo = libpq.make_conninfo(info, passfile=passfile, sslcert="/nonexistent",
                                   sslkey="/nonexistent")
    # A GUC string: backslashes are escapes there, quotes are doubled.
    quoted = conninfo.replace("\\", "\\\\").replace("'", "''")
    prepare_clone(target)  # the source's signal files, slots and pid file
    with open_dir(target) as root:
        for conf, text in (
            ("postgresql.conf", CONF_DEFAULTS),
            ("postgresql.auto.conf", f"primary_conninfo = '{quoted}'\n"),
            ("pg_ident.conf", ""),
            ("standby.signal", ""),
        ):
            replace_file(root, conf, text.encode(), uid=uid, gid=gid)
    write_hba(target, os_user)
    log.info("standby copied", target=target, major=binaries.major)
    return binaries


def finish_import(
    target: str, binaries: Binaries, *, os_user: str, cancel: threading.Event | None = None
) -> Imported:
    """Make a copied data directory a cluster of its own: cowbranchd's conf
    files, no signal, slot, log or backup leftover; recovery finished in
    single-user mode (no socket, no port at all), which ends with a clean
    shutdown. Returns its bootstrap superuser and databases."""
    uid, gid = ids_of(os_user)
    prepare_clone(target)
    with open_dir(target) as root:
        for name, text in (("postgresql.conf", CONF_DEFAULTS), ("postgresql.auto.conf", ""),
                           ("pg_ident.conf", "")):
            replace_file(root, name, text.encode(), uid=uid, gid=gid)
        unlink_if_present(root, "standby.signal")
    write_hba(target, os_user)
    scrub_leftovers(target)
    script = (
        "SELECT 'cowbranchd-role:' || rolname FROM pg_authid WHERE oid = 10;\n\n"
        "SELECT 'cowbranchd-db:' || datname FROM pg_database "
        "WHERE datallowconn AND NOT datistemplate ORDER BY datname;\n\n"
    )
    result = run_tool(
        [binaries.postgres, "--single", "-D", target, "-j", "template1"],
        user=os_user, input=script.encode(), cancel=cancel, capture_stdout=True,
    )
    rows = _SINGLE_ROW.findall(result.stdout)
    roles = [value for kind, value in rows if kind == "role"]
    if result.returncode != 0 or len(roles) != 1:
        raise ImportFailed(f"recovery of the copy failed: {result.stderr_tail[-3000:]}")
    check_clean_shutdown(target, binaries, os_user=os_user)
    return Imported(binaries.major, roles[0], tuple(v for k, v in rows if k == "db"))


def dump_info(path: str, *, bin_dirs: Sequence[str], os_user: str) -> DumpInfo:
    """The format and source major of the dump at `path`, read as `os_user`
    (`pg_restore -l` for archives; the header comment of a plain SQL file)."""
    listing = run_tool([_newest(bin_dirs).bindir + "/pg_restore", "-l", "--", path],
                       user=os_user, capture_stdout=True, timeout=_PROBE_TIMEOUT_S)
    if listing.returncode == 0:
        toc = listing.stdout
        fmt = _TOC_FORMAT.search(toc)
        version = _VERSION.search(toc)
        dbname = _TOC_DBNAME.search(toc)
        owners = sorted({o for o in _TOC_OWNER.findall(toc) if o != "-"})
        kind = _FORMATS.get(fmt.group(1) if fmt else "", "")
        if not kind:
            raise ImportFailed(f"{path}: unsupported archive format {fmt.group(1) if fmt else '?'}")
        if kind == "directory":
            _refuse_special_files(path, os_user)
        return DumpInfo(kind, int(version.group(1)) if version else None,
                        dbname.group(1).strip() if dbname else None, tuple(owners))
    head = run_tool(["head", "-c", str(_PLAIN_HEAD), "--", path],
                    user=os_user, capture_stdout=True, timeout=_PROBE_TIMEOUT_S)
    # Not an archive pg_restore can read: a plain SQL file, unless it looks
    # like a (broken) custom or tar archive, or cannot be read at all.
    if head.returncode != 0 or head.stdout.startswith("PGDMP") or head.stdout[257:262] == "ustar":
        raise ImportFailed(f"{path}: not a usable dump: {listing.stderr_tail[-1500:]}")
    version = _VERSION.search(head.stdout)
    # pg_dump's "ALTER ... OWNER TO name;" lines name the roles it needs.
    found = run_tool(["grep", "-ohE", "^ALTER .* OWNER TO .*;$", "--", path],
                     user=os_user, capture_stdout=True)
    named = {m.group(1).strip('"').replace('""', '"')
             for m in _PLAIN_OWNER.finditer(found.stdout)}
    return DumpInfo("plain", int(version.group(1)) if version else None, None,
                    tuple(sorted(named)))


def _refuse_special_files(path: str, os_user: str) -> None:
    # A directory archive's members are opened by name: a link could hand the
    # restore another file the import user can read.
    found = run_tool(["find", path, "-mindepth", "1", "!", "-type", "f", "-print", "-quit"],
                     user=os_user, capture_stdout=True, timeout=_PROBE_TIMEOUT_S)
    if found.returncode != 0 or found.stdout.strip():
        raise ImportFailed(f"{path}: a directory archive holds only regular files "
                           f"({(found.stdout.strip() or found.stderr_tail)[:300]})")


def from_dump(
    path: str,
    target: str,
    *,
    bin_dirs: Sequence[str],
    os_user: str,
    superuser: str,
    password: str,
    jobs: int = 1,
    database: str = "postgres",
    roles: Sequence[str] = (),
    major: int | None = None,
    progress: Progress | None = None,
    cancel: threading.Event | None = None,
) -> Imported:
    """Restore the dump at `path` into a fresh cluster in `target`.

    Archives (custom, directory, tar) go through `pg_restore --exit-on-error
    -j jobs` (tar: one job) into the database they were dumped from
    (`--create`); a plain SQL file through `psql -f` (ON_ERROR_STOP) into
    `database`. Both run as `os_user` against a private socket and read the
    dump with that user's rights. Roles owning objects in the dump, and
    `roles` (those it only grants to or names in policies), are created
    first (NOLOGIN). Each restored database is
    ANALYZEd. `major` is needed only for a plain file without pg_dump's
    header. Phases: "initdb", "restore" (archive bytes read / its size),
    "analyze".
    """
    info = dump_info(path, bin_dirs=bin_dirs, os_user=os_user)
    source_major = info.major or major
    if source_major is None:
        raise InvalidArgument("major", f"{path} does not say which PostgreSQL dumped it")
    if major is not None and major != source_major:
        raise InvalidArgument("major", f"{path} was dumped from PostgreSQL {source_major}")
    binaries = _binaries_for(source_major, f"the dump {path}", bin_dirs)
    if progress is not None:
        progress("initdb", 0, 0)
    initdb(target, binaries, os_user=os_user, superuser=superuser, password=password)
    _check(cancel)
    size = _dump_bytes(path, os_user)
    with staging(target, binaries, os_user=os_user, superuser=superuser) as stage:
        with psycopg.connect(stage.dsn("postgres"), autocommit=True) as conn:
            for role in sorted({*info.owners, *roles}):
                exists = conn.execute("SELECT 1 FROM pg_roles WHERE rolname = %s", (role,))
                if exists.fetchone() is None:
                    conn.execute(sql.SQL("CREATE ROLE {} NOLOGIN").format(sql.Identifier(role)))
            existing = {r[0] for r in conn.execute("SELECT datname FROM pg_database")}
            if info.format == "plain" and database not in existing:
                conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(database)))

        def on_tick(pid: int) -> None:
            if progress is not None:
                progress("restore", min(_bytes_read(pid), size), size)

        if info.format == "plain":
            argv = [binaries.psql, "-X", "-q", "-v", "ON_ERROR_STOP=1",
                    "-d", stage.dsn(database), "-f", path]
            restored = database
        else:
            restored = info.database or "postgres"
            # Into the database it came from: made by --create unless it exists.
            create = [] if restored in existing else ["--create"]
            into = restored if restored in existing else "postgres"
            argv = [_tool(binaries, "pg_restore"), "--exit-on-error", "--no-password",
                    f"--jobs={1 if info.format == 'tar' else max(1, jobs)}", *create,
                    "-d", stage.dsn(into), "--", path]
        result = run_tool(argv, user=os_user, cancel=cancel, on_tick=on_tick)
        if result.returncode != 0:
            tool = "psql" if info.format == "plain" else "pg_restore"
            raise ImportFailed(f"{tool} of {path} failed: {result.stderr_tail[-3000:]}")
        if progress is not None:
            progress("analyze", size, size)
        with psycopg.connect(stage.dsn(restored), autocommit=True) as conn:
            conn.execute("ANALYZE")
            databases = tuple(r[0] for r in conn.execute(
                "SELECT datname FROM pg_database WHERE datallowconn AND NOT datistemplate "
                "ORDER BY datname"))
    check_clean_shutdown(target, binaries, os_user=os_user)
    log.info("imported from dump", target=target, format=info.format, major=source_major)
    return Imported(source_major, superuser, databases)


def _check(cancel: threading.Event | None) -> None:
    """Between phases: a cancel that came while a step finished anyway."""
    if cancel is not None and cancel.is_set():
        raise Cancelled("the import was cancelled")


def _dump_bytes(path: str, os_user: str) -> int:
    result = run_tool(["du", "-s", "-b", "--", path], user=os_user, capture_stdout=True,
                      timeout=_PROBE_TIMEOUT_S)
    head = result.stdout.split()[:1]
    return int(head[0]) if head and head[0].isdigit() else 0


def _bytes_read(pid: int) -> int:
    """What the restore tool and its workers have read so far (their `rchar`:
    mostly the archive; the server's replies are small)."""
    total = 0
    try:
        proc = psutil.Process(pid)
        for p in [proc, *proc.children(recursive=True)]:
            try:
                total += p.io_counters().read_chars
            except psutil.Error:
                continue
    except psutil.Error:
        pass
    return total
