"""The `cowbranchd` daemon: wires config, storage, ports and the servicers into
one gRPC server on a Unix socket (and optionally TCP), runs start-up
reconcile before reporting SERVING, expires branches in the background, and
on SIGTERM drains in-flight calls and exits, leaving branches running.
"""

from __future__ import annotations

import argparse
import grp
import os
import shutil
import signal
import socket
import sys
import threading
import time
from collections.abc import Callable
from concurrent import futures
from datetime import timedelta
from pathlib import Path
from types import FrameType

import grpc
import structlog
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from cowbranchd import __version__
from cowbranchd.config import Config, load_config
from cowbranchd.errors import CowbranchError, InvalidArgument
from cowbranchd.model import now
from cowbranchd.ports import PortAllocator
from cowbranchd.run import stuck_commands
from cowbranchd.storage import open_driver
from cowbranchd.v1 import (
    bases_pb2,
    bases_pb2_grpc,
    branches_pb2,
    branches_pb2_grpc,
    daemon_pb2,
    daemon_pb2_grpc,
    leases_pb2,
    leases_pb2_grpc,
    logs_pb2,
    logs_pb2_grpc,
    operations_pb2,
    operations_pb2_grpc,
)

from .auth import ADMIN, Caller, IdentityInterceptor, TokenBook, read_token
from .bases import Bases, InitdbSpec
from .branch_logs import rotate_logs
from .branches import Branches
from .diff import Differ
from .inventory import Context, Inventory
from .isolation import branch_uids
from .leases import Leases
from .logs import configure_logging
from .metrics import Metrics, MetricsServer
from .operations import Operations
from .pipeline import Pipeline
from .reconcile import reconcile
from .rpc import Gate, admissions
from .service import BaseServicer, BranchServicer, DaemonServicer
from .service_leases import LeaseServicer
from .service_logs import MAX_LOG_STREAMS, LogServicer
from .service_ops import OperationServicer
from .warm import WarmPool

__all__ = ["Daemon", "main"]

log = structlog.get_logger("cowbranchd.server")

SIGNAL_POLL_S = 0.1
STORAGE_WATCH_S = 1.0
READ_WORKERS = 16  # worker threads no write can occupy (reads, health, status)
SERVICE_NAMES = (
    bases_pb2.DESCRIPTOR.services_by_name["BaseService"].full_name,
    branches_pb2.DESCRIPTOR.services_by_name["BranchService"].full_name,
    daemon_pb2.DESCRIPTOR.services_by_name["DaemonService"].full_name,
    operations_pb2.DESCRIPTOR.services_by_name["OperationService"].full_name,
    leases_pb2.DESCRIPTOR.services_by_name["LeaseService"].full_name,
    logs_pb2.DESCRIPTOR.services_by_name["LogService"].full_name,
)

DEMO_SQL = """
CREATE TABLE items (id int PRIMARY KEY, name text NOT NULL);
INSERT INTO items VALUES (1, 'apple'), (2, 'banana'), (3, 'cherry');
"""


def notify_systemd(message: str) -> None:
    path = os.environ.get("NOTIFY_SOCKET")
    if not path:
        return
    if path.startswith("@"):
        path = "\0" + path[1:]
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.sendto(message.encode(), path)


