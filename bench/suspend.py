#!/usr/bin/env python3
"""Idle suspend: first query on a suspended branch, what a query costs on
the relayed first connection afterwards, and how many suspended branches the
machine holds while active ones keep their latency.

    .venv/bin/python bench/suspend.py [--suspended 500] [--active 20] [--runs 20]

Run as root. Its own daemon (a btrfs pool of its own under --data-dir: a
daemon's start-up reconcile would take over another daemon's branches on a
shared pool; the demo base,
`idle_suspend = "1s"`, reaper every 200 ms); every branch it made is deleted
at the end. Figures only: nothing here asserts on time.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import psutil
import psycopg
from _daemon import BenchDaemon
from _pools import open_pool
from google.protobuf import duration_pb2

from cowbranchd.v1 import bases_pb2, bases_pb2_grpc, branches_pb2

Branch = branches_pb2.Branch
PORTS = (48000, 48999)
# The pool's first base (the demo base on a fresh pool; else one bench/run.py made).
PARENT = ["bases/demo"]


class SuspendDaemon(BenchDaemon):
    @property
    def workdir(self) -> Path:
        return self.data_dir / f"daemon-suspend-{self.driver}"

    def write_config(self, *, max_branches: int = 1000) -> Path:
        path = self.workdir / "config.toml"
        path.write_text(
            f"""\
[daemon]
socket = "{self.socket_path}"
state_dir = "{self.workdir / "state"}"
log_format = "json"
log_level = "info"
max_branches = {max_branches}
idle_suspend = "1s"
reap_interval = "200ms"

[storage]
driver = "{self.driver}"
root = "{self.pool_root}"

[postgres]
port_range = "{PORTS[0]}-{PORTS[1]}"
socket_root = "{self.workdir / "pg"}"

