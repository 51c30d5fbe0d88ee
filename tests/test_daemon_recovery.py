"""Faults made for real: the daemon SIGKILLed with live and half-built
branches, a postmaster killed, a broken postgres setting, SIGTERM draining;
each on btrfs and on zfs-fuse."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import threading
import time
from collections.abc import Callable

import grpc
import psutil
import psycopg
import pytest

from cowbranchd import postgres
from cowbranchd.v1 import branches_pb2
from tests.fix_daemon import DaemonHandle
from tests.fix_storage import branch_volumes

DaemonMaker = Callable[..., DaemonHandle]

Branch = branches_pb2.Branch


def running_in(d: DaemonHandle, volume: str) -> postgres.Postmaster | None:
    """The live postmaster of branch volume `volume`, None while it has none
    (or the volume does not exist yet)."""
    try:
        return postgres.find_postmaster(str(d.run_dir(volume)))
    except subprocess.CalledProcessError:  # `zfs get`: no such dataset yet
        return None


def process_lives(pid: int, create_time: float) -> bool:
    """Whether that very process still runs (a zombie left to an init that
    does not reap orphans counts as gone)."""
    try:
        proc = psutil.Process(pid)
        return proc.status() != psutil.STATUS_ZOMBIE and abs(proc.create_time() - create_time) < 1
    except psutil.NoSuchProcess:
        return False


def select_one(dsn: str) -> object:
    with psycopg.connect(dsn, autocommit=True) as conn:
        row = conn.execute("SELECT 1").fetchone()
    return row[0] if row else None


def test_sigkilled_daemon_adopts_branches_and_cleans_half_built(
    pool_daemon_factory: DaemonMaker,
) -> None:
    """After SIGKILL and restart, live branches are READY and still answer on the
    same DSN, keep their request_id idempotency, and a branch half-built at the
    kill is gone with its postmaster."""
    d = pool_daemon_factory()
    with d.channel() as ch:
        stub = d.branches(ch)
        live = stub.CreateBranch(
            branches_pb2.CreateBranchRequest(parent="bases/demo", request_id="keep-me"), timeout=120
        )
    # Every new branch's connections now wait 30 s before authenticating (an
    # operator setting: clients may not pass it), so the readiness check
    # hangs with the clone made and its postmaster running: a branch
    # half-built at the moment of the kill. `live` is adopted as it runs.
    d.stop()
    d.sections = {"postgres": 'settings = { pre_auth_delay = "30s" }'}
    d.start()
    with d.channel() as ch:
        stub = d.branches(ch)
        outcome: list[grpc.StatusCode] = []

        def slow_create() -> None:
            try:
                stub.CreateBranch(
                    branches_pb2.CreateBranchRequest(
                        parent="bases/demo",
                        branch_id="halfway",
                    ),
                    timeout=120,
                )
            except grpc.RpcError as exc:
                outcome.append(exc.code())

        worker = threading.Thread(target=slow_create)
        worker.start()
        for _ in range(600):
            if running_in(d, "halfway") is not None:
                break
            time.sleep(0.05)
        half_master = running_in(d, "halfway")
        assert half_master is not None
        d.kill(signal.SIGKILL)
        worker.join(60)
        assert outcome == [grpc.StatusCode.UNAVAILABLE]
    assert select_one(live.connection.dsn) == 1  # the branch outlived its daemon

    d.sections = {}
    d.start()
    with d.channel() as ch:
        stub = d.branches(ch)
        listed = stub.ListBranches(branches_pb2.ListBranchesRequest()).branches
        assert [(b.name, b.state) for b in listed] == [(live.name, Branch.READY)]
        assert listed[0].connection == live.connection
        assert select_one(live.connection.dsn) == 1
        again = stub.CreateBranch(
            branches_pb2.CreateBranchRequest(parent="bases/demo", request_id="keep-me"), timeout=120
        )
        assert again.name == live.name
    assert "halfway" not in branch_volumes(d)
    assert not process_lives(half_master.pid, half_master.create_time)
    d.stop()


def test_dead_postmaster_is_restarted_at_daemon_start(pool_daemon_factory: DaemonMaker) -> None:
    """A branch whose postmaster died while the daemon was down is restarted on
    its own port when the daemon comes back."""
    d = pool_daemon_factory()
    with d.channel() as ch:
        branch = d.branches(ch).CreateBranch(
            branches_pb2.CreateBranchRequest(parent="bases/demo"), timeout=120
        )
    d.stop()
    master = postgres.find_postmaster(str(d.run_dir(branch.name[9:])))
    assert master is not None
    os.kill(master.pid, signal.SIGKILL)
    psutil.wait_procs([psutil.Process(master.pid)], timeout=10) if psutil.pid_exists(
        master.pid
    ) else None
    d.start()
    with d.channel() as ch:
        got = d.branches(ch).GetBranch(branches_pb2.GetBranchRequest(name=branch.name))
    assert (got.state, got.connection.port) == (Branch.READY, branch.connection.port)
    assert select_one(got.connection.dsn) == 1
    d.stop()


def test_broken_setting_fails_with_log_tail_and_leaks_nothing(
    pool_daemon_factory: DaemonMaker,
) -> None:
    """A setting postgres rejects fails the create with the log tail, naming the
    field, and leaves no clone, process or port behind."""
    daemon = pool_daemon_factory()
    before_volumes = branch_volumes(daemon)
    before_masters = {p.pid for p in daemon.postmasters()}
    with daemon.channel() as ch:
        stub = daemon.branches(ch)
        with pytest.raises(grpc.RpcError) as info:
            stub.CreateBranch(
                branches_pb2.CreateBranchRequest(
                    parent="bases/demo",
                    branch_id="broken",
                    postgres_settings={"shared_buffers": "banana"},
                ),
                timeout=120,
            )
        assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        details = info.value.details() or ""
        assert details.startswith("postgres_settings")
        assert 'invalid value for parameter "shared_buffers"' in details
        assert branch_volumes(daemon) == before_volumes
        assert {p.pid for p in daemon.postmasters()} == before_masters
        with pytest.raises(grpc.RpcError) as info:
            stub.GetBranch(branches_pb2.GetBranchRequest(name="branches/broken"))
        assert info.value.code() == grpc.StatusCode.NOT_FOUND
        # The name and the port are free again.
        ok = stub.CreateBranch(
            branches_pb2.CreateBranchRequest(parent="bases/demo", branch_id="broken"), timeout=120
        )
        stub.DeleteBranch(branches_pb2.DeleteBranchRequest(name=ok.name), timeout=120)


def test_sigterm_drains_and_leaves_branches_running(pool_daemon_factory: DaemonMaker) -> None:
    """SIGTERM lets the daemon exit cleanly with its branches still answering,
    and logs one JSON line per RPC with its duration."""
    d = pool_daemon_factory()
    with d.channel() as ch:
        branch = d.branches(ch).CreateBranch(
            branches_pb2.CreateBranchRequest(parent="bases/demo", request_id="r-drain"), timeout=120
        )
    d.stop()
    assert d.proc is not None and d.proc.returncode == 0
    assert select_one(branch.connection.dsn) == 1
    events = [
        json.loads(line) for line in d.log_path.read_text().splitlines() if line.startswith("{")
    ]
    rpcs = [e for e in events if e.get("event") == "rpc" and e.get("method") == "CreateBranch"]
    assert len(rpcs) == 1
    assert rpcs[0]["code"] == "OK" and rpcs[0]["request_id"] == "r-drain"
    assert isinstance(rpcs[0]["ms"], float)
    assert any(e.get("event") == "draining" for e in events)


def test_systemd_ready_only_after_reconcile(pool_daemon_factory: DaemonMaker) -> None:
    """Under Type=notify the daemon sends READY=1 only once it is SERVING, and
    STOPPING=1 when it drains."""
    d = pool_daemon_factory(start=False)
    path = d.workdir / "notify.sock"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as notify:
        notify.bind(str(path))
        notify.settimeout(120)
        d.env = {"NOTIFY_SOCKET": str(path)}
        d.start(wait=False)
        message = notify.recv(4096).decode()
        assert message.splitlines()[0] == "READY=1"
        assert d.health() == "SERVING"
        d.stop()
        assert notify.recv(4096).decode() == "STOPPING=1"


def test_reset_interrupted_by_sigkill_keeps_the_branch(pool_daemon_factory: DaemonMaker) -> None:
    """A daemon SIGKILLed in the middle of a reset comes back with the branch
    READY on its old data, in exactly one volume, and nothing else running."""
    d = pool_daemon_factory()
    with d.channel() as ch:
        branch = d.branches(ch).CreateBranch(
            branches_pb2.CreateBranchRequest(parent="bases/demo", branch_id="keep"), timeout=120
        )
    with psycopg.connect(branch.connection.dsn, autocommit=True) as conn:
        conn.execute("INSERT INTO items VALUES (7, 'before reset')")
    d.stop()
    # Every new connection now waits 30 s, so the reset's readiness check hangs
    # with the new volume cloned and its postgres running.
    d.sections = {"postgres": 'settings = { pre_auth_delay = "30s" }'}
    d.start()
    outcome: list[grpc.StatusCode] = []

    def reset() -> None:
        with d.channel() as ch:
            try:
                d.branches(ch).ResetBranch(
                    branches_pb2.ResetBranchRequest(name=branch.name), timeout=120
                )
            except grpc.RpcError as exc:
                outcome.append(exc.code())

    worker = threading.Thread(target=reset)
    worker.start()
    for _ in range(600):
        # The old volume (its postgres stopped) and the new one, starting.
        if len(branch_volumes(d)) == 2 and len(d.postmasters()) == 1:
            break
        time.sleep(0.05)
    assert len(branch_volumes(d)) == 2
    d.kill(signal.SIGKILL)
    worker.join(60)
    assert outcome == [grpc.StatusCode.UNAVAILABLE]

    d.sections = {}
    d.start()
    with d.channel() as ch:
        got = d.branches(ch).GetBranch(branches_pb2.GetBranchRequest(name=branch.name))
    assert (got.state, got.connection) == (Branch.READY, branch.connection)
    with psycopg.connect(got.connection.dsn) as conn:
        assert conn.execute("SELECT name FROM items WHERE id = 7").fetchall() == [
            ("before reset",)
        ]
    assert branch_volumes(d) == {"keep"}
    assert len(d.postmasters()) == 1
    d.stop()
