"""cowbranchd.postgres against a real PostgreSQL 15: initdb, start, adopt, stop, faults."""

from __future__ import annotations

import base64
import contextlib
import ctypes
import ipaddress
import json
import os
import pwd
import signal
import socket
import subprocess
import sys
from pathlib import Path
from urllib.parse import quote

import psutil
import psycopg
import pytest

from cowbranchd import postgres
from cowbranchd.errors import FailedPrecondition, InvalidArgument, NotFound, PostgresError
from cowbranchd.ports import PortAllocator
from cowbranchd.run import run

from .fix_postgres import (
    BIN_DIRS,
    DATABASE,
    OS_USER,
    PASSWORD,
    PG_MAJOR,
    SUPERUSER,
    PgDir,
    StartPg,
)

PR_SET_CHILD_SUBREAPER = 36


def _gone(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


def _postgres_under(pgdata: str) -> list[int]:
    real = os.path.realpath(pgdata)
    return [
        p.pid
        for p in psutil.process_iter(["name", "cwd"])
        if p.info["name"] == "postgres" and p.info["cwd"] == real
    ]


def test_find_binaries_picks_the_matching_major(pg_binaries: postgres.Binaries) -> None:
    """The binaries of the requested major come from its templated directory."""
    assert pg_binaries == postgres.Binaries(PG_MAJOR, f"/usr/lib/postgresql/{PG_MAJOR}/bin")
    assert PG_MAJOR in postgres.installed_versions(BIN_DIRS)


def test_find_binaries_names_needed_and_installed_versions(
    pg_binaries: postgres.Binaries,
) -> None:
    """A missing major is NotFound, naming the version needed and those installed."""
    with pytest.raises(NotFound, match=rf"PostgreSQL 99 is needed .*installed: .*{PG_MAJOR}"):
        postgres.find_binaries(99, BIN_DIRS)


def test_base_made_by_initdb_is_clean_and_versioned(
    pg_base: str, pg_binaries: postgres.Binaries
) -> None:
    """initdb leaves a cleanly shut down cluster owned by the OS user, with our hba."""
    assert postgres.pg_version(pg_base) == PG_MAJOR
    postgres.check_clean_shutdown(pg_base, pg_binaries, os_user=OS_USER)
    owners = {Path(p).owner() for p in (pg_base, f"{pg_base}/PG_VERSION", f"{pg_base}/base")}
    assert owners == {OS_USER}
    hba = Path(pg_base, "pg_hba.conf").read_text()
    assert "local   all          all               trust" in hba
    assert "host    all          all   127.0.0.1/32 scram-sha-256" in hba
    assert "0.0.0.0/0" not in hba


def test_client_networks_follow_the_listen_addresses() -> None:
    """pg_hba admits TCP clients only from where postgres listens: a loopback
    address itself, an interface's address its subnet, everywhere only when
    listening everywhere; a host name the server's own subnets."""
    assert postgres.client_networks("127.0.0.1") == ("127.0.0.1/32",)
    assert postgres.client_networks("localhost") == ("127.0.0.1/32", "::1/128")
    assert postgres.client_networks("*") == ("0.0.0.0/0", "::/0")
    assert postgres.client_networks("0.0.0.0, 127.0.0.1") == ("0.0.0.0/0", "127.0.0.1/32")
    assert postgres.client_networks("192.0.2.7") == ("192.0.2.7/32",)  # on no interface here
    assert postgres.client_networks("db.example") == ("samenet",)
    assert postgres.client_networks("") == ("127.0.0.1/32", "::1/128")
    for addrs in psutil.net_if_addrs().values():
        for a in addrs:
            if a.family == socket.AF_INET and a.netmask and not a.address.startswith("127."):
                expected = ipaddress.ip_network(f"{a.address}/{a.netmask}", strict=False)
                assert postgres.client_networks(a.address) == (str(expected),)


def test_pg_version_rejects_a_directory_without_pg_version(tmp_path: Path) -> None:
    """A directory that is not a data directory fails the precondition."""
    with pytest.raises(FailedPrecondition, match="not a PostgreSQL data directory"):
        postgres.pg_version(tmp_path)


def test_foreign_owned_names_files_of_another_group_and_never_enters_a_link(
    tmp_path: Path,
) -> None:
    """A file of root's group is named with its owner; a link to a directory full of root's
    files is only a link (owned by postgres): the walk never enters it."""
    owner = pwd.getpwnam(OS_USER)
    pgdata = tmp_path / "pgdata"
    (pgdata / "pg_logical").mkdir(parents=True)
    (pgdata / "pg_tblspc").mkdir()
    (pgdata / "pg_logical" / "replorigin_checkpoint").write_bytes(b"\0" * 8)
    (pgdata / "pg_tblspc" / "16384").symlink_to("/root")
    for path in (pgdata, *pgdata.rglob("*")):
        os.chown(path, owner.pw_uid, owner.pw_gid, follow_symlinks=False)
    assert postgres.foreign_owned(pgdata, owner.pw_uid, owner.pw_gid) == ""
    os.chown(pgdata / "pg_logical" / "replorigin_checkpoint", owner.pw_uid, 0)
    assert postgres.foreign_owned(pgdata, owner.pw_uid, owner.pw_gid) == (
        f"pg_logical/replorigin_checkpoint is {OS_USER}:root ({owner.pw_uid}:0)"
    )


def test_started_branch_answers_psycopg_and_psql(pg_dir: PgDir, start_pg: StartPg) -> None:
    """A started branch answers over TCP with the password and over its socket."""
    branch = start_pg(pg_dir)
    with psycopg.connect(branch.dsn) as conn:
        assert conn.execute("SELECT word FROM greeting").fetchall() == [("hello",)]
        assert conn.execute("SHOW archive_mode").fetchone() == ("off",)
    out = run(
        [f"/usr/lib/postgresql/{PG_MAJOR}/bin/psql", "-XAtc", "SELECT 1", branch.socket_dsn],
        user=OS_USER,
    ).stdout
    assert out == "1\n"
    out = run(
        [f"/usr/lib/postgresql/{PG_MAJOR}/bin/psql", "-XAtc", "SELECT 1", branch.dsn],
        env={"PATH": "/usr/bin:/bin"},
    ).stdout
    assert out == "1\n"


def test_wrong_password_is_refused_over_tcp(pg_dir: PgDir, start_pg: StartPg) -> None:
    """TCP connections need the password (scram-sha-256), the socket does not."""
    branch = start_pg(pg_dir)
    bad = postgres.dsn("127.0.0.1", branch.port, SUPERUSER, "wrong", DATABASE)
    with pytest.raises(psycopg.OperationalError, match="password authentication failed"):
        psycopg.connect(bad).close()


def test_postgres_runs_as_os_user_without_daemon_environment(
    pg_dir: PgDir, start_pg: StartPg, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The postmaster runs as the OS user and inherits no systemd or libpq variables."""
    for name in ("NOTIFY_SOCKET", "LISTEN_PID", "LISTEN_FDS", "WATCHDOG_USEC", "PGPASSWORD"):
        monkeypatch.setenv(name, "1")
    branch = start_pg(pg_dir)
    proc = psutil.Process(branch.postmaster.pid)
    assert proc.username() == OS_USER
    assert proc.gids().real == proc.gids().effective != 0
    leaked = {k for k in proc.environ() if k.startswith(("NOTIFY_", "LISTEN_", "WATCHDOG_", "PGP"))}
    assert leaked == set()
    assert os.stat(pg_dir.socket_dir).st_mode & 0o777 == 0o750


def test_stop_leaves_a_clean_cluster_and_no_process(
    pg_dir: PgDir, start_pg: StartPg, pg_binaries: postgres.Binaries
) -> None:
    """A stopped branch is gone (reaped) and its cluster passes the clean-shutdown check."""
    branch = start_pg(pg_dir)
    postgres.stop(branch.postmaster)
    with pytest.raises(psutil.NoSuchProcess):
        psutil.Process(branch.postmaster.pid).status()
    assert _postgres_under(pg_dir.pgdata) == []
    postgres.check_clean_shutdown(pg_dir.pgdata, pg_binaries, os_user=OS_USER)
    postgres.stop(branch.postmaster)  # idempotent
    postgres.stop(branch.postmaster.pid)


def test_sigkilled_postmaster_leaves_a_dirty_cluster_that_restarts(
    pg_dir: PgDir, start_pg: StartPg, pg_binaries: postgres.Binaries
) -> None:
    """After SIGKILL the clean-shutdown check names the state; a restart recovers it."""
    branch = start_pg(pg_dir)
    os.kill(branch.postmaster.pid, signal.SIGKILL)
    postgres.stop(branch.postmaster)  # reaps it and ends its orphaned backends
    assert postgres.find_postmaster(pg_dir.pgdata) is None
    assert [pid for pid in _postgres_under(pg_dir.pgdata) if not _gone(pid)] == []
    with pytest.raises(FailedPrecondition, match="cluster state: 'in production'"):
        postgres.check_clean_shutdown(pg_dir.pgdata, pg_binaries, os_user=OS_USER)
    postgres.prepare_clone(pg_dir.pgdata)
    again = start_pg(pg_dir)
    with psycopg.connect(again.dsn) as conn:
        assert conn.execute("SELECT count(*) FROM greeting").fetchone() == (1,)


@pytest.mark.parametrize(
    ("settings", "logged"),
    [
        ({"shared_buffers": "banana"}, 'invalid value for parameter "shared_buffers"'),
        ({"no_such_setting": "1"}, 'unrecognized configuration parameter "no_such_setting"'),
    ],
)
def test_broken_setting_fails_at_once_with_the_log_tail(
    pg_dir: PgDir, start_pg: StartPg, settings: dict[str, str], logged: str
) -> None:
    """A setting postgres rejects fails start on the exit (not a timeout), log tail attached."""
    with pytest.raises(PostgresError, match="exited with code 1 while starting") as info:
        start_pg(pg_dir, settings=settings)
    assert not isinstance(info.value, postgres.PortInUse)
    assert logged in info.value.log_tail
    assert _postgres_under(pg_dir.pgdata) == []


def test_broken_postgresql_conf_fails_at_once(pg_dir: PgDir, start_pg: StartPg) -> None:
    """A broken postgresql.conf fails start with the offending line in the log tail."""
    with open(os.path.join(pg_dir.pgdata, "postgresql.conf"), "a") as conf:
        conf.write("this is not = = a setting\n")
    with pytest.raises(PostgresError, match="exited with code 1") as info:
        start_pg(pg_dir)
    assert "syntax error in file" in info.value.log_tail
    assert _postgres_under(pg_dir.pgdata) == []


def test_taken_port_raises_port_in_use(pg_dir: PgDir, start_pg: StartPg) -> None:
    """Starting on a port someone else listens on raises PortInUse, leaving nothing running."""
    with socket.socket() as squatter:
        squatter.bind(("127.0.0.1", 0))
        squatter.listen()
        port = squatter.getsockname()[1]
        with pytest.raises(postgres.PortInUse) as info:
            start_pg(pg_dir, port=port)
    assert "Address already in use" in info.value.log_tail
    assert _postgres_under(pg_dir.pgdata) == []


def test_allocator_skips_squatted_port_and_start_uses_the_next(
    pg_dir: PgDir, start_pg: StartPg
) -> None:
    """A port squatted outside the daemon is skipped by the allocator; the branch starts."""
    with socket.socket() as squatter:
        squatter.bind(("127.0.0.1", 0))
        port = squatter.getsockname()[1]
        allocator = PortAllocator(port, port + 1, "127.0.0.1")
        chosen = allocator.allocate()
        assert chosen == port + 1
        branch = start_pg(pg_dir, port=chosen)
        assert branch.postmaster.port == port + 1


def test_prepare_clone_removes_pid_signal_files_and_slots(tmp_path: Path) -> None:
    """prepare_clone drops postmaster.pid, *.signal and replication slots, nothing else."""
    for name in ("postmaster.pid", "standby.signal", "recovery.signal", "PG_VERSION"):
        (tmp_path / name).write_text("x")
    (tmp_path / "pg_replslot" / "slot_a").mkdir(parents=True)
    (tmp_path / "pg_replslot" / "slot_a" / "state").write_text("x")
    postgres.prepare_clone(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["PG_VERSION", "pg_replslot"]
    assert list((tmp_path / "pg_replslot").iterdir()) == []
    postgres.prepare_clone(tmp_path)  # again: nothing to do is fine


def test_find_postmaster_adopts_a_live_one(pg_dir: PgDir, start_pg: StartPg) -> None:
    """find_postmaster returns the live postmaster named by postmaster.pid, stoppable."""
    branch = start_pg(pg_dir)
    found = postgres.find_postmaster(pg_dir.pgdata)
    assert found == branch.postmaster
    assert (found.port, found.socket_dir) == (branch.port, pg_dir.socket_dir)
    postgres.stop(found)
    assert _gone(branch.postmaster.pid)


def test_find_postmaster_rejects_a_stale_pid_file(
    pg_dir: PgDir, start_pg: StartPg, pg_binaries: postgres.Binaries
) -> None:
    """A pid file whose pid is gone, or is not that cluster's postgres, is not adopted."""
    branch = start_pg(pg_dir)
    pid_file = Path(pg_dir.pgdata, "postmaster.pid")
    stale = pid_file.read_text()
    postgres.stop(branch.postmaster)
    pid_file.write_text(stale)
    assert postgres.find_postmaster(pg_dir.pgdata) is None
    pid_file.write_text(stale.replace(str(branch.postmaster.pid), str(os.getpid()), 1))
    assert postgres.find_postmaster(pg_dir.pgdata) is None


def test_adopts_and_stops_a_postmaster_started_by_a_previous_daemon(
    pg_dir: PgDir, pg_binaries: postgres.Binaries, pg_ports: PortAllocator
) -> None:
    """A postmaster that is not our child (its daemon exited) is adopted and stopped."""
    port = pg_ports.allocate()
    args = {
        "pgdata": pg_dir.pgdata,
        "bindir": pg_binaries.bindir,
        "port": port,
        "socket_dir": pg_dir.socket_dir,
        "log_path": pg_dir.log_path,
        "dsn": postgres.dsn(pg_dir.socket_dir, port, SUPERUSER, "", DATABASE),
    }
    script = (
        "import json, sys; from cowbranchd import postgres as pg; a = json.loads(sys.argv[1]);"
        "pm = pg.start(a['pgdata'], binaries=pg.Binaries(15, a['bindir']), os_user='postgres',"
        " port=a['port'], socket_dir=a['socket_dir'], listen_addresses='127.0.0.1',"
        " settings={}, log_path=a['log_path'], ready_dsn=a['dsn']); print(pm.pid)"
    )
    # The orphaned postmaster is re-parented to us rather than to PID 1 (which
    # may not reap), so the test can reap it; cowbranchd itself never waits on it.
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0)
    pid = 0
    try:
        out = subprocess.run(
            [sys.executable, "-c", script, json.dumps(args)],
            check=True,
            capture_output=True,
            text=True,
        ).stdout
        pid = int(out.split()[-1])  # structlog may print debug lines first
        found = postgres.find_postmaster(pg_dir.pgdata)
        assert found is not None
        assert (found.pid, found.port, found.is_child) == (pid, port, False)
        with psycopg.connect(postgres.dsn("127.0.0.1", port, SUPERUSER, PASSWORD, DATABASE)):
            pass
        postgres.stop(found)
        assert _gone(pid)
        assert postgres.find_postmaster(pg_dir.pgdata) is None
    finally:
        libc.prctl(PR_SET_CHILD_SUBREAPER, 0, 0, 0, 0)
        if pid:
            postgres.stop(pid, fast_timeout=0)
            with contextlib.suppress(ChildProcessError):
                os.waitpid(pid, 0)
        pg_ports.release(port)


def test_checkpoint_runs_on_a_live_branch(pg_dir: PgDir, start_pg: StartPg) -> None:
    """checkpoint() runs CHECKPOINT through the branch's DSN."""
    branch = start_pg(pg_dir)
    with psycopg.connect(branch.dsn) as conn:
        before = conn.execute("SELECT checkpoint_lsn FROM pg_control_checkpoint()").fetchone()
        conn.execute("CREATE TABLE after_start (i int)")
        conn.commit()
    postgres.checkpoint(branch.dsn)
    with psycopg.connect(branch.dsn) as conn:
        after = conn.execute("SELECT checkpoint_lsn FROM pg_control_checkpoint()").fetchone()
    assert after != before


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (("127.0.0.1", 5432, "u", "p", "db"), "postgresql://u:p@127.0.0.1:5432/db"),
        (("::1", 5432, "u", "p", "db"), "postgresql://u:p@[::1]:5432/db"),
        (
            ("/run/sock dir", 54001, "us er", "p@ss:/?#", "my/db"),
            "postgresql://us%20er:p%40ss%3A%2F%3F%23@:54001/my%2Fdb?host=%2Frun%2Fsock%20dir",
        ),
        (("db.example", 1, "u", "", "d"), "postgresql://u@db.example:1/d"),
    ],
)
def test_dsn_quotes_every_part(args: tuple[str, int, str, str, str], expected: str) -> None:
    """dsn() builds a libpq URI with every part percent-quoted."""
    assert postgres.dsn(*args) == expected


