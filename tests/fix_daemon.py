"""Fixtures that run a real cowbranchd daemon (a subprocess, as in production)
on a real copy-on-write pool, reached over a real Unix socket.

`daemon` is one session-wide daemon on btrfs with a demo base; tests that
kill or reconfigure a daemon take their own from `daemon_factory`. Teardown
stops the daemon and every postmaster it left running (branches outlive the
daemon by design), by pid.
"""

from __future__ import annotations

import itertools
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import grpc
import psutil
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from cowbranchd import postgres
from cowbranchd.storage import idmap
from cowbranchd.v1 import bases_pb2_grpc, branches_pb2_grpc

_counter = itertools.count()
# Every daemon the session made, so a pool's fixture can stop the daemons on
# it before it goes (fixtures tear down in reverse order of set-up, and a
# zfs-fuse pool set up after the factory would otherwise go first: "busy").
_HANDLES: list[DaemonHandle] = []


def stop_daemons_on(pool_name: str) -> None:
    """Stop every daemon (and its postmasters and mounts) using `pool_name`."""
    for handle in _HANDLES:
        if handle.driver == "zfs" and handle.pool_root.split("/")[0] == pool_name:
            handle.cleanup()


PORT_BLOCK = 200
# Concurrent test runs on one machine pick apart blocks with COWBRANCHD_TEST_FIRST_PORT.
FIRST_PORT = int(os.environ.get("COWBRANCHD_TEST_FIRST_PORT", "56000"))


