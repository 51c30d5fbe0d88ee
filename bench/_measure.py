"""cowbranchd measurements through its gRPC API (raw stubs: the figures include
nothing but gRPC on a Unix socket).

Create-to-ready is the client's view: CreateBranch until it returns, plus a
fresh psycopg connection through the returned DSN answering `SELECT 1` (the
daemon already waits for that; the benchmark verifies it, and counts it).
Every loop is bounded; nothing here asserts on time.
"""

from __future__ import annotations

import itertools
import statistics
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import psutil
import psycopg
from _daemon import BenchDaemon

from cowbranchd.v1 import branches_pb2

__all__ = [
    "BranchTiming",
    "Series",
    "branch_memory",
    "create_delete_series",
    "density",
    "from_branch_series",
    "parallel_creates",
    "reset_series",
]

RPC_TIMEOUT = 300.0
_ids = itertools.count()


def new_branch_id(prefix: str) -> str:
    return f"{prefix}-{time.time_ns() % 10**9:09d}-{next(_ids)}"


def select_1(dsn: str) -> None:
    with psycopg.connect(dsn, connect_timeout=10, autocommit=True) as conn:
        conn.execute("SELECT 1").fetchone()


@dataclass
class BranchTiming:
    branch_id: str
    rpc_s: float  # CreateBranch until it returned
    verify_s: float  # then connect + SELECT 1 through the DSN
    port: int = 0
    dsn: str = ""

    @property
    def ready_s(self) -> float:
        return self.rpc_s + self.verify_s


@dataclass
class Series:
    creates: list[BranchTiming] = field(default_factory=list)
    deletes: list[float] = field(default_factory=list)

    def ready(self) -> list[float]:
        return [c.ready_s for c in self.creates]


def create(daemon: BenchDaemon, parent: str, branch_id: str) -> BranchTiming:
    t0 = time.perf_counter()
    branch = daemon.branches.CreateBranch(
        branches_pb2.CreateBranchRequest(branch_id=branch_id, parent=parent),
        timeout=RPC_TIMEOUT,
    )
    t1 = time.perf_counter()
    select_1(branch.connection.dsn)
    t2 = time.perf_counter()
    return BranchTiming(branch_id, t1 - t0, t2 - t1, branch.connection.port,
                        branch.connection.dsn)


def delete(daemon: BenchDaemon, branch_id: str) -> float:
    t0 = time.perf_counter()
    daemon.branches.DeleteBranch(
        branches_pb2.DeleteBranchRequest(name=f"branches/{branch_id}"), timeout=RPC_TIMEOUT
    )
    return time.perf_counter() - t0


def create_delete_series(daemon: BenchDaemon, parent: str, runs: int, warmup: int = 2) -> Series:
    """`runs` sequential create-to-ready + delete pairs, after `warmup` unrecorded ones."""
    out = Series()
    for i in range(warmup + runs):
        timing = create(daemon, parent, new_branch_id("cd"))
        gone = delete(daemon, timing.branch_id)
        if i >= warmup:
            out.creates.append(timing)
            out.deletes.append(gone)
    return out


@dataclass
class ParallelRound:
    wall_s: float  # first request sent until the last branch answered SELECT 1
    each: list[BranchTiming]
    delete_wall_s: float


def parallel_creates(daemon: BenchDaemon, parent: str, width: int, rounds: int
                     ) -> list[ParallelRound]:
    """`width` creates issued at once (one thread each, released by a barrier),
    `rounds` times; the branches are then deleted in parallel too."""
    results: list[ParallelRound] = []
    with ThreadPoolExecutor(max_workers=width) as pool:
        for _ in range(rounds):
            barrier = threading.Barrier(width + 1)
            ids = [new_branch_id("par") for _ in range(width)]

            def one(branch_id: str, barrier: threading.Barrier = barrier) -> BranchTiming:
                barrier.wait(timeout=60)
                return create(daemon, parent, branch_id)

            futures = [pool.submit(one, b) for b in ids]
            barrier.wait(timeout=60)
            t0 = time.perf_counter()
            timings = [f.result(timeout=RPC_TIMEOUT) for f in futures]
            wall = time.perf_counter() - t0
            t1 = time.perf_counter()
            list(pool.map(lambda b: delete(daemon, b), ids, timeout=RPC_TIMEOUT))
            results.append(ParallelRound(wall, timings, time.perf_counter() - t1))
    return results


