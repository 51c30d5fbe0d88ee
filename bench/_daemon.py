"""A cowbranchd daemon the benchmark runs for one driver: its own config,
socket, port range and log, started as a subprocess (as in production) and
stopped at the end, together with every postmaster left in its pool.

Imports (`CreateBase(data_directory=src/s<scale>)`) are allowed from the data
dir's `src/` only (`daemon.import_roots`), and the daemon copies them as the
postgres OS user: `start` makes sure that user can reach and read them.

Also reads the daemon's JSON log lines back (`branch_created`, ...), which is
where the per-step breakdown comes from.
"""

from __future__ import annotations

import json
import os
import signal
import stat
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
from _pg import OS_USER
from grpc_health.v1 import health_pb2, health_pb2_grpc

from cowbranchd.v1 import bases_pb2_grpc, branches_pb2, branches_pb2_grpc

__all__ = ["BenchDaemon"]

# Port blocks per driver; the baselines use BASELINE_PORT (see run.py).
PORT_RANGES = {"btrfs": (47000, 47299), "zfs": (47300, 47599)}


@dataclass
class BenchDaemon:
    driver: str
    pool_root: str
    data_dir: Path
    warm_branches: int = 0
    # False: every branch runs as the shared postgres user (postgres.branch_uids = "").
    isolation: bool = True
    proc: subprocess.Popen[bytes] | None = None
    channel: grpc.Channel | None = None
    _log_offset: int = 0

    @property
    def workdir(self) -> Path:
        return self.data_dir / f"daemon-{self.driver}"

    @property
    def socket_path(self) -> Path:
        return self.workdir / "run" / "api.sock"

    @property
    def log_path(self) -> Path:
        return self.workdir / "daemon.log"

    @property
    def import_root(self) -> Path:
        """Where the pgbench sources live (`_data.ensure_source`): the daemon's
        only import root. Absolute and normalised, as the config demands."""
        return Path(os.path.abspath(self.data_dir / "src"))

    def grant_import_access(self) -> None:
        """Let the postgres OS user (who runs the daemon's copy-in) reach the
        sources: search permission on the data dir and `src/` (the benchmark's
        own directories; the sources themselves are postgres's, made by initdb),
        then check, as that user and as the daemon runs it (its own group, no
        supplementary groups), that each source's PG_VERSION is readable."""
        root = self.import_root
        if not root.is_dir():
            return
        for directory in (root.parent, root):  # the data dir and src/
            mode = stat.S_IMODE(directory.stat().st_mode)
            # Group and other: postgres is either, depending on the group.
            if mode & 0o011 != 0o011:
                directory.chmod(mode | 0o011)
        for source in sorted(root.glob("s*/PG_VERSION")):
            proc = subprocess.run(
                ["test", "-r", str(source)], user=OS_USER, group=OS_USER, extra_groups=[],
                cwd="/", check=False, stdin=subprocess.DEVNULL, capture_output=True, timeout=30,
            )
            if proc.returncode != 0:
                raise RuntimeError(
                    f"the {OS_USER!r} OS user cannot read {source}: CreateBase copies the "
                    f"source as that user; give it search (x) permission on every directory "
                    f"above {root} and read permission on the source"
                )

    def port_range(self) -> tuple[int, int]:
        """The ports its branches take (one range per driver: two bench
        daemons may run at once)."""
        return PORT_RANGES[self.driver]

    def write_config(self, *, max_branches: int = 500) -> Path:
        first, last = self.port_range()
        path = self.workdir / "config.toml"
        path.write_text(
            f"""\
[daemon]
socket = "{self.socket_path}"
state_dir = "{self.workdir / 'state'}"
log_format = "json"
log_level = "debug"
max_branches = {max_branches}
warm_branches = {self.warm_branches}
import_roots = {json.dumps([str(self.import_root)])}

[storage]
driver = "{self.driver}"
root = "{self.pool_root}"

[postgres]
port_range = "{first}-{last}"
socket_root = "{self.workdir / 'pg'}"
{'' if self.isolation else 'branch_uids = ""'}

[demo]
enabled = false
"""
        )
        return path

    def start(self, timeout: float = 300.0) -> None:
        self.workdir.mkdir(mode=0o755, parents=True, exist_ok=True)
        self.grant_import_access()
        config = self.write_config()
        with self.log_path.open("ab") as log:
            self._log_offset = log.tell()
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "cowbranchd.daemon", "--config", str(config)],
                stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
            )
        deadline = time.monotonic() + timeout
        while self._health() != "SERVING":
            if self.proc.poll() is not None:
                raise RuntimeError(f"cowbranchd exited {self.proc.returncode}: {self._tail()}")
            if time.monotonic() > deadline:
                raise RuntimeError(f"cowbranchd not SERVING within {timeout}s: {self._tail()}")
            time.sleep(0.05)
        self.channel = grpc.insecure_channel(f"unix://{self.socket_path}")

    def _tail(self) -> str:
        return self.log_path.read_text(errors="replace")[-3000:]

    def _health(self) -> str:
        if not self.socket_path.exists():
            return "NO_SOCKET"
        with grpc.insecure_channel(f"unix://{self.socket_path}") as channel:
            try:
                resp = health_pb2_grpc.HealthStub(channel).Check(
                    health_pb2.HealthCheckRequest(), timeout=2
                )
            except grpc.RpcError:
                return "UNREACHABLE"
        return str(health_pb2.HealthCheckResponse.ServingStatus.Name(resp.status))

    @property
    def branches(self) -> branches_pb2_grpc.BranchServiceStub:
        assert self.channel is not None
        return branches_pb2_grpc.BranchServiceStub(self.channel)

    @property
    def bases(self) -> bases_pb2_grpc.BaseServiceStub:
        assert self.channel is not None
        return bases_pb2_grpc.BaseServiceStub(self.channel)

    def delete_all_branches(self) -> int:
        """Delete every branch (children before parents), bounded in rounds."""
        deleted = 0
        for _ in range(10):
            listed = self.branches.ListBranches(
                branches_pb2.ListBranchesRequest(page_size=1000), timeout=60
            ).branches
            if not listed:
                break
            # A branch whose parent is a branch goes first.
            ordered = sorted(listed, key=lambda b: not b.parent.startswith("branches/"))
            for branch in ordered:
                try:
                    self.branches.DeleteBranch(
                        branches_pb2.DeleteBranchRequest(
                            name=branch.name, allow_missing=True, force=True
                        ),
                        timeout=120,
                    )
                    deleted += 1
                except grpc.RpcError:
                    continue  # e.g. a parent still holding a child: the next round
        return deleted

    def stop(self) -> None:
        """Delete what is left, then SIGTERM (branches would outlive it)."""
        if self.proc is None:
            return
        if self.proc.poll() is None and self.channel is not None:
            try:
                self.delete_all_branches()
            except grpc.RpcError as exc:
                print(f"  warning: could not delete branches: {exc}", file=sys.stderr)
        if self.channel is not None:
            self.channel.close()
            self.channel = None
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=30)

    def events(self, name: str | None = None) -> list[dict[str, Any]]:
        """JSON log lines written since this run started it, optionally one event."""
        out: list[dict[str, Any]] = []
        with self.log_path.open("rb") as fh:
            fh.seek(self._log_offset)
            for raw in fh:
                try:
                    line = json.loads(raw)
                except ValueError:
                    continue
                if isinstance(line, dict) and (name is None or line.get("event") == name):
                    out.append(line)
        return out