@dataclass
class DaemonHandle:
    """A cowbranchd subprocess and everything needed to talk to it."""

    workdir: Path
    pool_root: str
    driver: str
    ports: tuple[int, int]
    base: str = "demo"
    extra_config: str = ""
    # Extra `key = value` lines per config section, e.g. {"daemon": "max_branches = 1"}.
    sections: dict[str, str] = field(default_factory=dict)
    env: dict[str, str] = field(default_factory=dict)
    proc: subprocess.Popen[bytes] | None = None
    log_lines: list[str] = field(default_factory=list)

    @property
    def socket_path(self) -> Path:
        return self.workdir / "run" / "api.sock"

    @property
    def address(self) -> str:
        return f"unix://{self.socket_path}"

    @property
    def config_path(self) -> Path:
        return self.workdir / "config.toml"

    @property
    def log_path(self) -> Path:
        return self.workdir / "daemon.log"

    def write_config(self) -> None:
        self.config_path.write_text(
            f"""
[daemon]
socket = "{self.socket_path}"
state_dir = "{self.workdir / "state"}"
log_format = "json"
log_level = "debug"
reap_interval = "200ms"
drain_timeout = "5s"
import_roots = ["/tmp"]
{self.sections.get("daemon", "")}

[storage]
driver = "{self.driver}"
root = "{self.pool_root}"
{self.sections.get("storage", "")}

[postgres]
port_range = "{self.ports[0]}-{self.ports[1]}"
socket_root = "{self.workdir / "pg"}"
{self.sections.get("postgres", "")}

[demo]
base_id = "{self.base}"
{self.extra_config}
"""
        )

    def start(self, *, wait: bool = True) -> None:
        self.write_config()
        log = self.log_path.open("ab")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "cowbranchd.daemon", "--config", str(self.config_path)],
            stdout=log,
            stderr=subprocess.STDOUT,
            env={**os.environ, **self.env},
        )
        log.close()
        if wait:
            self.wait_serving()

    def wait_serving(self, timeout: float = 120.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            assert self.proc is not None
            if self.proc.poll() is not None:
                tail = self.log_path.read_text()[-4000:]
                raise RuntimeError(f"cowbranchd exited {self.proc.returncode}:\n{tail}")
            if self.socket_path.exists() and self.health() == "SERVING":
                return
            time.sleep(0.05)
        raise RuntimeError(
            f"cowbranchd not SERVING in {timeout}s:\n{self.log_path.read_text()[-4000:]}"
        )

    def channel(self) -> grpc.Channel:
        return grpc.insecure_channel(self.address)

    def health(self, service: str = "") -> str:
        with self.channel() as channel:
            stub = health_pb2_grpc.HealthStub(channel)
            try:
                resp = stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=2)
            except grpc.RpcError:
                return "UNREACHABLE"
        return str(health_pb2.HealthCheckResponse.ServingStatus.Name(resp.status))

    def branches(self, channel: grpc.Channel) -> branches_pb2_grpc.BranchServiceStub:
        return branches_pb2_grpc.BranchServiceStub(channel)

    def bases(self, channel: grpc.Channel) -> bases_pb2_grpc.BaseServiceStub:
        return bases_pb2_grpc.BaseServiceStub(channel)

    def kill(self, sig: int = signal.SIGKILL) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                self.proc.kill()  # never leak a daemon, even when it hangs
                self.proc.wait(timeout=60)
                raise

    def stop(self) -> None:
        self.kill(signal.SIGTERM)

    def postmasters(self) -> list[psutil.Process]:
        """Live postmasters whose data directory lies in this daemon's pool."""
        found = []
        for pid_file in self._pid_files():
            master = postgres.find_postmaster(str(pid_file.parent))
            if master is not None:
                found.append(psutil.Process(master.pid))
        return found

    @property
    def mount_root(self) -> Path:
        """Where the daemon mounts each isolated branch's data directory."""
        return self.workdir / "state" / "mnt"

    def run_dir(self, volume: str) -> Path:
        """The data directory a branch volume's postmaster runs on: its
        idmapped mount when the branch has a uid of its own, else its pgdata."""
        mounted = self.mount_root / volume
        if mounted.is_dir() and idmap.is_idmapped_mount(mounted):
            return mounted
        if self.driver == "btrfs":
            return Path(self.pool_root) / "branches" / volume / "pgdata"
        out = subprocess.run(
            [
                "zfs",
                "get",
                "-H",
                "-o",
                "value",
                "mountpoint",
                f"{self.pool_root}/branches/{volume}",
            ],
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
        return Path(out) / "pgdata"

    def _pid_files(self) -> list[Path]:
        # A branch with its own uid runs on its idmapped mount: look there first.
        mounted = list(self.mount_root.glob("*/postmaster.pid"))
        if self.driver == "btrfs":
            return mounted + list(Path(self.pool_root).glob("*/*/pgdata/postmaster.pid"))
        out = subprocess.run(
            ["zfs", "get", "-H", "-o", "value", "-r", "mountpoint", self.pool_root],
            capture_output=True,
            text=True,
            check=False,
        ).stdout.split()
        return mounted + [Path(m) / "pgdata" / "postmaster.pid" for m in out if m.startswith("/")]

    def cleanup(self) -> None:
        self.stop()
        for pid_file in self._pid_files():
            master = postgres.find_postmaster(str(pid_file.parent))
            if master is not None:
                postgres.stop(master)
        # Branch mounts outlive the daemon by design; the pool cannot go while they stay.
        for target in self.mount_root.glob("*") if self.mount_root.is_dir() else []:
            idmap.unmount(target, lazy=True)
        shutil.rmtree(self.workdir, ignore_errors=True)


def _new_handle(root: Path, pool_root: str, driver: str) -> DaemonHandle:
    n = next(_counter)
    # Unix socket paths are limited to ~107 bytes: keep the work dir short.
    workdir = Path(tempfile.mkdtemp(prefix=f"cbd{n}-", dir="/tmp"))
    os.chmod(workdir, 0o755)
    first = FIRST_PORT + (n * PORT_BLOCK) % 8000
    return DaemonHandle(
        workdir=workdir, pool_root=pool_root, driver=driver, ports=(first, first + PORT_BLOCK - 1)
    )


DaemonFactory = Callable[..., DaemonHandle]


def _let_postgres_through(path: Path) -> None:
    """postgres runs as its own OS user and must reach its data directory
    through pytest's private (0700) temporary directories."""
    for parent in path.parents:
        if parent == Path(tempfile.gettempdir()):
            break
        if parent.exists():
            os.chmod(parent, parent.stat().st_mode | 0o011)


@pytest.fixture(scope="session")
def daemon_factory(btrfs_pool: Path) -> Iterator[DaemonFactory]:
    """Makes daemons, each on its own directory of the session's btrfs pool
    (or on a ZFS dataset when given `driver="zfs", pool_root=...`)."""
    made: list[DaemonHandle] = []

    def make(
        *, driver: str = "btrfs", pool_root: str = "", start: bool = True, extra_config: str = ""
    ) -> DaemonHandle:
        if not pool_root:
            pool = btrfs_pool / f"d{next(_counter)}"
            pool.mkdir(mode=0o755)
            pool_root = str(pool)
            _let_postgres_through(pool)
        elif driver == "zfs":
            mountpoint = subprocess.run(
                ["zfs", "get", "-H", "-o", "value", "mountpoint", pool_root.split("/")[0]],
                capture_output=True,
                text=True,
                check=True,
            ).stdout.strip()
            _let_postgres_through(Path(mountpoint) / "x")
        handle = _new_handle(btrfs_pool, pool_root, driver)
        handle.extra_config = extra_config
        made.append(handle)
        _HANDLES.append(handle)
        if start:
            handle.start()
        return handle

    yield make
    for handle in reversed(made):
        handle.cleanup()


@pytest.fixture(scope="session")
def daemon(daemon_factory: DaemonFactory) -> DaemonHandle:
    """One shared daemon on btrfs with the demo base `demo` (table `items`, 3 rows)."""
    return daemon_factory()


def code_of(call: object, request: object, **kwargs: object) -> tuple[grpc.StatusCode, str]:
    """The status code and details a real RPC ends with (OK when it succeeds)."""
    try:
        call(request, timeout=120, **kwargs)  # type: ignore[operator]
    except grpc.RpcError as exc:
        return exc.code(), exc.details() or ""
    return grpc.StatusCode.OK, ""