[demo]
base_id = "demo"
"""
        )
        return path


def ms(seconds: float) -> float:
    return round(seconds * 1000, 2)


def pct(values: list[float], p: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(p / 100 * len(ordered)) - 1))]


def wait_state(
    d: SuspendDaemon, names: list[str], state: Branch.State.ValueType, timeout: float
) -> float:
    started = time.monotonic()
    pending = set(names)
    while pending:
        if time.monotonic() - started > timeout:
            raise RuntimeError(f"{len(pending)} branches not {Branch.State.Name(state)}")
        listed = d.branches.ListBranches(
            branches_pb2.ListBranchesRequest(page_size=1000), timeout=60
        ).branches
        pending -= {b.name for b in listed if b.state == state}
        time.sleep(0.2)
    return time.monotonic() - started


def create(d: SuspendDaemon, branch_id: str, idle_s: int) -> Branch:
    return d.branches.CreateBranch(
        branches_pb2.CreateBranchRequest(
            parent=PARENT[0],
            branch_id=branch_id,
            idle_suspend=duration_pb2.Duration(seconds=idle_s),
        ),
        timeout=120,
    )


def round_trips(dsn: str, n: int) -> list[float]:
    """Seconds per `SELECT 1` round trip over one connection."""
    with psycopg.connect(dsn, autocommit=True) as conn:
        for _ in range(50):
            conn.execute("SELECT 1")
        out = []
        for _ in range(n):
            t = time.perf_counter()
            conn.execute("SELECT 1").fetchone()
            out.append(time.perf_counter() - t)
    return out


def connect_select(dsn: str) -> float:
    t = time.perf_counter()
    with psycopg.connect(dsn, autocommit=True, connect_timeout=30) as conn:
        conn.execute("SELECT 1").fetchone()
    return time.perf_counter() - t


def active_latency(active: list[Branch], n: int) -> dict[str, float]:
    trips: list[float] = []
    connects: list[float] = []
    for b in active:
        trips += round_trips(b.connection.dsn, n)
        connects.append(connect_select(b.connection.dsn))
    return {
        "select1_p50_us": round(statistics.median(trips) * 1e6, 1),
        "select1_p99_us": round(pct(trips, 99) * 1e6, 1),
        "connect_select_p50_ms": ms(statistics.median(connects)),
        "connect_select_max_ms": ms(max(connects)),
    }


def mem_available() -> int:
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemAvailable:"):
            return int(line.split()[1]) * 1024
    return 0


def postgres_count() -> int:
    return sum(1 for p in psutil.process_iter(["name"]) if p.info["name"] == "postgres")


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--suspended", type=int, default=500)
    p.add_argument("--active", type=int, default=20)
    p.add_argument("--runs", type=int, default=20)
    p.add_argument("--data-dir", type=Path, default=Path("/var/tmp/cowbranchd-bench-suspend"))
    p.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "results")
    args = p.parse_args()

    pool = open_pool("btrfs", args.data_dir)
    d = SuspendDaemon("btrfs", pool.root, args.data_dir)
    results: dict[str, Any] = {"load_before": list(psutil.getloadavg())}
    d.start()
    try:
        assert d.channel is not None
        listed = bases_pb2_grpc.BaseServiceStub(d.channel).ListBases(
            bases_pb2.ListBasesRequest(), timeout=60
        )
        PARENT[0] = sorted(b.name for b in listed.bases)[0]
        results["parent"] = PARENT[0]
        # 1. First query on a suspended branch, and per-query cost afterwards.
        b = create(d, "first", 1)
        first: list[float] = []
        for _ in range(args.runs):
            wait_state(d, [b.name], Branch.SUSPENDED, 60)
            first.append(connect_select(b.connection.dsn))
        direct = [connect_select(b.connection.dsn) for _ in range(args.runs)]
        wait_state(d, [b.name], Branch.SUSPENDED, 60)
        relayed_trips = round_trips(b.connection.dsn, 2000)  # the waking connection
        direct_trips = round_trips(b.connection.dsn, 2000)  # postgres already up
        results["first_query"] = {
            "runs": args.runs,
            "suspended_connect_select_p50_ms": ms(statistics.median(first)),
            "suspended_connect_select_max_ms": ms(max(first)),
            "running_connect_select_p50_ms": ms(statistics.median(direct)),
            "relayed_select1_p50_us": round(statistics.median(relayed_trips) * 1e6, 1),
            "direct_select1_p50_us": round(statistics.median(direct_trips) * 1e6, 1),
        }
        print(json.dumps(results["first_query"]), flush=True)

        # 2. Density: active branches' latency before and after N suspended ones.
        active = [create(d, f"active-{i}", 0) for i in range(args.active)]
        results["active_before"] = active_latency(active, 200)
        mem0, pg0 = mem_available(), postgres_count()
        started = time.monotonic()
        names = []
        for i in range(args.suspended):
            names.append(create(d, f"idle-{i}", 1).name)
        created_s = time.monotonic() - started
        waited_s = wait_state(d, names, Branch.SUSPENDED, 900)
        time.sleep(2)
        results["density"] = {
            "suspended": args.suspended,
            "create_all_s": round(created_s, 1),
            "all_suspended_after_s": round(waited_s, 1),
            "postgres_processes_before": pg0,
            "postgres_processes_after": postgres_count(),
            "mem_available_drop_mib": round((mem0 - mem_available()) / 2**20, 1),
            "daemon_rss_mib": round(psutil.Process(d.proc.pid).memory_info().rss / 2**20, 1)
            if d.proc
            else 0,
            "daemon_fds": psutil.Process(d.proc.pid).num_fds() if d.proc else 0,
        }
        results["active_after"] = active_latency(active, 200)
        print(json.dumps(results, indent=1), flush=True)
    finally:
        d.stop()
        pool.release()
    args.out.mkdir(parents=True, exist_ok=True)
    out = args.out / f"suspend-{time.strftime('%Y%m%dT%H%M%S')}.json"
    out.write_text(json.dumps(results, indent=1))
    print(f"wrote {out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
