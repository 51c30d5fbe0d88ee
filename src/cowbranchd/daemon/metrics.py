"""Prometheus metrics of the daemon, served over HTTP on `daemon.metrics_address`
(docs/metrics.md lists every metric).

Three kinds, each read where it is cheap to read:

- events, counted as they happen: RPCs by method and status code and their
  latency (rpc.py), create / delete / reset latency (branches.py, changes.py),
  size-limit stops (branches.py), the last reconcile's duration (server.py),
  broken leases and what their end deleted or spared (leases.py);
- the inventory, read at scrape time by `InventoryCollector`: branches by state
  and owner, warm clones ready per parent; no I/O beyond /proc (a postmaster's
  liveness);
- open leases and the branches they hold, read at scrape time by
  `LeaseCollector` from copies leases.py publishes at every change: a scrape
  never waits on a lease's lock;
- storage figures (pool bytes, written bytes per branch), read at scrape time
  by `StorageProbe` on a thread of its own and time-boxed: a scrape waits on
  storage at most `STORAGE_WAIT_S`, and skips it while a storage command is
  stuck (the state in which the daemon holds writes and reports NOT_SERVING)
  or while the previous read has not come back; `cowbranchd_storage_responding`
  says which.

The registry is the daemon's own, never prometheus_client's global one. Label
values are only names the daemon validated or made itself (method and status
code names, states, owners, branch ids, base versions): no secret and no
free-form request field. This module changes nothing; it reads.
"""

from __future__ import annotations

import socket
import threading
import time
from collections import Counter as Tally
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer

import structlog
from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    Info,
    ProcessCollector,
    make_wsgi_app,
)
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from cowbranchd import __version__, deadline
from cowbranchd.config import listen_address
from cowbranchd.errors import CowbranchError, InvalidArgument
from cowbranchd.model import State
from cowbranchd.run import stuck_commands
from cowbranchd.storage.base import Kind, StorageDriver

if TYPE_CHECKING:
    from .branches import Branches
    from .inventory import BranchEntry, Inventory
    from .warm import WarmPool

__all__ = ["LeaseCensus", "LeaseEnd", "Metrics", "MetricsServer", "StorageProbe"]

log = structlog.get_logger("cowbranchd.metrics")

# How long a scrape waits for storage figures before it leaves them out.
STORAGE_WAIT_S = 2.0
# Of that, the time spent reading written bytes per branch (one `btrfs
# filesystem du` or `zfs get` each): the oldest readings are refreshed first,
# so with many branches successive scrapes take turns.
WRITTEN_BUDGET_S = 1.0
# A branch's written bytes are read again once older than this.
WRITTEN_REFRESH_S = 30.0
# A client that stalls mid-request cannot hold the serving thread longer.
HTTP_TIMEOUT_S = 10.0

# Creates take from milliseconds (warm) to the postgres start timeout.
BRANCH_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0)
RPC_BUCKETS = (0.001, 0.0025, 0.005, *BRANCH_BUCKETS)


@dataclass(frozen=True)
class LeaseCensus:
    """Leases as a scrape sees them (all zero until the daemon's leases attach)."""

    open: int = 0
    slots: int = 0
    # Distinct live branches held by open leases; and by broken leases waiting
    # out their grace that no open lease holds (what the grace's end deletes,
    # bar protected ones).
    held_open: int = 0
    held_broken: int = 0


@dataclass(frozen=True)
class LeaseEnd:
    """What a broken lease did with its branches when its grace ended."""

    deleted: int = 0
    # Spared: let go of with keep before it broke (and still there) ...
    kept: int = 0
    # ... protected ...
    protected: int = 0
    # ... or held by a live lease by then (the client reconnected).
    held_elsewhere: int = 0


# The `reason` label values of cowbranchd_lease_branches_spared, as LeaseEnd's fields.
SPARED_REASONS = ("kept", "protected", "held_elsewhere")


