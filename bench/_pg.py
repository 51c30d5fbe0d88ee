"""Plain PostgreSQL for the benchmark: initdb, a postmaster started directly
(no daemon), readiness by polling `SELECT 1`, and stopping it by pid.

Used to build the pgbench source data directories and to run the baselines
(what users do today). Knows nothing about cowbranchd.
"""

from __future__ import annotations

import contextlib
import os
import pwd
import signal
import subprocess
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import psutil
import psycopg

__all__ = [
    "OS_USER",
    "PlainPostgres",
    "bin_path",
    "chown_to_os_user",
    "initdb",
    "run_as_os_user",
    "socket_dsn",
    "stop_postmasters_under",
]

OS_USER = "postgres"
PG_MAJOR = 15
_READY_POLL = 0.002  # seconds between connection attempts while a server starts


def bin_path(name: str) -> str:
    return f"/usr/lib/postgresql/{PG_MAJOR}/bin/{name}"


def chown_to_os_user(path: Path) -> None:
    user = pwd.getpwnam(OS_USER)
    os.chown(path, user.pw_uid, user.pw_gid)


def run_as_os_user(argv: Sequence[str], *, timeout: float) -> None:
    """Run a PostgreSQL tool as the postgres OS user; raise with its output on failure."""
    proc = subprocess.run(
        list(argv), user=OS_USER, group=OS_USER, cwd="/", capture_output=True, text=True,
        timeout=timeout, check=False, env={"PATH": "/usr/bin:/bin", "LC_ALL": "C"},
    )
    if proc.returncode != 0:
        raise RuntimeError(f"{argv} exited {proc.returncode}: {proc.stderr[-2000:]}")


def initdb(pgdata: Path) -> None:
    """A new cluster owned by postgres; superuser `postgres`, trusted locally,
    the same encoding and locale as the daemon's own initdb."""
    pgdata.mkdir(mode=0o700)
    chown_to_os_user(pgdata)
    run_as_os_user(
        [bin_path("initdb"), "-D", str(pgdata), "-U", "postgres", "--auth-local=trust",
         "--auth-host=scram-sha-256", "--encoding=UTF8", "--locale=C.UTF-8",
         "--no-instructions"],
        timeout=300,
    )


def socket_dsn(socket_dir: Path, port: int, database: str = "postgres") -> str:
    return f"host={socket_dir} port={port} user=postgres dbname={database}"


@dataclass
class PlainPostgres:
    """A postmaster this process spawned on `pgdata`, reached over a private socket."""

    pgdata: Path
    port: int
    socket_dir: Path
    proc: subprocess.Popen[bytes] | None = None

    def dsn(self, database: str = "postgres") -> str:
        return socket_dsn(self.socket_dir, self.port, database)

    def start(self, settings: Mapping[str, str] | None = None, timeout: float = 600.0) -> None:
        """Spawn postgres and return once `SELECT 1` answers on its socket."""
        self.socket_dir.mkdir(mode=0o755, parents=True, exist_ok=True)
        chown_to_os_user(self.socket_dir)
        argv = [bin_path("postgres"), "-D", str(self.pgdata), "-c", f"port={self.port}",
                "-c", f"unix_socket_directories={self.socket_dir}", "-c", "listen_addresses="]
        for name, value in (settings or {}).items():
            argv += ["-c", f"{name}={value}"]
        with open(self.pgdata.parent / f"{self.pgdata.name}.log", "ab") as log:
            self.proc = subprocess.Popen(
                argv, user=OS_USER, group=OS_USER, cwd="/", stdin=subprocess.DEVNULL,
                stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
            )
        deadline = time.monotonic() + timeout
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f"postgres on {self.pgdata} exited {self.proc.returncode}")
            try:
                with psycopg.connect(self.dsn(), connect_timeout=5, autocommit=True) as conn:
                    conn.execute("SELECT 1").fetchone()
                return
            except psycopg.OperationalError:
                if time.monotonic() > deadline:
                    self.stop()
                    raise
            time.sleep(_READY_POLL)

    def stop(self, timeout: float = 600.0) -> None:
        """Fast shutdown (a clean shutdown checkpoint), then SIGKILL if it hangs."""
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.send_signal(signal.SIGINT)
        try:
            self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(timeout=30)


def _alive(proc: psutil.Process) -> bool:
    try:
        return proc.is_running() and proc.status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False


def stop_postmasters_under(root: Path, timeout: float = 30.0) -> list[int]:
    """Stop every postmaster whose data directory lies under `root` (which the
    benchmark owns), by pid: SIGINT, then SIGQUIT, then SIGKILL. Returns pids."""
    prefix = str(root.resolve()).rstrip("/") + "/"
    found: list[psutil.Process] = []
    for proc in psutil.process_iter(["name", "ppid"]):
        try:
            if proc.info["name"] not in ("postgres", "postmaster"):
                continue
            parent_name = psutil.Process(proc.info["ppid"]).name()
            if parent_name in ("postgres", "postmaster"):
                continue  # a backend or auxiliary process: its postmaster is stopped
            if (proc.cwd().rstrip("/") + "/").startswith(prefix):
                found.append(proc)
        except psutil.Error:
            continue
    for sig in (signal.SIGINT, signal.SIGQUIT, signal.SIGKILL):
        alive = [p for p in found if _alive(p)]
        if not alive:
            break
        for proc in alive:
            with contextlib.suppress(psutil.Error):
                proc.send_signal(sig)
        psutil.wait_procs(alive, timeout=timeout)
    return [p.pid for p in found]