def test_dsn_round_trips_through_libpq() -> None:
    """libpq parses dsn()'s output back into the same parts."""
    parts = psycopg.conninfo.conninfo_to_dict(
        postgres.dsn("/run/x y", 54001, "us er", "p@ss:/?#", "my/db")
    )
    assert parts == {
        "host": "/run/x y",
        "port": "54001",
        "user": "us er",
        "password": "p@ss:/?#",
        "dbname": "my/db",
    }


@pytest.mark.parametrize(
    ("settings", "problem"),
    [
        ({"Shared_Buffers": "1"}, "is not a setting name"),
        ({"1abc": "1"}, "is not a setting name"),
        ({"a-b": "1"}, "is not a setting name"),
        ({"a=b": "1"}, "is not a setting name"),
        ({"": "1"}, "is not a setting name"),
        ({"x" * 64: "1"}, "is not a setting name"),
        ({"work_mem": "1\n"}, "NUL or a line break"),
        ({"work_mem": "1\0"}, "NUL or a line break"),
        ({"work_mem": "x" * 4097}, "longer than 4096"),
        ({"port": "1"}, "port is set by cowbranchd"),
        ({"listen_addresses": "*"}, "set by cowbranchd"),
        ({"unix_socket_directories": "/tmp"}, "set by cowbranchd"),
        ({"data_directory": "/"}, "set by cowbranchd"),
        ({"hba_file": "/x"}, "set by cowbranchd"),
        ({"config_file": "/x"}, "set by cowbranchd"),
        ({"archive_mode": "on"}, "set by cowbranchd"),
        ({"archive_command": "true"}, "set by cowbranchd"),
        ({"logging_collector": "on"}, "set by cowbranchd"),
    ],
)
def test_validate_settings_rejects(settings: dict[str, str], problem: str) -> None:
    """Bad names, values and daemon-owned settings are INVALID_ARGUMENT on postgres_settings."""
    with pytest.raises(InvalidArgument, match=problem) as info:
        postgres.validate_settings(settings)
    assert info.value.field == "postgres_settings"