class Metrics:
    """The daemon's registry and the events recorded into it. Recording costs
    a few microseconds and happens whether or not the endpoint is on."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        reg = self.registry
        self._rpcs = Counter(
            "cowbranchd_rpcs",
            "RPCs served, by method and status code.",
            ("method", "code"),
            registry=reg,
        )
        self._rpc_seconds = Histogram(
            "cowbranchd_rpc_duration_seconds",
            "RPC latency, gate and admission queue included.",
            ("method",),
            buckets=RPC_BUCKETS,
            registry=reg,
        )
        self._create_seconds = Histogram(
            "cowbranchd_branch_create_duration_seconds",
            "Time to build a branch that became READY; warm: taken from the warm pool.",
            ("warm",),
            buckets=BRANCH_BUCKETS,
            registry=reg,
        )
        self._delete_seconds = Histogram(
            "cowbranchd_branch_delete_duration_seconds",
            "Time to delete a branch (by a caller or the reaper).",
            buckets=BRANCH_BUCKETS,
            registry=reg,
        )
        self._reset_seconds = Histogram(
            "cowbranchd_branch_reset_duration_seconds",
            "Time to reset a branch.",
            buckets=BRANCH_BUCKETS,
            registry=reg,
        )
        self._size_limit_stops = Counter(
            "cowbranchd_size_limit_stops",
            "Branches marked FAILED because they reached their size limit (max_bytes).",
            registry=reg,
        )
        self._leases_broken = Counter(
            "cowbranchd_leases_broken",
            "Lease streams that ended without a close (the client was killed or lost); "
            "not those the daemon's own drain ended.",
            registry=reg,
        )
        self._lease_deleted = Counter(
            "cowbranchd_lease_branches_deleted",
            "Branches deleted because the lease holding them broke and its grace ended.",
            registry=reg,
        )
        self._lease_spared = Counter(
            "cowbranchd_lease_branches_spared",
            "Branches a broken lease left alone when its grace ended, by reason: kept, "
            "protected, held_elsewhere (a live lease holds it: the client reconnected).",
            ("reason",),
            registry=reg,
        )
        self._leases = LeaseCollector()
        reg.register(self._leases)
        self._reconcile_seconds = Gauge(
            "cowbranchd_reconcile_duration_seconds",
            "How long the start-up reconcile took (0 until it has run).",
            registry=reg,
        )
        Info("cowbranchd_build", "The daemon's version.", registry=reg).info(
            {"version": __version__}
        )
        ProcessCollector(registry=reg)
        # Both series exist from the start, so rate() and ratios see zeros.
        for warm in ("true", "false"):
            self._create_seconds.labels(warm=warm)
        for reason in SPARED_REASONS:
            self._lease_spared.labels(reason=reason)

    def rpc_done(self, method: str, code: str, seconds: float) -> None:
        self._rpcs.labels(method=method, code=code).inc()
        self._rpc_seconds.labels(method=method).observe(seconds)

    def branch_created(self, seconds: float, *, warm: bool) -> None:
        self._create_seconds.labels(warm="true" if warm else "false").observe(seconds)

    def branch_deleted(self, seconds: float) -> None:
        self._delete_seconds.observe(seconds)

    def branch_reset(self, seconds: float) -> None:
        self._reset_seconds.observe(seconds)

    def size_limit_stop(self) -> None:
        self._size_limit_stops.inc()

    def reconciled(self, seconds: float) -> None:
        self._reconcile_seconds.set(seconds)

    def lease_broken(self) -> None:
        self._leases_broken.inc()

    def lease_ended(self, end: LeaseEnd) -> None:
        self._lease_deleted.inc(end.deleted)
        for reason in SPARED_REASONS:
            self._lease_spared.labels(reason=reason).inc(getattr(end, reason))

    def watch_leases(self, census: Callable[[], LeaseCensus]) -> None:
        """Report `census()` at every scrape; it must be quick and take no lock."""
        self._leases.census = census

    def watch(self, branches: Branches, warm: WarmPool) -> None:
        """Read the inventory, the warm pool and storage at every scrape."""
        probe = StorageProbe(branches.ctx.driver, branches.ctx.inventory)
        self.registry.register(InventoryCollector(branches, warm, probe))


@dataclass(frozen=True)
class StorageReading:
    size_bytes: int
    used_bytes: int
    free_bytes: int
    # branch id -> (owner, written bytes), for branches read at least once
    written: dict[str, tuple[str, int]]


def _owner(entry: BranchEntry) -> str:
    # Branches made before owners existed have none: they are the admin's.
    return str(getattr(entry.record, "owner", "")) or "admin"


class StorageProbe:
    """Storage figures for one scrape, read on a thread of its own within
    STORAGE_WAIT_S, or None. Never more than one read at a time: a read that
    hangs (a hung FUSE server can block even statvfs) is not joined by more."""

    def __init__(self, driver: StorageDriver, inventory: Inventory) -> None:
        self._driver = driver
        self._inventory = inventory
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None
        # branch id -> (monotonic time read, written bytes); touched only by
        # the one read thread at a time.
        self._written: dict[str, tuple[float, int]] = {}

    def read(self) -> StorageReading | None:
        if stuck_commands():
            return None  # the storage-watch thread has held writes: do not add to it
        box: list[StorageReading] = []
        with self._lock:
            if self._thread is not None and self._thread.is_alive():
                return None
            thread = threading.Thread(
                target=self._read_into, args=(box,), name="metrics-storage", daemon=True
            )
            self._thread = thread
            thread.start()
        thread.join(STORAGE_WAIT_S)
        return box[0] if box else None

    def _read_into(self, box: list[StorageReading]) -> None:
        driver = self._driver
        try:
            # Bounds every storage command below (run() kills it at the deadline).
            with deadline.scope(STORAGE_WAIT_S):
                usage = driver.pool_usage()
                free = driver.free_bytes()
                written = self._refresh_written(time.monotonic() + WRITTEN_BUDGET_S)
        except CowbranchError as exc:
            log.warning("metrics_storage_read_failed", error=exc.message)
            return
        except Exception:
            log.exception("metrics_storage_read_failed")
            return
        box.append(StorageReading(usage.total_bytes, usage.used_bytes, free, written))

    def _refresh_written(self, until: float) -> dict[str, tuple[str, int]]:
        inv = self._inventory
        with inv.lock:
            entries = [
                e
                for e in inv.branches.values()
                if e.settled.is_set() and e.error is None and not e.deleting
            ]
        known = self._written
        for gone in known.keys() - {e.branch_id for e in entries}:
            del known[gone]

        def read_at(entry: BranchEntry) -> float:
            return known.get(entry.branch_id, (float("-inf"), 0))[0]

        moment = time.monotonic()
        stale = sorted(
            (e for e in entries if moment - read_at(e) >= WRITTEN_REFRESH_S), key=read_at
        )
        for entry in stale:
            if time.monotonic() >= until:
                break
            try:
                value = self._driver.usage(Kind.BRANCHES, entry.volume)
            except CowbranchError:
                continue  # deleted or reset meanwhile; read again next time
            known[entry.branch_id] = (time.monotonic(), value)
        return {
            e.branch_id: (_owner(e), known[e.branch_id][1]) for e in entries if e.branch_id in known
        }


class InventoryCollector(Collector):
    """Gauges computed at scrape time from the inventory, the warm pool and
    (time-boxed) storage."""

    def __init__(self, branches: Branches, warm: WarmPool, probe: StorageProbe) -> None:
        self._branches = branches
        self._warm = warm
        self._probe = probe

    def collect(self) -> Iterator[Metric]:
        yield from self._branch_states()
        yield from self._warm_ready()
        yield from self._storage()

    def _branch_states(self) -> Iterator[Metric]:
        ctx = self._branches.ctx
        with ctx.inventory.lock:
            entries = [e for e in ctx.inventory.branches.values() if e.error is None]
        tally: Tally[tuple[str, str]] = Tally()
        for entry in entries:
            tally[(self._branches.state(entry).name, _owner(entry))] += 1
        states = GaugeMetricFamily(
            "cowbranchd_branches", "Branches by state and owner.", labels=("state", "owner")
        )
        for owner in sorted({owner for _, owner in tally} or {""}):
            for state in State:
                states.add_metric((state.name, owner), tally[(state.name, owner)])
        yield states
        yield GaugeMetricFamily(
            "cowbranchd_branches_suspended",
            "Branches whose postgres is suspended while idle (no process; the daemon holds "
            "the port).",
            value=sum(n for (name, _), n in tally.items() if name == State.SUSPENDED.name),
        )
        yield GaugeMetricFamily(
            "cowbranchd_branch_slots",
            "Branch slots (daemon.max_branches); beyond them CreateBranch is RESOURCE_EXHAUSTED.",
            value=ctx.config.daemon.max_branches,
        )

    def _warm_ready(self) -> Iterator[Metric]:
        ready = GaugeMetricFamily(
            "cowbranchd_warm_branches_ready",
            "Warm clones started and waiting to be handed out, per parent "
            "(a base version or a frozen branch).",
            labels=("parent",),
        )
        for parent, count in sorted(self._warm.ready().items()):
            ready.add_metric((parent,), count)
        yield ready

    def _storage(self) -> Iterator[Metric]:
        reading = self._probe.read()
        yield GaugeMetricFamily(
            "cowbranchd_storage_responding",
            "1 when this scrape read the pool's figures in time; 0 when storage was hung, "
            "slow or failing (the pool and written-bytes metrics are then absent).",
            value=1 if reading is not None else 0,
        )
        yield GaugeMetricFamily(
            "cowbranchd_pool_min_free_bytes",
            "The free-space reserve (storage.min_free_bytes); below it creates are refused.",
            value=self._branches.ctx.config.storage.min_free_bytes,
        )
        if reading is None:
            return
        for name, doc, value in (
            ("size", "Size of the pool's filesystem.", reading.size_bytes),
            ("used", "Bytes used on the pool's filesystem.", reading.used_bytes),
            ("free", "Bytes new data may still take (what creates check).", reading.free_bytes),
        ):
            yield GaugeMetricFamily(f"cowbranchd_pool_{name}_bytes", doc, value=value)
        written = GaugeMetricFamily(
            "cowbranchd_branch_written_bytes",
            f"Bytes a branch holds that its parent does not; read at most every "
            f"{WRITTEN_REFRESH_S:.0f}s per branch.",
            labels=("branch", "owner"),
        )
        for branch_id, (owner, value) in sorted(reading.written.items()):
            written.add_metric((branch_id, owner), value)
        yield written


class LeaseCollector(Collector):
    """Gauges of open leases, computed at scrape time by the census the
    daemon's leases attached (zeros before)."""

    def __init__(self) -> None:
        self.census: Callable[[], LeaseCensus] = LeaseCensus

    def collect(self) -> Iterator[Metric]:
        census = self.census()
        yield GaugeMetricFamily(
            "cowbranchd_leases_open",
            "Lease streams open: client processes holding branches for their life.",
            value=census.open,
        )
        yield GaugeMetricFamily(
            "cowbranchd_lease_slots",
            "Lease streams allowed at once (daemon.max_leases); beyond them a new lease is "
            "RESOURCE_EXHAUSTED.",
            value=census.slots,
        )
        held = GaugeMetricFamily(
            "cowbranchd_lease_branches_held",
            "Branches held by leases: state=open by open leases; state=broken by broken "
            "leases waiting out daemon.lease_grace (and no open lease).",
            labels=("state",),
        )
        held.add_metric(("open",), census.held_open)
        held.add_metric(("broken",), census.held_broken)
        yield held


