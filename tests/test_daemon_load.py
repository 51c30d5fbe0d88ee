"""Bounded work under load: a storm of creates never starves reads or
health, every create ends READY or with a clear status, and a create whose
caller went away is kept for a retry with its request_id, then reaped."""

from __future__ import annotations

import threading
import time
from concurrent import futures
from pathlib import Path

import grpc
import psycopg
import pytest

from cowbranchd.v1 import branches_pb2
from tests.fix_daemon import DaemonFactory

Branch = branches_pb2.Branch
pytestmark = pytest.mark.slow


def test_a_storm_of_creates_leaves_reads_and_health_answering(
    daemon_factory: DaemonFactory,
) -> None:
    """200 CreateBranch calls at once against 4 running and 8 queued turns:
    the excess is UNAVAILABLE at once, naming the limit; every accepted one is
    READY and answers; meanwhile health, GetBranch and ListBranches keep
    answering (each within the generous 10 s deadline the test gives them)."""
    d = daemon_factory(start=False)
    d.sections = {"daemon": "max_concurrent_writes = 4\nmax_queued_writes = 8"}
    d.start()
    with d.channel() as ch:
        probe = d.branches(ch).CreateBranch(
            branches_pb2.CreateBranchRequest(parent="bases/demo", branch_id="probe"), timeout=120
        )
    stop = threading.Event()
    reads: list[str] = []

    def read_while_storming() -> None:
        with d.channel() as ch:
            stub = d.branches(ch)
            while not stop.is_set():
                stub.GetBranch(branches_pb2.GetBranchRequest(name=probe.name), timeout=10)
                stub.ListBranches(branches_pb2.ListBranchesRequest(page_size=5), timeout=10)
                reads.append(d.health())
                time.sleep(0.05)

    reader = futures.ThreadPoolExecutor(1)
    reading = reader.submit(read_while_storming)
    start = threading.Barrier(200)

    def create(n: int) -> tuple[grpc.StatusCode, str, Branch | None]:
        with d.channel() as ch:
            start.wait()
            try:
                branch = d.branches(ch).CreateBranch(
                    branches_pb2.CreateBranchRequest(parent="bases/demo", request_id=f"s{n}"),
                    timeout=300,
                )
            except grpc.RpcError as exc:
                return exc.code(), exc.details() or "", None
            return grpc.StatusCode.OK, "", branch

    with futures.ThreadPoolExecutor(200) as pool:
        results = list(pool.map(create, range(200)))
    stop.set()
    reading.result(timeout=60)
    reader.shutdown()

    created = [b for code, _, b in results if b is not None]
    refused = [(code, details) for code, details, b in results if b is None]
    assert len(created) + len(refused) == 200
    assert created, "no create got through"
    assert {code for code, _ in refused} <= {grpc.StatusCode.UNAVAILABLE}
    assert all("too many branch writes calls in flight" in details for _, details in refused)
    assert reads and set(reads) == {"SERVING"}
    for branch in created:
        assert branch.state == Branch.READY
        with psycopg.connect(branch.connection.dsn, connect_timeout=30) as conn:
            assert conn.execute("SELECT 1").fetchone() == (1,)
    d.cleanup()


def test_a_create_whose_caller_left_is_kept_for_a_retry_then_reaped(
    daemon_factory: DaemonFactory,
) -> None:
    """A client cancels CreateBranch mid-way: the branch is finished and kept;
    a retry with its request_id gets it. Another one nobody comes back for is
    gone after `unclaimed_grace`, volume and all."""
    d = daemon_factory(start=False)
    # Every new connection waits a second before authenticating (an operator
    # setting), so each create is still running when its caller cancels.
    d.sections = {
        "daemon": 'unclaimed_grace = "2s"',
        "postgres": 'settings = { pre_auth_delay = "1s" }',
    }
    d.start()

    def cancelled_create(request_id: str) -> None:
        with d.channel() as ch:
            call = d.branches(ch).CreateBranch.future(
                branches_pb2.CreateBranchRequest(
                    parent="bases/demo", branch_id=request_id, request_id=request_id
                ),
                timeout=120,
            )
            time.sleep(0.3)
            assert call.cancel()  # type: ignore[no-untyped-call]

    def volumes() -> set[str]:
        return {p.name for p in (Path(d.pool_root) / "branches").iterdir()}

    cancelled_create("retried")
    cancelled_create("abandoned")
    with d.channel() as ch:
        stub = d.branches(ch)
        again = stub.CreateBranch(
            branches_pb2.CreateBranchRequest(
                parent="bases/demo", branch_id="retried", request_id="retried"
            ),
            timeout=120,
        )
        assert again.state == Branch.READY
        deadline = time.monotonic() + 60
        while "abandoned" in volumes() and time.monotonic() < deadline:
            time.sleep(0.2)
        assert volumes() == {"retried"}
        listed = stub.ListBranches(branches_pb2.ListBranchesRequest()).branches
        assert [b.name for b in listed] == ["branches/retried"]
        log = d.log_path.read_text()
        assert '"branch": "abandoned"' in log and "branch_unclaimed" in log
    d.cleanup()
