"""cowbranchd measurements through its gRPC API (raw stubs: the figures include
nothing but gRPC on a Unix socket).

Create-to-ready is the client's view: CreateBranch until it returns, plus a
fresh psycopg connection through the returned DSN answering `SELECT 1` (the
daemon already waits for that; the benchmark verifies it, and counts it).
Every loop is bounded; nothing here asserts on time.
"""

from __future__ import annotations

import itertools
import json
import statistics
import subprocess
import sys
import threading
import time
import uuid
from collections import Counter
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import psutil
import psycopg
from _daemon import BenchDaemon
from _probe import PROBE_KINDS, PROBE_TIMEOUT

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
    "storm",
    "warm_series",
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


def warm_series(
    daemon: BenchDaemon, parent: str, runs: int, gap_s: float, warmup: int = 2
) -> Series:
    """`runs` create-to-ready + delete pairs, each after a pause of `gap_s`:
    a test's own work, during which the warm pool refills (back to back, the
    loop outruns the refill and measures cold creates)."""
    out = Series()
    for i in range(warmup + runs):
        time.sleep(gap_s)
        timing = create(daemon, parent, new_branch_id("wm"))
        gone = delete(daemon, timing.branch_id)
        if i >= warmup:
            out.creates.append(timing)
            out.deletes.append(gone)
    return out


def delete_retrying(daemon: BenchDaemon, branch_id: str, attempts: int = 20) -> float:
    """DeleteBranch, retried with backoff while the daemon refuses it for load
    (UNAVAILABLE: its write queue is full); seconds of the last attempt."""
    for attempt in range(attempts):
        try:
            return delete(daemon, branch_id)
        except grpc.RpcError as exc:
            if exc.code() != grpc.StatusCode.UNAVAILABLE or attempt == attempts - 1:
                raise
            time.sleep(min(2.0, 0.05 * 2**attempt))
    raise AssertionError("unreachable")


def _code(exc: grpc.RpcError) -> str:
    code = exc.code()
    return code.name if code is not None else "UNKNOWN"


@dataclass
class ParallelRound:
    wall_s: float  # first request sent until the last create answered (and SELECT 1)
    each: list[BranchTiming]  # the creates that ended READY and answered SELECT 1
    delete_wall_s: float
    failed: dict[str, int] = field(default_factory=dict)  # status code -> count


def parallel_creates(daemon: BenchDaemon, parent: str, width: int, rounds: int
                     ) -> list[ParallelRound]:
    """`width` creates issued at once (one thread each, released by a barrier),
    `rounds` times; the branches are then deleted in parallel too. A create
    that fails is counted by status code (the round goes on)."""
    results: list[ParallelRound] = []
    with ThreadPoolExecutor(max_workers=width) as pool:
        for _ in range(rounds):
            barrier = threading.Barrier(width + 1)
            ids = [new_branch_id("par") for _ in range(width)]

            def one(branch_id: str, barrier: threading.Barrier = barrier
                    ) -> BranchTiming | str:
                barrier.wait(timeout=60)
                try:
                    return create(daemon, parent, branch_id)
                except grpc.RpcError as exc:
                    return _code(exc)
                except psycopg.Error as exc:
                    return f"SELECT 1: {type(exc).__name__}"

            futures = [pool.submit(one, b) for b in ids]
            barrier.wait(timeout=60)
            t0 = time.perf_counter()
            outcomes = [f.result(timeout=RPC_TIMEOUT + 60) for f in futures]
            wall = time.perf_counter() - t0
            timings = [o for o in outcomes if isinstance(o, BranchTiming)]
            failed = Counter(o for o in outcomes if isinstance(o, str))
            t1 = time.perf_counter()
            list(pool.map(lambda b: delete_retrying(daemon, b.branch_id), timings,
                          timeout=RPC_TIMEOUT))
            results.append(ParallelRound(wall, timings, time.perf_counter() - t1,
                                         dict(failed)))
    return results


@dataclass
class ProbeTimes:
    """Latencies (s) of the reads the other client issued, per kind
    (PROBE_KINDS), failed ones included; failures counted by "kind CODE"."""

    times: dict[str, list[float]] = field(
        default_factory=lambda: {k: [] for k in PROBE_KINDS})
    errors: dict[str, int] = field(default_factory=dict)


def _start_probe(daemon: BenchDaemon, branch_name: str, idle_cycles: int
                 ) -> subprocess.Popen[str]:
    """bench/_probe.py in its own process, after its idle cycles (it said `ready`)."""
    proc = subprocess.Popen(
        [sys.executable, str(Path(__file__).with_name("_probe.py")), str(daemon.socket_path),
         branch_name, str(idle_cycles)],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
    )
    assert proc.stdout is not None
    line = proc.stdout.readline().strip()  # each of its calls has a deadline
    if line != "ready":
        proc.kill()
        proc.wait(timeout=30)
        raise RuntimeError(f"bench/_probe.py did not start (said {line!r})")
    return proc


