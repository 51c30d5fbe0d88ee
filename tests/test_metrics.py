"""Prometheus metrics: a real daemon on a real btrfs pool, scraped over real
HTTP after real creates, deletes, resets and errors, and after a client
process holding branches in a lease is killed, its exposition parsed by
prometheus_client's own parser; the endpoint's address checked at start-up;
the HTTP server gone when stopped; the docs' dashboard names only metrics the
daemon has."""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path

import grpc
import pytest
from prometheus_client.parser import text_string_to_metric_families

from cowbranchd.client import Client, NotFound
from cowbranchd.config import load_config
from cowbranchd.daemon.inventory import Inventory
from cowbranchd.daemon.metrics import Metrics, MetricsServer, StorageProbe
from cowbranchd.errors import InvalidArgument
from cowbranchd.storage.base import PoolUsage
from cowbranchd.storage.btrfs import BtrfsDriver
from cowbranchd.v1 import branches_pb2
from tests.fix_daemon import DaemonFactory, DaemonHandle, code_of

DOCS = Path(__file__).resolve().parent.parent / "docs"
Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


def scrape(address: str) -> Samples:
    """Every sample the endpoint serves, by name and labels."""
    with urllib.request.urlopen(f"http://{address}/metrics", timeout=60) as response:
        assert response.status == 200
        assert response.headers["Content-Type"].startswith("text/plain; version=")
        text = response.read().decode()
    return {
        (sample.name, frozenset(sample.labels.items())): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


def value(samples: Samples, name: str, **labels: str) -> float | None:
    return samples.get((name, frozenset(labels.items())))


def names(samples: Samples, name: str) -> dict[frozenset[tuple[str, str]], float]:
    return {labels: v for (n, labels), v in samples.items() if n == name}


def free_port_in(d: DaemonHandle) -> int:
    """The last port of the daemon's block, taken from its postgres range."""
    first, last = d.ports
    d.ports = (first, last - 1)
    return last


LEASE_GRACE_S = 4.0


@pytest.fixture(scope="module")
def metrics_daemon(daemon_factory: DaemonFactory) -> Iterator[tuple[DaemonHandle, str]]:
    """A daemon of its own with metrics on, one warm clone kept ready, and a
    short lease grace."""
    d = daemon_factory(start=False)
    address = f"127.0.0.1:{free_port_in(d)}"
    d.sections = {
        "daemon": f'metrics_address = "{address}"\nwarm_branches = 1\n'
        f'lease_grace = "{LEASE_GRACE_S:g}s"'
    }
    d.start()
    yield d, address
    d.cleanup()


def wait_warm_ready(address: str) -> str:
    """Until the metrics say a warm clone is ready; the base version it is of."""
    for _ in range(1200):
        for labels, ready in names(scrape(address), "cowbranchd_warm_branches_ready").items():
            if ready >= 1:
                return dict(labels)["parent"]
        time.sleep(0.05)
    pytest.fail("no warm clone ready after 60 s")


def delta(after: Samples, before: Samples, name: str, **labels: str) -> float:
    return (value(after, name, **labels) or 0) - (value(before, name, **labels) or 0)


def rpc_counts(samples: Samples) -> dict[tuple[str, str], float]:
    return {
        (dict(labels)["method"], dict(labels)["code"]): v
        for labels, v in names(samples, "cowbranchd_rpcs_total").items()
    }


def test_creates_deletes_resets_and_errors_are_counted(
    metrics_daemon: tuple[DaemonHandle, str],
) -> None:
    """After N creates (one warm), M deletes, a reset and a NOT_FOUND, the RPC
    counters, the latency histograms and the branch gauges say exactly that."""
    d, address = metrics_daemon
    parent = wait_warm_ready(address)
    before = scrape(address)
    n_creates, m_deletes = 3, 2
    with d.channel() as ch:
        stub = d.branches(ch)
        made = [stub.CreateBranch(branches_pb2.CreateBranchRequest(parent=parent), timeout=120)]
        # Per-branch settings never take a warm clone: these two are cold.
        made += [
            stub.CreateBranch(
                branches_pb2.CreateBranchRequest(
                    parent=parent, postgres_settings={"work_mem": "8MB"}
                ),
                timeout=120,
            )
            for _ in range(n_creates - 1)
        ]
        for branch in made[:m_deletes]:
            stub.DeleteBranch(branches_pb2.DeleteBranchRequest(name=branch.name), timeout=120)
        kept = made[-1]
        stub.ResetBranch(branches_pb2.ResetBranchRequest(name=kept.name), timeout=120)
        code, _ = code_of(stub.GetBranch, branches_pb2.GetBranchRequest(name="branches/nope"))
        assert code is grpc.StatusCode.NOT_FOUND
        code, _ = code_of(stub.GetBranch, branches_pb2.GetBranchRequest(name="branches/NO!"))
        assert code is grpc.StatusCode.INVALID_ARGUMENT

    after = scrape(address)
    counts_before, counts_after = rpc_counts(before), rpc_counts(after)
    rpcs = {
        key: n - counts_before.get(key, 0)
        for key, n in counts_after.items()
        if n != counts_before.get(key, 0)
    }
    assert rpcs == {
        ("CreateBranch", "OK"): n_creates,
        ("DeleteBranch", "OK"): m_deletes,
        ("ResetBranch", "OK"): 1,
        ("GetBranch", "NOT_FOUND"): 1,
        ("GetBranch", "INVALID_ARGUMENT"): 1,
    }
    rpc_latency = "cowbranchd_rpc_duration_seconds_count"
    assert delta(after, before, rpc_latency, method="CreateBranch") == n_creates
    assert delta(after, before, rpc_latency, method="GetBranch") == 2
    create_latency = "cowbranchd_branch_create_duration_seconds_count"
    created = {w: delta(after, before, create_latency, warm=w) for w in ("true", "false")}
    assert created == {"true": 1, "false": n_creates - 1}
    deleted = delta(after, before, "cowbranchd_branch_delete_duration_seconds_count")
    assert deleted == m_deletes
    assert delta(after, before, "cowbranchd_branch_reset_duration_seconds_count") == 1
    assert value(after, "cowbranchd_size_limit_stops_total") == 0

    def states(samples: Samples) -> dict[str, float]:
        return {
            dict(labels)["state"]: v
            for labels, v in names(samples, "cowbranchd_branches").items()
            if dict(labels)["owner"] == "admin"
        }

    ready_before = states(before).get("READY", 0)
    assert states(after) == {
        "CREATING": 0,
        "READY": ready_before + n_creates - m_deletes,
        "STOPPED": 0,
        "FAILED": 0,
        "DELETING": 0,
        "SUSPENDED": 0,
    }
    assert value(after, "cowbranchd_branches_suspended") == 0
    assert value(after, "cowbranchd_branch_slots") == 500


def test_pool_and_written_bytes_come_from_storage(
    metrics_daemon: tuple[DaemonHandle, str],
) -> None:
    """Pool size, used and free bytes are the pool filesystem's; every branch
    has its written bytes, which grow when it writes; start-up facts are there."""
    d, address = metrics_daemon
    with d.channel() as ch:
        branch = d.branches(ch).CreateBranch(
            branches_pb2.CreateBranchRequest(parent=f"bases/{d.base}"), timeout=120
        )
    branch_id = branch.name.removeprefix("branches/")
    samples = scrape(address)
    assert value(samples, "cowbranchd_storage_responding") == 1
    size = value(samples, "cowbranchd_pool_size_bytes")
    used = value(samples, "cowbranchd_pool_used_bytes")
    free = value(samples, "cowbranchd_pool_free_bytes")
    assert size is not None and used is not None and free is not None
    assert 0 < used < size and 0 < free <= size - used
    assert value(samples, "cowbranchd_pool_min_free_bytes") == 256 * 2**20
    written = names(samples, "cowbranchd_branch_written_bytes")
    assert frozenset({("branch", branch_id), ("owner", "admin")}) in written
    assert (value(samples, "cowbranchd_reconcile_duration_seconds") or 0) > 0
    assert value(samples, "cowbranchd_build_info", version=_version()) == 1
    assert (value(samples, "process_resident_memory_bytes") or 0) > 0


LEASE_HOLDER = """
import pathlib, sys, time
from cowbranchd.client import Client

address, parent, ready = sys.argv[1:]
client = Client(address)
names = [
    client.create_branch(parent, ttl="1h", protected=i == 1).name for i in range(4)
]
lease = client.lease(holder="metrics test")
lease.hold(*names)
lease.keep(names[2])
pathlib.Path(ready + ".tmp").write_text("\\n".join(names))
pathlib.Path(ready + ".tmp").rename(ready)
time.sleep(600)
"""


def lease_figures(samples: Samples) -> dict[str, float | None]:
    """The lease gauges of a scrape."""
    held = "cowbranchd_lease_branches_held"
    return {
        "open": value(samples, "cowbranchd_leases_open"),
        "held_open": value(samples, held, state="open"),
        "held_broken": value(samples, held, state="broken"),
    }


def lease_ends(after: Samples, before: Samples) -> dict[str, float]:
    """How the lease counters moved between two scrapes."""
    spared = "cowbranchd_lease_branches_spared_total"
    return {
        "broken": delta(after, before, "cowbranchd_leases_broken_total"),
        "deleted": delta(after, before, "cowbranchd_lease_branches_deleted_total"),
        **{
            reason: delta(after, before, spared, reason=reason)
            for reason in ("kept", "protected", "held_elsewhere")
        },
    }


def scrape_until(address: str, done: Callable[[Samples], bool], what: str) -> Samples:
    """Scrape until `done(samples)` holds (within a minute); that scrape."""
    for _ in range(600):
        samples = scrape(address)
        if done(samples):
            return samples
        time.sleep(0.1)
    pytest.fail(f"not within 60 s: {what}")


def test_leases_are_gauged_and_a_killed_holder_is_counted(
    metrics_daemon: tuple[DaemonHandle, str], tmp_path: Path
) -> None:
    """A client process holds four branches in its lease and keeps one; another
    lease holds one of them too: the gauges count two open leases and three
    distinct branches. Killed, its lease counts as broken and its two branches
    no open lease holds as held by a broken lease; once the grace has passed,
    one branch was deleted and the kept, the protected and the one held
    elsewhere were spared."""
    d, address = metrics_daemon
    before = scrape(address)
    assert lease_figures(before) == {"open": 0, "held_open": 0, "held_broken": 0}
    assert value(before, "cowbranchd_lease_slots") == 64
    ready = tmp_path / "ready"
    holder = subprocess.Popen(
        [sys.executable, "-c", LEASE_HOLDER, d.address, f"bases/{d.base}", str(ready)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    try:
        for _ in range(1200):
            if ready.exists() or holder.poll() is not None:
                break
            time.sleep(0.1)
        assert holder.poll() is None, holder.communicate()[1].decode()
        plain, protected, kept, shared = ready.read_text().split("\n")
        with Client(d.address) as client:
            client.lease(holder="the holder, reconnected").hold(shared)
            held = scrape(address)
            assert lease_figures(held) == {"open": 2, "held_open": 3, "held_broken": 0}
            os.kill(holder.pid, signal.SIGKILL)
            holder.wait(timeout=30)
            broken = scrape_until(
                address,
                lambda s: lease_ends(s, before)["broken"] == 1,
                "the killed holder's lease broken",
            )
            assert lease_figures(broken) == {"open": 1, "held_open": 1, "held_broken": 2}
            expected = {"broken": 1, "deleted": 1, "kept": 1, "protected": 1, "held_elsewhere": 1}
            ended = scrape_until(
                address, lambda s: lease_ends(s, before) == expected, "the grace's end counted"
            )
            assert lease_figures(ended) == {"open": 1, "held_open": 1, "held_broken": 0}
            with pytest.raises(NotFound):
                client.get_branch(plain)
            assert client.get_branch(protected).protected
            client.delete_branch(protected, force=True)
            client.delete_branch(kept)
        # The clean close deleted `shared`, and counts as no break.
        after = scrape(address)
        assert lease_figures(after) == {"open": 0, "held_open": 0, "held_broken": 0}
        assert lease_ends(after, before) == expected
        with Client(d.address) as client, pytest.raises(NotFound):
            client.get_branch(shared)
    finally:
        if holder.poll() is None:
            holder.kill()
            holder.wait(timeout=30)
        holder.stderr.close()  # type: ignore[union-attr]


def _version() -> str:
    from cowbranchd import __version__  # noqa: PLC0415

    return __version__


def test_daemon_stops_its_metrics_endpoint(daemon_factory: DaemonFactory) -> None:
    """SIGTERM: the daemon drains, stops its HTTP endpoint and exits 0; the
    port then refuses connections."""
    d = daemon_factory(start=False)
    port = free_port_in(d)
    d.sections = {"daemon": f'metrics_address = "127.0.0.1:{port}"'}
    d.start()
    assert value(scrape(f"127.0.0.1:{port}"), "cowbranchd_storage_responding") == 1
    d.stop()
    assert d.proc is not None and d.proc.returncode == 0
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection(("127.0.0.1", port), timeout=10).close()
    d.cleanup()


def test_a_taken_metrics_port_is_a_start_failure(daemon_factory: DaemonFactory) -> None:
    """A metrics port someone else listens on stops the daemon at start, with
    the key and the reason, before it touches its runtime directory."""
    d = daemon_factory(start=False)
    port = free_port_in(d)
    d.sections = {"daemon": f'metrics_address = "127.0.0.1:{port}"'}
    with socket.create_server(("127.0.0.1", port)):
        d.start(wait=False)
        assert d.proc is not None
        try:
            returncode = d.proc.wait(timeout=120)
        except subprocess.TimeoutExpired:
            d.cleanup()
            raise
    assert returncode == 1
    failures = [
        json.loads(line)
        for line in d.log_path.read_text().splitlines()
        if line.startswith("{") and '"start_failed"' in line
    ]
    assert [f["error"] for f in failures] == [
        f"daemon.metrics_address: cannot listen on 127.0.0.1:{port}: Address already in use"
    ]
    assert not d.socket_path.parent.exists()
    d.cleanup()


def test_metrics_server_leaves_no_thread_behind() -> None:
    """The endpoint serves from one thread, which stop() joins; stop twice is fine."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    metrics = Metrics()
    metrics.rpc_done("GetBranch", "NOT_FOUND", 0.002)
    server = MetricsServer(f"127.0.0.1:{port}", metrics.registry)
    server.start()
    samples = scrape(f"127.0.0.1:{port}")
    assert value(samples, "cowbranchd_rpcs_total", method="GetBranch", code="NOT_FOUND") == 1
    server.stop()
    server.stop()
    assert [t for t in threading.enumerate() if t.name == "metrics-http"] == []
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection(("127.0.0.1", port), timeout=10).close()


class StalledDriver(BtrfsDriver):
    """The real btrfs driver, except that asking for the pool's usage stalls
    until released: a storage backend that stopped answering (as a stopped
    zfs-fuse does, where even statvfs waits)."""

    def __init__(self, root: Path) -> None:
        super().__init__(root)
        self.release = threading.Event()
        self.asked = 0

    def pool_usage(self) -> PoolUsage:
        self.asked += 1
        self.release.wait()
        return super().pool_usage()


def test_a_hung_storage_backend_never_hangs_a_scrape(btrfs_pool: Path) -> None:
    """While storage does not answer, a scrape's storage read gives up in its
    time box, the next does not pile another read on the hung one, and once
    storage answers the figures are back and no reading thread is left."""
    driver = StalledDriver(btrfs_pool)
    probe = StorageProbe(driver, Inventory())
    try:
        assert probe.read() is None
        assert probe.read() is None
        assert driver.asked == 1
    finally:
        driver.release.set()
    for thread in [t for t in threading.enumerate() if t.name == "metrics-storage"]:
        thread.join(timeout=60)
    reading = probe.read()
    assert reading is not None
    assert 0 < reading.used_bytes < reading.size_bytes
    assert driver.asked == 2
    assert [t for t in threading.enumerate() if t.name == "metrics-storage"] == []


@pytest.mark.parametrize(
    "address", ["127.0.0.1:9187", "[::1]:9187", "localhost:9187", "0.0.0.0:65535", ""]
)
def test_metrics_address_is_host_and_port(tmp_path: Path, address: str) -> None:
    """host:port (an IPv6 host in brackets), or empty for no endpoint (the default)."""
    path = tmp_path / "c.toml"
    path.write_text(f'[daemon]\nmetrics_address = "{address}"\n')
    assert load_config(path).daemon.metrics_address == address
    assert load_config(None).daemon.metrics_address == ""


@pytest.mark.parametrize(
    ("text", "problem"),
    [
        ('"9187"', "is not host:port"),
        ('"127.0.0.1"', "is not host:port"),
        ('"http://127.0.0.1:9187"', "is not host:port"),
        ('"::1:9187"', "is not host:port"),
        ('"127.0.0.1:0"', "port 0 is not within 1-65535"),
        ('"127.0.0.1:70000"', "port 70000 is not within 1-65535"),
        ("9187", "must be a string"),
    ],
)
def test_bad_metrics_address_names_the_key(tmp_path: Path, text: str, problem: str) -> None:
    """A metrics_address that is not host:port is refused, naming the key and the file."""
    path = tmp_path / "c.toml"
    path.write_text(f"[daemon]\nmetrics_address = {text}\n")
    with pytest.raises(InvalidArgument) as info:
        load_config(path)
    assert info.value.field == "daemon.metrics_address"
    assert problem in info.value.message
    assert str(path) in info.value.message


def _metric_names_served() -> set[str]:
    """Every metric family the daemon's registry has (scrape-time ones by
    their documented names, as they need a running daemon)."""
    families = {m.name for m in Metrics().registry.collect()}
    return families | {
        "cowbranchd_branches",
        "cowbranchd_branches_suspended",
        "cowbranchd_branch_slots",
        "cowbranchd_warm_branches_ready",
        "cowbranchd_storage_responding",
        "cowbranchd_pool_min_free_bytes",
        "cowbranchd_pool_size_bytes",
        "cowbranchd_pool_used_bytes",
        "cowbranchd_pool_free_bytes",
        "cowbranchd_branch_written_bytes",
    }


def _referenced(text: str) -> set[str]:
    """Metric names an expression mentions, suffixes of histograms and counters stripped."""
    found = set(re.findall(r"\b(?:cowbranchd|process)_[a-z_]+\b", text))
    return {re.sub(r"_(bucket|count|sum|total|info)$", "", name) for name in found}


def test_dashboard_and_docs_name_only_metrics_that_exist() -> None:
    """The Grafana dashboard is valid JSON and, like docs/metrics.md and its
    alert rules, names only metrics the daemon serves; the docs list them all."""
    served = _metric_names_served()
    text = (DOCS / "grafana-dashboard.json").read_text()
    dashboard = json.loads(text)
    exprs = [target["expr"] for panel in dashboard["panels"] for target in panel.get("targets", [])]
    assert exprs
    assert _referenced(text) - served == set()  # queries, variables, descriptions
    doc = (DOCS / "metrics.md").read_text()
    assert _referenced(doc) - served == set()
    assert {n for n in served if n.startswith("cowbranchd_")} - _referenced(doc) == set()