def test_validate_settings_accepts_ordinary_settings() -> None:
    """Ordinary and extension settings pass, including empty and '=' in values."""
    postgres.validate_settings(
        {"work_mem": "64MB", "pg_stat_statements.max": "1000", "search_path": "", "x.y": "a=b"}
    )


def test_start_rejects_invalid_settings_before_spawning(pg_dir: PgDir, start_pg: StartPg) -> None:
    """start() validates settings itself, so nothing is spawned for a daemon-owned one."""
    with pytest.raises(InvalidArgument, match="set by cowbranchd"):
        start_pg(pg_dir, settings={"port": "1"})
    assert not os.path.exists(pg_dir.log_path)


def test_scram_verifier_matches_postgres_and_authenticates(
    pg_dir: PgDir, start_pg: StartPg
) -> None:
    """scram_verifier computes what postgres itself stores for a password, and a
    cheap verifier it sets still authenticates over TCP (and refuses others)."""
    branch = start_pg(pg_dir)
    with psycopg.connect(branch.dsn, autocommit=True) as conn:
        row = conn.execute(
            "SELECT rolpassword FROM pg_authid WHERE rolname = current_user"
        ).fetchone()
        assert row is not None
        stored = str(row[0])
        iterations, salt = stored.removeprefix("SCRAM-SHA-256$").split("$")[0].split(":")
        assert postgres.scram_verifier(
            PASSWORD, iterations=int(iterations), salt=base64.b64decode(salt)
        ) == stored
        cheap = postgres.scram_verifier(PASSWORD)
        assert cheap.startswith(f"SCRAM-SHA-256${postgres.SCRAM_ITERATIONS}:")
        conn.execute(f"ALTER ROLE current_user PASSWORD '{cheap}'")
    with psycopg.connect(branch.dsn) as conn:
        assert conn.execute("SELECT 1").fetchone() == (1,)
    wrong = branch.dsn.replace(quote(PASSWORD, safe=""), "nope")
    with pytest.raises(psycopg.OperationalError, match="password authentication failed"):
        psycopg.connect(wrong).close()
