"""Making a cluster and reaching it: `initdb` for a new base (its superuser's
password stored as a SCRAM verifier, cowbranchd's postgresql.conf defaults
and pg_hba.conf), `dsn` for a libpq URI, `checkpoint` before a running
cluster is snapshotted.

Nothing here knows about storage or gRPC; `cowbranchd.postgres` re-exports
the public names.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import ipaddress
import os
import pwd
import shutil
import socket
import tempfile
from collections.abc import Sequence
from urllib.parse import quote

import psutil
import psycopg
import structlog
from psycopg import sql

from cowbranchd import deadline
from cowbranchd.errors import InvalidArgument
from cowbranchd.run import run
from cowbranchd.safefs import append_regular, open_dir, replace_file

from .datadir import Binaries, check_clean_shutdown
from .postmaster import start
from .process import stop

__all__ = [
    "CONF_DEFAULTS",
    "PG_HBA",
    "checkpoint",
    "client_networks",
    "dsn",
    "hba_text",
    "initdb",
    "scram_verifier",
    "write_hba",
]

log = structlog.get_logger("cowbranchd.postgres")

# Appended to postgresql.conf of bases made here. Each one changes cost only,
# never what a query returns or how the planner sees the data.
CONF_DEFAULTS = """
# --- cowbranchd: defaults for copy-on-write branches (query semantics unchanged) ---
# On ZFS/btrfs, zero-filling and recycling WAL segments only costs extra
# copy-on-write blocks (see the PostgreSQL docs for both settings).
wal_init_zero = off
wal_recycle = off
# A crash-consistent clone fsyncs its whole data directory before redo; syncfs
# does that in one call.
recovery_init_sync_method = syncfs
"""

# pg_hba.conf of bases and branches. Local (socket) connections are trusted:
# the per-branch socket directory's mode (its own uid's) is the gate. Over TCP,
# the password, and only from the networks of the addresses postgres listens
# on (`client_networks`): loopback alone by default.
_HBA_HEAD = """\
# Written by cowbranchd.
# TYPE  DATABASE     USER  ADDRESS     METHOD
local   all          all               trust
local   replication  all               trust
"""
LOOPBACK = ("127.0.0.1/32", "::1/128")


def hba_text(networks: Sequence[str] = LOOPBACK) -> str:
    lines = [_HBA_HEAD]
    for database in ("all", "replication"):
        lines.extend(f"host    {database:<11}  all   {net:<11} scram-sha-256\n" for net in networks)
    return "".join(lines)


PG_HBA = hba_text()


def client_networks(listen_addresses: str) -> tuple[str, ...]:
    """Where TCP clients may come from, given postgres's listen_addresses:
    a loopback address admits itself; another address the subnet of the
    interface that carries it; `*`, `0.0.0.0` or `::` (listening everywhere)
    any address; a host name the subnets the server is connected to."""
    networks: list[str] = []
    for item in (part.strip() for part in listen_addresses.split(",")):
        if not item:
            continue
        if item in ("*", "0.0.0.0", "::"):
            networks += ["0.0.0.0/0", "::/0"] if item == "*" else [f"{item}/0"]
            continue
        if item == "localhost":
            networks += LOOPBACK
            continue
        try:
            address = ipaddress.ip_address(item)
        except ValueError:
            networks.append("samenet")
            continue
        if address.is_loopback:
            networks.append(f"{address}/{address.max_prefixlen}")
            continue
        # Read only here: every create writes pg_hba, most listen on loopback.
        nets = [
            ipaddress.ip_network(f"{a.address.split('%')[0]}/{a.netmask}", strict=False)
            for addrs in psutil.net_if_addrs().values()
            for a in addrs
            if a.family in (socket.AF_INET, socket.AF_INET6)
            and a.netmask
            and a.address.split("%")[0] == str(address)
        ]
        networks.append(str(nets[0]) if nets else f"{address}/{address.max_prefixlen}")
    return tuple(dict.fromkeys(networks)) or LOOPBACK


def write_hba(
    pgdata: str | os.PathLike[str], os_user: str, networks: Sequence[str] = LOOPBACK
) -> None:
    """Replace pg_hba.conf with `hba_text(networks)`, owned by `os_user`,
    without following whatever may sit at that name."""
    user = pwd.getpwnam(os_user)
    with open_dir(pgdata) as dir_fd:
        replace_file(
            dir_fd, "pg_hba.conf", hba_text(networks).encode(), uid=user.pw_uid, gid=user.pw_gid
        )


# Iterations of the SCRAM-SHA-256 verifiers cowbranchd stores (PostgreSQL's
# own default is 4096). The count only slows an offline guess at a stolen
# verifier; against the random 144-bit passwords the daemon generates that is
# hopeless at any count, while 4096 rounds cost ~2-4 ms on each side of every
# connection, the daemon's readiness check and the client's first one alike.
SCRAM_ITERATIONS = 32
CHECKPOINT_TIMEOUT_S = 120.0


def scram_verifier(password: str, *, iterations: int = SCRAM_ITERATIONS, salt: bytes = b"") -> str:
    """The `SCRAM-SHA-256$...` verifier of `password` (RFC 5802/7677), which
    ALTER ROLE ... PASSWORD and initdb --pwfile store as given."""
    salt = salt or os.urandom(16)
    salted = hashlib.pbkdf2_hmac("sha256", password.encode(), salt, iterations)
    client_key = hmac.new(salted, b"Client Key", hashlib.sha256).digest()
    stored_key = hashlib.sha256(client_key).digest()
    server_key = hmac.new(salted, b"Server Key", hashlib.sha256).digest()
    b64 = base64.b64encode
    return (
        f"SCRAM-SHA-256${iterations}:{b64(salt).decode()}"
        f"${b64(stored_key).decode()}:{b64(server_key).decode()}"
    )


def dsn(host: str, port: int, user: str, password: str, database: str) -> str:
    """A libpq URI; `host` may be a name, an IP address or a socket directory."""
    auth = quote(user, safe="")
    if password:
        auth += ":" + quote(password, safe="")
    db = quote(database, safe="")
    if host.startswith("/"):
        return f"postgresql://{auth}@:{port}/{db}?host={quote(host, safe='')}"
    if ":" in host:
        host = f"[{host}]"
    return f"postgresql://{auth}@{quote(host, safe='[]:')}:{port}/{db}"


def checkpoint(conninfo: str, timeout: float = CHECKPOINT_TIMEOUT_S) -> None:
    """Run CHECKPOINT, so a snapshot of the running cluster recovers quickly;
    within `timeout` (and the call's deadline), connection included."""
    limit = deadline.bounded(timeout, "CHECKPOINT") or timeout
    # The daemon's own statement_timeout, not the branch's (a client's
    # setting must neither cut the checkpoint short nor let it run forever).
    options = f"-c statement_timeout={int(limit * 1000)} -c lock_timeout=0"
    with psycopg.connect(
        conninfo, autocommit=True, options=options, connect_timeout=max(1, int(limit))
    ) as conn:
        conn.execute("CHECKPOINT")


def _check_text(field: str, value: str, *, allow_empty: bool = False) -> None:
    if not value and not allow_empty:
        raise InvalidArgument(field, "must not be empty")
    if any(c in value for c in "\0\n\r"):
        raise InvalidArgument(field, "must not contain NUL or line breaks")


def initdb(
    pgdata: str,
    binaries: Binaries,
    *,
    os_user: str,
    superuser: str,
    password: str,
    database: str | None = None,
    init_sql: str | None = None,
    locale: str = "C.UTF-8",
) -> None:
    """Create a new base cluster in the existing, empty directory `pgdata`.

    The cluster is owned by `os_user`; `superuser` logs in over TCP with
    `password` (scram-sha-256), over the socket without one. If `database` or
    `init_sql` is given, the cluster is started on a private socket to create
    the database and run the script (with psql, ON_ERROR_STOP), then shut down
    cleanly. Ownership is set here, once, for every file: clones inherit it.
    """
    _check_text("superuser", superuser)
    _check_text("password", password)
    if database is not None:
        _check_text("database", database)
    user = pwd.getpwnam(os_user)
    os.chown(pgdata, user.pw_uid, user.pw_gid)
    os.chmod(pgdata, 0o700)
    with tempfile.TemporaryDirectory(prefix="cowbranchd-initdb-") as scratch:
        # Scratch is root's; the password file in it is os_user's and private.
        os.chmod(scratch, 0o711)
        pwfile = os.path.join(scratch, "pwfile")
        fd = os.open(pwfile, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(password + "\n")
        os.chown(pwfile, user.pw_uid, user.pw_gid)
        run(
            [
                binaries.initdb,
                "-D",
                pgdata,
                "-U",
                superuser,
                f"--pwfile={pwfile}",
                "--auth-local=trust",
                "--auth-host=scram-sha-256",
                "--encoding=UTF8",
                f"--locale={locale}",
                "--no-instructions",
            ],
            user=os_user,
        )
        os.unlink(pwfile)
        # initdb ran as os_user (uid and gid), so every file is already its
        # own; only these two are written here, by descriptor.
        with open_dir(pgdata) as dir_fd:
            append_regular(
                dir_fd,
                "postgresql.conf",
                CONF_DEFAULTS.encode(),
                shown=os.path.join(pgdata, "postgresql.conf"),
            )
        write_hba(pgdata, os_user)
        if database is not None or init_sql is not None:
            _initialise(
                pgdata,
                binaries=binaries,
                os_user=os_user,
                superuser=superuser,
                database=database,
                init_sql=init_sql,
                scratch=scratch,
            )
    log.debug("initdb", pgdata=pgdata, major=binaries.major, database=database)


def _initialise(
    pgdata: str,
    *,
    binaries: Binaries,
    os_user: str,
    superuser: str,
    database: str | None,
    init_sql: str | None,
    scratch: str,
) -> None:
    socket_dir = os.path.join(scratch, "socket")
    port = 5432  # no TCP (listen_addresses is empty): only names the socket file
    socket_dsn = dsn(socket_dir, port, superuser, "", "postgres")
    pm = start(
        pgdata,
        binaries=binaries,
        os_user=os_user,
        port=port,
        socket_dir=socket_dir,
        listen_addresses="",
        settings={},
        log_path=os.path.join(scratch, "postgres.log"),
        ready_dsn=socket_dsn,
    )
    try:
        if database is not None and database != "postgres":
            with psycopg.connect(socket_dsn, autocommit=True) as conn:
                conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(database)))
        if init_sql is not None:
            # psql, not psycopg: init scripts are often pg_dump output
            # (COPY FROM stdin, backslash commands).
            run(
                [
                    binaries.psql,
                    "-X",
                    "-q",
                    "-v",
                    "ON_ERROR_STOP=1",
                    "-d",
                    dsn(socket_dir, port, superuser, "", database or "postgres"),
                    "-f",
                    "-",
                ],
                # As os_user with no supplementary group and no_new_privs (the
                # run helper): a `\\!` shell escape gets nothing root has.
                input=init_sql,
                user=os_user,
            )
    finally:
        stop(pm)
    check_clean_shutdown(pgdata, binaries, os_user=os_user)
    shutil.rmtree(socket_dir, ignore_errors=True)