class Daemon:
    def __init__(self, config: Config) -> None:
        self.config = config
        self.gate = Gate()
        self.health = health.HealthServicer()
        self.stopping = threading.Event()
        # Read before anything is touched: a bad token file must not leave a
        # half-prepared runtime directory or pool behind.
        admin_token = read_token(config.daemon.token_file) if config.daemon.token_file else None
        self._tokens = TokenBook(admin_token, config.tenants.tokens_dir)
        self.metrics = Metrics()
        # Bound now for the same reason: a taken metrics port is a start failure.
        self.metrics_http = (
            MetricsServer(config.daemon.metrics_address, self.metrics.registry)
            if config.daemon.metrics_address
            else None
        )
        self._prepare_runtime_dir()
        driver = open_driver(config.storage, config.daemon.state_dir)
        pg = config.postgres
        self.ctx = Context(
            config=config,
            driver=driver,
            ports=PortAllocator(pg.port_range[0], pg.port_range[1], pg.listen_addresses),
            inventory=Inventory(),
            uids=branch_uids(config, driver),
            metrics=self.metrics,
        )
        self.bases = Bases(self.ctx)
        self.warm = WarmPool(self.ctx, config.daemon.warm_branches)
        self.branches = Branches(self.ctx, self.bases, self.warm)
        self.operations = Operations()
        self.differ = Differ(self.branches)
        self.pipeline = Pipeline(self.ctx, self.bases, self.operations)
        self.metrics.watch(self.branches, self.warm)
        self.leases = Leases(
            self.branches, config.daemon.lease_grace or timedelta(0), config.daemon.max_leases
        )
        self.admission = admissions(
            config.daemon.max_concurrent_writes, config.daemon.max_queued_writes
        )
        self.start_time = now()
        self.logs = LogServicer(self.branches, self.gate)  # one stream bound for all listeners
        self._prepare_tenant_sockets()
        self.servers = self._build_servers()
        self._set_health(health_pb2.HealthCheckResponse.NOT_SERVING)

    def _prepare_runtime_dir(self) -> None:
        runtime = self.config.runtime_dir
        runtime.mkdir(parents=True, exist_ok=True)
        gid = (
            grp.getgrnam(self.config.daemon.socket_group).gr_gid
            if self.config.daemon.socket_group
            else 0
        )
        os.chown(runtime, 0, gid)
        os.chmod(runtime, 0o750)
        self.config.postgres.socket_root.mkdir(parents=True, exist_ok=True)
        os.chmod(self.config.postgres.socket_root, 0o755)
        sock = self.config.daemon.socket
        if sock.exists() or sock.is_symlink():
            sock.unlink()  # a stale socket from a previous run

    def _build_servers(self) -> list[grpc.Server]:
        """One gRPC server per identity a listener stands for (grpcio cannot
        tell a servicer which port a call came in on): the main socket, TCP,
        and each tenant's socket. They share the servicers and one worker pool."""
        daemon = self.config.daemon
        # Enough workers for every admitted or queued write at once, plus a
        # reserve that only reads and health checks can reach, plus one per
        # lease stream (each holds its thread for the client's life; more
        # than daemon.max_leases are refused at once).
        writers = sum(a.running + a.queued for a in self.admission.values())
        pool = futures.ThreadPoolExecutor(
            # and one per open log stream (at most MAX_LOG_STREAMS).
            max_workers=writers + READ_WORKERS + daemon.max_leases + MAX_LOG_STREAMS,
            thread_name_prefix="rpc",
        )
        book = self._tokens
        main_identity = None if book.admin_required else ADMIN
        main = self._new_server(pool, IdentityInterceptor(book, main_identity))
        main.add_insecure_port(f"unix:{daemon.socket}")
        servers = [main]
        for tenant in sorted(self.config.tenants.sockets):
            server = self._new_server(pool, IdentityInterceptor(book, Caller(tenant)))
            server.add_insecure_port(f"unix:{self._tenant_socket(tenant)}")
            servers.append(server)
        if daemon.tcp_address:
            self._warn_if_tcp_insecure()
            # TCP has no identity of its own: a token names the caller, except
            # where the operator accepted an open port (daemon.insecure_tcp
            # without any token configured).
            open_tcp = daemon.insecure_tcp and not (book.admin_required or book.has_tenants)
            server = self._new_server(pool, IdentityInterceptor(book, ADMIN if open_tcp else None))
            if daemon.tls_cert:
                creds = grpc.ssl_server_credentials(
                    [(Path(daemon.tls_key).read_bytes(), Path(daemon.tls_cert).read_bytes())]
                )
                server.add_secure_port(daemon.tcp_address, creds)
            else:
                server.add_insecure_port(daemon.tcp_address)
            servers.append(server)
        return servers

    def _new_server(
        self, pool: futures.ThreadPoolExecutor, identity: IdentityInterceptor
    ) -> grpc.Server:
        options = [
            ("grpc.max_receive_message_length", self.config.daemon.max_message_bytes),
            ("grpc.max_send_message_length", 64 * 1024 * 1024),
            ("grpc.so_reuseport", 0),
        ]
        server = grpc.server(
            pool, options=options, interceptors=[identity], maximum_concurrent_rpcs=256
        )
        bases_pb2_grpc.add_BaseServiceServicer_to_server(
            BaseServicer(self.bases, self.branches, self.pipeline, self.gate, self.admission),
            server,
        )
        operations_pb2_grpc.add_OperationServiceServicer_to_server(
            OperationServicer(self.operations, self.gate, self.ctx.metrics), server
        )
        branches_pb2_grpc.add_BranchServiceServicer_to_server(
            BranchServicer(self.branches, self.gate, self.admission, self.differ, self.leases),
            server,
        )
        daemon_pb2_grpc.add_DaemonServiceServicer_to_server(
            DaemonServicer(self.branches, self.gate, self.start_time), server
        )
        leases_pb2_grpc.add_LeaseServiceServicer_to_server(
            LeaseServicer(self.leases, self.gate, self.ctx.metrics), server
        )
        logs_pb2_grpc.add_LogServiceServicer_to_server(self.logs, server)
        health_pb2_grpc.add_HealthServicer_to_server(self.health, server)
        reflection.enable_server_reflection(
            (*SERVICE_NAMES, health.SERVICE_NAME, reflection.SERVICE_NAME), server
        )
        return server

    def _tenant_socket(self, tenant: str) -> Path:
        return self.config.tenants.socket_dir / tenant / "api.sock"

    def _prepare_tenant_sockets(self) -> None:
        """<socket_dir>/<tenant>/ is root:<group> 0750, so only that group's
        members reach the tenant's socket; directories of tenants no longer
        configured are removed."""
        tenants = self.config.tenants
        if not tenants.sockets and not tenants.socket_dir.exists():
            return
        tenants.socket_dir.mkdir(parents=True, exist_ok=True)
        os.chown(tenants.socket_dir, 0, 0)
        os.chmod(tenants.socket_dir, 0o755)
        for stale in set(os.listdir(tenants.socket_dir)) - set(tenants.sockets):
            shutil.rmtree(tenants.socket_dir / stale, ignore_errors=True)
        for tenant, group in tenants.sockets.items():
            try:
                gid = grp.getgrnam(group).gr_gid
            except KeyError:
                raise InvalidArgument(
                    f"tenants.sockets.{tenant}", f"group {group!r} does not exist"
                ) from None
            directory = tenants.socket_dir / tenant
            directory.mkdir(exist_ok=True)
            os.chown(directory, 0, gid, follow_symlinks=False)
            os.chmod(directory, 0o750, follow_symlinks=False)
            sock = directory / "api.sock"
            if sock.exists() or sock.is_symlink():
                sock.unlink()

    def _warn_if_tcp_insecure(self) -> None:
        """config refuses TCP without TLS or a token unless the operator set
        `daemon.insecure_tcp`; then say so at every start, at warning level."""
        daemon = self.config.daemon
        risks = []
        if not daemon.tls_cert:
            risks.append("without TLS, tokens and branch passwords cross the network in clear")
        if not daemon.token_file:
            risks.append("without a token, anyone who can reach the port can use every branch")
        if risks:
            log.warning(
                "insecure_tcp",
                tcp=daemon.tcp_address,
                message=f"INSECURE TCP (daemon.insecure_tcp = true): {'; '.join(risks)}",
            )

    def _set_health(self, status: health_pb2.HealthCheckResponse.ServingStatus.ValueType) -> None:
        for name in ("", *SERVICE_NAMES):
            self.health.set(name, status)

    def start(self) -> None:
        """Serve (UNAVAILABLE until reconciled), reconcile, then open up."""
        started = time.perf_counter()
        if self.metrics_http is not None:
            self.metrics_http.start()
        for server in self.servers:
            server.start()
        os.chmod(self.config.daemon.socket, 0o660)
        for tenant, group in self.config.tenants.sockets.items():
            sock = self._tenant_socket(tenant)
            os.chown(sock, 0, grp.getgrnam(group).gr_gid)
            os.chmod(sock, 0o660)
        reconcile_started = time.perf_counter()
        counts = reconcile(self.ctx, self.branches)
        self.metrics.reconciled(time.perf_counter() - reconcile_started)
        self._ensure_demo_base()
        self.gate.open()
        self._set_health(health_pb2.HealthCheckResponse.SERVING)
        notify_systemd("READY=1\nSTATUS=serving")
        threading.Thread(target=self._reaper, name="reaper", daemon=True).start()
        self.leases.start()
        threading.Thread(target=self._watch_storage, name="storage-watch", daemon=True).start()
        self.warm.start()
        log.info(
            "serving",
            version=__version__,
            socket=str(self.config.daemon.socket),
            tenant_sockets=sorted(self.config.tenants.sockets) or None,
            tcp=self.config.daemon.tcp_address or None,
            metrics=self.config.daemon.metrics_address or None,
            driver=self.ctx.driver.kind,
            ms=round((time.perf_counter() - started) * 1000, 1),
            **counts,
        )

    def _ensure_demo_base(self) -> None:
        demo = self.config.demo
        if not demo.enabled or self.ctx.inventory.bases:
            return
        self.bases.create(demo.base_id, initdb=InitdbSpec(database="", init_sql=DEMO_SQL))

    def _reaper(self) -> None:
        interval = self.config.daemon.reap_interval.total_seconds()
        chores: list[tuple[str, Callable[[], object]]] = [
            ("expiry", self.branches.reap_expired),
            ("size limits", self.branches.check_size_limits),
            ("idle suspend", self.branches.suspend_idle),
            ("imports", self.pipeline.tick),
            ("log rotation", lambda: rotate_logs(self.ctx)),
        ]
        if self.ctx.driver.clones_pin_snapshots:
            chores.append(("storage gc", self.ctx.driver.gc))
        while not self.stopping.wait(interval):
            for name, chore in chores:  # each on its own: one failing skips no other
                try:
                    chore()
                except Exception:
                    log.exception("reaper_failed", chore=name)

    def _watch_storage(self) -> None:
        """Health follows the storage backend: NOT_SERVING, with the reason in
        the log and in every refused write, while a command it ran cannot be
        killed (a hung zfs-fuse); SERVING again once it is gone."""
        hung = False
        while not self.stopping.wait(STORAGE_WATCH_S):
            stuck = stuck_commands()
            if stuck and not hung:
                argv, age = stuck[0]
                reason = f"storage backend hung: {' '.join(argv)} stuck for {age:.0f}s"
                log.error("storage_hung", reason=reason, commands=len(stuck))
                self.gate.hold_writes(reason)
                self._set_health(health_pb2.HealthCheckResponse.NOT_SERVING)
            elif not stuck and hung:
                log.info("storage_recovered")
                self.gate.hold_writes(None)
                self._set_health(health_pb2.HealthCheckResponse.SERVING)
            hung = bool(stuck)

    def drain_and_stop(self, *, stop_branches: bool = False) -> None:
        """Refuse new calls, let in-flight ones finish, exit. Branches keep
        running (they are adopted at the next start) unless `stop_branches`."""
        log.info("draining", timeout_s=self.config.daemon.drain_timeout.total_seconds())
        notify_systemd("STOPPING=1")
        self.stopping.set()
        self.gate.close("cowbranchd is shutting down; retry against the restarted daemon")
        self.health.enter_graceful_shutdown()
        self.leases.stop()  # lease streams would hold the drain for its whole timeout
        grace = self.config.daemon.drain_timeout.total_seconds()
        for drained in [server.stop(grace=grace) for server in self.servers]:
            drained.wait()
        self.operations.stop(grace)
        self.warm.stop()
        # Suspended branches' ports are let go (the next start listens again)
        # after the wakes under way have relayed their clients.
        self.ctx.acceptor.close()
        if stop_branches:
            stopped = self.branches.stop_all()
            log.info("branches_stopped", count=stopped)
        if self.metrics_http is not None:
            self.metrics_http.stop()
        log.info("stopped")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="cowbranchd", description="Copy-on-write PostgreSQL branches over gRPC."
    )
    parser.add_argument(
        "--config",
        type=Path,
        default=None,
        help="TOML config file (default: /etc/cowbranchd/config.toml if it exists, "
        "else built-in defaults)",
    )
    parser.add_argument(
        "--stop-branches",
        action="store_true",
        help="stop every branch's postgres on exit (default: leave them running)",
    )
    parser.add_argument("--version", action="version", version=f"cowbranchd {__version__}")
    args = parser.parse_args(argv)
    config_path = args.config
    if config_path is None and Path("/etc/cowbranchd/config.toml").exists():
        config_path = Path("/etc/cowbranchd/config.toml")
    try:
        config = load_config(config_path)
    except InvalidArgument as exc:
        print(f"cowbranchd: bad configuration: {exc.message}", file=sys.stderr)
        return 2
    configure_logging(config.daemon.log_format, config.daemon.log_level)
    if os.geteuid() != 0:
        print(
            "cowbranchd: must run as root (it mounts, snapshots and starts postgres as "
            f"{config.postgres.os_user!r})",
            file=sys.stderr,
        )
        return 2
    # The handler only appends: Event.set() from a handler can deadlock when
    # the signal lands while the main thread holds that Event's lock (seen
    # with a SIGTERM right after start-up). The main thread polls instead.
    received: list[int] = []

    def on_signal(signum: int, frame: FrameType | None) -> None:
        received.append(signum)

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    try:
        daemon = Daemon(config)
        daemon.start()
    except CowbranchError as exc:
        log.error("start_failed", error=exc.message)
        return 1
    ctl = Path(sys.executable).parent / "cowbranchctl"
    address = f"unix://{config.daemon.socket}"
    address_flag = "" if address == "unix:///run/cowbranchd/api.sock" else f" --address {address}"
    print(
        f"cowbranchd is serving on {address}\n"
        f"  create a branch:  {ctl if ctl.exists() else 'cowbranchctl'}{address_flag} "
        f"create bases/{config.demo.base_id}\n"
        "  stop with Ctrl-C (branches keep running; they are adopted at the next start)",
        file=sys.stderr,
        flush=True,
    )
    while not received:
        time.sleep(SIGNAL_POLL_S)
    log.info("signal", signal=signal.Signals(received[0]).name)
    daemon.drain_and_stop(stop_branches=args.stop_branches)
    return 0