class _Handler(WSGIRequestHandler):
    timeout = HTTP_TIMEOUT_S

    def log_message(self, format: str, *args: Any) -> None:
        """Scrapes come every few seconds: not logged."""


class _Server4(WSGIServer):
    pass


class _Server6(WSGIServer):
    address_family = socket.AF_INET6


class MetricsServer:
    """The HTTP endpoint (`GET /metrics`, any path answers). Bound when made,
    so a taken or impossible address stops the daemon before it touches
    anything; served by one thread from start() until stop(), which joins it.
    One thread serves one scrape at a time: a scrape is quick and bounded."""

    def __init__(self, address: str, registry: CollectorRegistry) -> None:
        where = "daemon.metrics_address"
        host, port = listen_address(where, address)
        try:
            family = socket.getaddrinfo(
                host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
            )[0][0]
        except socket.gaierror as exc:
            raise InvalidArgument(where, f"cannot resolve {host!r}: {exc.strerror}") from exc
        server_class = _Server6 if family == socket.AF_INET6 else _Server4
        try:
            self._httpd = server_class((host, port), _Handler)
        except OSError as exc:
            raise InvalidArgument(where, f"cannot listen on {address}: {exc.strerror}") from exc
        self._httpd.set_app(make_wsgi_app(registry))
        self.address = address
        self._thread: threading.Thread | None = None
        self._closed = False

    def start(self) -> None:
        if self._thread is not None or self._closed:
            return
        self._thread = threading.Thread(
            target=self._httpd.serve_forever,
            kwargs={"poll_interval": 0.2},
            name="metrics-http",
            daemon=True,
        )
        self._thread.start()

    def stop(self) -> None:
        """Stop serving, join the thread, close the socket; twice is fine."""
        if self._closed:
            return
        self._closed = True
        if self._thread is not None:
            self._httpd.shutdown()  # returns once serve_forever has (a scrape in flight ends first)
            self._thread.join()
        self._httpd.server_close()