def from_branch_series(daemon: BenchDaemon, base: str, runs: int) -> Series:
    """Branches of a running branch (CHECKPOINT + snapshot + clone + start),
    after the parent wrote a little (so its checkpoint has work to do)."""
    parent = create(daemon, base, new_branch_id("bfb-parent"))
    out = Series()
    try:
        with psycopg.connect(parent.dsn, autocommit=True) as conn:
            conn.execute("CREATE TABLE bench_bfb (i int)")
            for i in range(runs + 1):
                conn.execute("INSERT INTO bench_bfb SELECT generate_series(1, 1000)")
                timing = create(daemon, f"branches/{parent.branch_id}", new_branch_id("bfb"))
                gone = delete(daemon, timing.branch_id)
                if i >= 1:
                    out.creates.append(timing)
                    out.deletes.append(gone)
    finally:
        delete(daemon, parent.branch_id)
    return out


def reset_series(daemon: BenchDaemon, base: str, runs: int) -> list[tuple[float, float]]:
    """ResetBranch after a write, `runs` times: (rpc seconds, then SELECT 1 seconds)."""
    branch = create(daemon, base, new_branch_id("reset"))
    out: list[tuple[float, float]] = []
    try:
        for i in range(runs + 1):
            with psycopg.connect(branch.dsn, autocommit=True) as conn:
                conn.execute("CREATE TABLE IF NOT EXISTS bench_reset (i int)")
                conn.execute("INSERT INTO bench_reset SELECT generate_series(1, 1000)")
            t0 = time.perf_counter()
            daemon.branches.ResetBranch(
                branches_pb2.ResetBranchRequest(name=f"branches/{branch.branch_id}"),
                timeout=RPC_TIMEOUT,
            )
            t1 = time.perf_counter()
            select_1(branch.dsn)
            t2 = time.perf_counter()
            if i >= 1:
                out.append((t1 - t0, t2 - t1))
    finally:
        delete(daemon, branch.branch_id)
    return out


def _postmaster_of_port(port: int) -> psutil.Process | None:
    flag = f"port={port}"
    for proc in psutil.process_iter(["name", "cmdline"]):
        try:
            if proc.info["name"] == "postgres" and flag in (proc.info["cmdline"] or []):
                parent = proc.parent()
                if parent is None or parent.name() != "postgres":
                    return proc
        except psutil.Error:
            continue
    return None


def branch_memory(port: int) -> dict[str, float] | None:
    """RSS and PSS (MiB) summed over a branch's postmaster and all its children.
    PSS splits shared pages (shared_buffers, the binary) among their users."""
    master = _postmaster_of_port(port)
    if master is None:
        return None
    rss = pss = 0
    count = 0
    try:
        for proc in [master, *master.children(recursive=True)]:
            info = proc.memory_full_info()
            rss += info.rss
            pss += getattr(info, "pss", 0)
            count += 1
    except psutil.Error:
        return None
    return {"rss_mib": rss / 2**20, "pss_mib": pss / 2**20, "processes": count}


def _mem_available() -> int:
    return psutil.virtual_memory().available


@dataclass
class DensityResult:
    created: int
    stopped_because: str
    create_ms: list[float]
    memory_samples: list[dict[str, float]]
    mem_available_drop_mib_per_branch: float
    details: dict[str, Any] = field(default_factory=dict)


def density(daemon: BenchDaemon, base: str, cap: int, *, window: int = 5,
            idle_s: float = 2.0, on_progress: Callable[[int, float], None] | None = None
            ) -> DensityResult:
    """Create idle branches one by one, keeping them all, until `cap` exist or
    the median create-to-ready of the last `window` doubles that of the first
    `window`. Then sample the memory of idle branches, and delete them all."""
    before = _mem_available()
    kept: list[BranchTiming] = []
    why = f"reached the cap of {cap}"
    try:
        for n in range(cap):
            kept.append(create(daemon, base, new_branch_id("dens")))
            if on_progress is not None:
                on_progress(n + 1, kept[-1].ready_s)
            if len(kept) >= 2 * window:
                first = statistics.median(k.ready_s for k in kept[:window])
                last = statistics.median(k.ready_s for k in kept[-window:])
                if last >= 2 * first:
                    why = f"create median doubled at {len(kept)} branches"
                    break
        time.sleep(idle_s)  # let the new postmasters settle into idle
        after = _mem_available()
        step = max(1, len(kept) // 10)
        samples = [m for k in kept[::step] if (m := branch_memory(k.port)) is not None]
    finally:
        for timing in kept:
            delete(daemon, timing.branch_id)
    return DensityResult(
        created=len(kept),
        stopped_because=why,
        create_ms=[k.ready_s * 1000 for k in kept],
        memory_samples=samples,
        mem_available_drop_mib_per_branch=(before - after) / 2**20 / max(1, len(kept)),
    )