def _tell(proc: subprocess.Popen[str], word: str) -> None:
    assert proc.stdin is not None
    proc.stdin.write(word + "\n")
    proc.stdin.flush()


@dataclass
class StormCreate:
    outcome: str  # "READY", another Branch state, or the gRPC status code name
    started: float  # perf_counter when the call was issued (just after the release)
    answered: float  # perf_counter when it returned
    message: str = ""

    @property
    def seconds(self) -> float:
        return self.answered - self.started


@dataclass
class StormResult:
    width: int
    wall_s: float  # the release until the last of the `width` creates answered
    creates: list[StormCreate]
    during: ProbeTimes  # reads while the creates were in flight
    idle: ProbeTimes  # the same reads just before, with nothing else running
    delete_wall_s: float  # deleting what the storm made, 8 at a time
    deleted: int
    delete_failures: dict[str, int]

    def outcomes(self) -> dict[str, int]:
        return dict(Counter(c.outcome for c in self.creates))

    def seconds(self, outcome: str) -> list[float]:
        return [c.seconds for c in self.creates if c.outcome == outcome]

    def messages(self) -> dict[str, str]:
        """One status message per outcome that is not READY."""
        return {c.outcome: c.message for c in self.creates if c.message}


def _storm_branches(daemon: BenchDaemon, prefix: str) -> list[str]:
    listed = daemon.branches.ListBranches(
        branches_pb2.ListBranchesRequest(page_size=1000), timeout=60).branches
    ids = [b.name.removeprefix("branches/") for b in listed]
    return [i for i in ids if i.startswith(prefix)]


def storm(daemon: BenchDaemon, parent: str, width: int, *, idle_cycles: int = 20,
          timeout: float = RPC_TIMEOUT) -> StormResult:
    """`width` CreateBranch calls released at once by a barrier (raw stubs, one
    thread and one request_id each, no retries), while another client, in its
    own process (bench/_probe.py, so these threads cannot delay it), loops over
    GetBranch, ListBranches(page_size=5) and health Check. The daemon runs at
    most `max_concurrent_writes` writes and queues `max_queued_writes`; the rest
    are refused UNAVAILABLE at once. Afterwards every branch the storm made is
    deleted (8 at a time)."""
    tag = f"storm-{time.time_ns() % 10**9:09d}"
    creates: list[StormCreate] = []
    idle = ProbeTimes()
    during = ProbeTimes()
    released = 0.0
    probe: subprocess.Popen[str] | None = None
    try:
        probe_branch = create(daemon, parent, f"{tag}-probe")
        probe = _start_probe(daemon, f"branches/{probe_branch.branch_id}", idle_cycles)

        barrier = threading.Barrier(width + 1)

        def one(i: int) -> StormCreate:
            request = branches_pb2.CreateBranchRequest(
                branch_id=f"{tag}-{i}", parent=parent, request_id=uuid.uuid4().hex)
            barrier.wait(timeout=60)
            t0 = time.perf_counter()
            try:
                branch = daemon.branches.CreateBranch(request, timeout=timeout)
            except grpc.RpcError as exc:
                return StormCreate(_code(exc), t0, time.perf_counter(),
                                   str(exc.details() or ""))
            state = branches_pb2.Branch.State.Name(branch.state)
            return StormCreate(state, t0, time.perf_counter(),
                               "" if state == "READY" else branch.failure)

        with ThreadPoolExecutor(max_workers=width) as pool:
            futures = [pool.submit(one, i) for i in range(width)]
            barrier.wait(timeout=60)
            released = time.perf_counter()
            _tell(probe, "go")
            creates = [f.result(timeout=timeout + 60) for f in futures]
        _tell(probe, "stop")
        text, _ = probe.communicate(timeout=3 * PROBE_TIMEOUT + 30)
        got = json.loads(text)
        idle = ProbeTimes(got["idle"], got["idle_errors"])
        during = ProbeTimes(got["during"], got["during_errors"])
    finally:
        if probe is not None and probe.poll() is None:
            probe.kill()
            probe.wait(timeout=30)
        t0 = time.perf_counter()
        deleted = 0
        failures: Counter[str] = Counter()

        def drop(branch_id: str) -> bool:
            try:
                delete_retrying(daemon, branch_id)
            except grpc.RpcError as exc:
                failures[_code(exc)] += 1
                return False
            return True

        # A create that gave up on its deadline may still finish: look twice.
        for _ in range(2):
            with ThreadPoolExecutor(max_workers=8) as pool:
                deleted += sum(pool.map(drop, _storm_branches(daemon, tag),
                                        timeout=RPC_TIMEOUT))
        delete_wall = time.perf_counter() - t0
    wall = max(c.answered for c in creates) - released
    return StormResult(width, wall, creates, during, idle, delete_wall, deleted,
                       dict(failures))


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
