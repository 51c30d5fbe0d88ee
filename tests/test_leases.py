"""Leases tie branches to a client's life: a pytest run killed with SIGKILL
loses its branches within the lease grace; a clean run deletes nothing it was
told to keep; a broken lease spares protected and kept branches; only a
branch's owner may put it in a lease; bad names are answered without breaking
the lease; leases are capped so they never take every worker thread."""

from __future__ import annotations

import os
import queue
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest

from cowbranchd.client import Client
from cowbranchd.errors import PermissionDenied
from cowbranchd.v1 import branches_pb2, daemon_pb2, daemon_pb2_grpc, leases_pb2, leases_pb2_grpc
from tests.fix_daemon import DaemonFactory, DaemonHandle
from tests.test_owners import write_token

pytest_plugins = ["pytester"]

GRACE_S = 2.0
TOKENS = {"alice": "alice-token-lease-0123456789", "bob": "bob-token-lease-0123456789"}


@pytest.fixture(scope="module")
def lease_daemon(daemon_factory: DaemonFactory) -> Iterator[DaemonHandle]:
    """A daemon with a short lease grace, at most 3 leases, and tenants alice and bob."""
    d = daemon_factory(start=False)
    tokens_dir = d.workdir / "tokens"
    tokens_dir.mkdir(mode=0o700)
    for tenant, token in TOKENS.items():
        write_token(tokens_dir, tenant, token)
    d.sections["daemon"] = f'lease_grace = "{GRACE_S:g}s"\nmax_leases = 3'
    d.extra_config = f'\n[tenants]\ntokens_dir = "{tokens_dir}"\n'
    d.start()
    yield d
    d.cleanup()


def _suite_branches(d: DaemonHandle, suite: str) -> list[str]:
    with Client(d.address) as client:
        return sorted(b.name for b in client.list_branches({"suite": suite}))


def _wait_for(check: object, bound: float, what: str) -> None:
    deadline = time.monotonic() + bound
    while not check():  # type: ignore[operator]
        if time.monotonic() > deadline:
            raise AssertionError(f"not within {bound:g}s: {what}")
        time.sleep(0.1)


KILLED_RUN = """
import pathlib, time, pytest

pytestmark = pytest.mark.cowbranch(labels={{"suite": "{suite}"}})

def test_holds_and_hangs(cowbranch, cowbranch_session_factory):
    cowbranch_session_factory(labels={{"suite": "{suite}"}})
    pathlib.Path({ready!r}).write_text("ready")
    time.sleep(600)
"""


def test_a_killed_pytest_run_loses_its_branches_within_the_grace(
    lease_daemon: DaemonHandle, tmp_path: Path
) -> None:
    """SIGKILL mid-test: the run's test and session branches are gone within grace + 5 s."""
    suite = uuid.uuid4().hex[:8]
    ready = tmp_path / "ready"
    (tmp_path / "test_killed.py").write_text(KILLED_RUN.format(suite=suite, ready=str(ready)))
    run = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "pytest",
            "-p",
            "no:cacheprovider",
            f"--cowbranch-address={lease_daemon.address}",
            f"--cowbranch-parent=bases/{lease_daemon.base}",
            "test_killed.py",
        ],
        cwd=tmp_path,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        _wait_for(lambda: ready.exists() or run.poll() is not None, 120, "the test to start")
        assert run.poll() is None, "the pytest run ended before it was killed"
        assert len(_suite_branches(lease_daemon, suite)) == 2
        os.kill(run.pid, signal.SIGKILL)
        run.wait(timeout=30)
    finally:
        if run.poll() is None:
            run.kill()
            run.wait(timeout=30)
    _wait_for(
        lambda: _suite_branches(lease_daemon, suite) == [],
        GRACE_S + 5,
        "the killed run's branches deleted",
    )


KEEP_RUN = """
import pytest

pytestmark = pytest.mark.cowbranch(labels={{"suite": "{suite}"}})

def test_passes(cowbranch):
    pass

def test_fails(cowbranch):
    assert False, "deliberate failure"
"""


def test_a_clean_run_releases_its_lease_and_deletes_nothing_it_kept(
    pytester: pytest.Pytester, lease_daemon: DaemonHandle
) -> None:
    """A clean run with keep-failed: the failed test's branch outlives the run past the grace."""
    suite = uuid.uuid4().hex[:8]
    pytester.makepyfile(KEEP_RUN.format(suite=suite))
    broken_before = lease_daemon.log_path.read_text().count('"lease_broken"')
    result = pytester.runpytest_subprocess(
        f"--cowbranch-address={lease_daemon.address}",
        f"--cowbranch-parent=bases/{lease_daemon.base}",
        "--cowbranch-keep-failed=1h",
        "-p",
        "no:cacheprovider",
    )
    result.assert_outcomes(passed=1, failed=1)
    time.sleep(GRACE_S + 1)  # past the grace: a broken lease would have deleted it by now
    [name] = _suite_branches(lease_daemon, suite)
    with Client(lease_daemon.address) as client:
        kept = client.get_branch(name)
        assert kept.labels["pytest.test"].endswith("test_fails")
        with kept.connect() as conn:
            assert conn.execute("select count(*) from items").fetchone() == (3,)
        client.delete_branch(name)
    log = lease_daemon.log_path.read_text()
    assert log.count('"lease_broken"') == broken_before  # closed cleanly, not broken


class RawLease:
    """A lease stream driven by hand, so a test can break it like a killed process."""

    def __init__(self, d: DaemonHandle, token: str | None = None) -> None:
        self.channel = d.channel()
        self._q: queue.SimpleQueue[leases_pb2.LeaseRequest | None] = queue.SimpleQueue()
        metadata = (("authorization", f"Bearer {token}"),) if token else ()
        self.call: Any = leases_pb2_grpc.LeaseServiceStub(self.channel).Lease(
            iter(self._q.get, None), metadata=metadata
        )

    def send(self, **fields: object) -> leases_pb2.LeaseResponse:
        self._q.put(leases_pb2.LeaseRequest(**fields))  # type: ignore[arg-type]
        response: leases_pb2.LeaseResponse = next(self.call)
        return response

    def break_(self) -> None:
        self.call.cancel()
        self.channel.close()


def test_a_broken_lease_spares_protected_and_kept_branches(lease_daemon: DaemonHandle) -> None:
    """A stream cancelled without a close: the plain branch goes; protected and kept ones stay."""
    with Client(lease_daemon.address) as client:
        plain = client.create_branch("bases/demo", ttl="1h")
        protected = client.create_branch("bases/demo", ttl="1h", protected=True)
        kept = client.create_branch("bases/demo", ttl="1h")
        lease = RawLease(lease_daemon)
        first = lease.send(holder="test", hold=[plain.name, protected.name, kept.name])
        assert (first.error_code, first.held_count) == (0, 3)
        assert first.name.startswith("leases/ls-")
        assert lease.send(keep=[kept.name]).held_count == 2
        lease.break_()

        def plain_gone() -> bool:
            return plain.name not in {b.name for b in client.list_branches()}

        _wait_for(plain_gone, GRACE_S + 5, "the plain branch deleted")
        assert client.get_branch(protected.name).protected
        assert client.get_branch(kept.name).name == kept.name
        client.delete_branch(protected.name, force=True)
        client.delete_branch(kept.name)


def test_a_bad_request_is_answered_and_the_lease_stays(lease_daemon: DaemonHandle) -> None:
    """A malformed or unknown name is an error in the answer; the lease keeps what it held."""
    with Client(lease_daemon.address) as client:
        branch = client.create_branch("bases/demo", ttl="1h")
        lease = RawLease(lease_daemon)
        assert lease.send(hold=[branch.name]).held_count == 1
        bad = lease.send(hold=["branches/Not_An-Id"])
        assert bad.error_code == grpc.StatusCode.INVALID_ARGUMENT.value[0]
        assert bad.error_message.startswith("hold")
        missing = lease.send(hold=["branches/no-such-branch", branch.name])
        assert missing.error_code == grpc.StatusCode.NOT_FOUND.value[0]
        assert missing.held_count == 1
        closed = lease.send(close=True)
        assert list(closed.deleted) == [branch.name]
        assert branch.name not in {b.name for b in client.list_branches()}
        lease.break_()


def test_only_the_owner_may_put_a_branch_in_a_lease(lease_daemon: DaemonHandle) -> None:
    """Bob cannot hold alice's branch (so his killed process cannot delete it); alice can."""
    with (
        Client(lease_daemon.address, token=TOKENS["alice"]) as alice,
        Client(lease_daemon.address, token=TOKENS["bob"]) as bob,
    ):
        hers = alice.create_branch("bases/demo", ttl="1h")
        with pytest.raises(PermissionDenied, match="belongs to another owner"):
            bob.lease().hold(hers.name)
        assert bob.lease().held == frozenset()
        bobs = RawLease(lease_daemon, TOKENS["bob"])
        denied = bobs.send(hold=[hers.name])
        assert denied.error_code == grpc.StatusCode.PERMISSION_DENIED.value[0]
        bobs.break_()
        time.sleep(GRACE_S + 1)  # past bob's grace
        assert alice.get_branch(hers.name).name == hers.name
        alice.lease().hold(hers.name)
        assert alice.lease().close() == [hers.name]


def test_leases_are_capped_and_other_calls_still_answer(lease_daemon: DaemonHandle) -> None:
    """Beyond daemon.max_leases a new lease is RESOURCE_EXHAUSTED at once; reads still answer."""
    held: list[RawLease] = []
    try:
        while len(held) < 3:  # earlier tests' broken streams may take a moment to end
            lease = RawLease(lease_daemon)
            try:
                assert lease.send(holder="filler").error_code == 0
            except grpc.RpcError:
                lease.break_()
                time.sleep(0.2)
                continue
            held.append(lease)
        extra = RawLease(lease_daemon)
        with pytest.raises(grpc.RpcError) as refused:
            extra.send(holder="one too many")
        assert refused.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "daemon.max_leases" in (refused.value.details() or "")
        extra.break_()
        with lease_daemon.channel() as channel:
            status = daemon_pb2_grpc.DaemonServiceStub(channel).GetStatus(
                daemon_pb2.GetStatusRequest(), timeout=10
            )
        assert status.version
    finally:
        for lease in held:
            lease.break_()


def _create_in(d: DaemonHandle, token: str, lease: str, suite: str) -> str:
    """CreateBranch(lease=...) as the tenant `token` names: the branch's name."""
    with d.channel() as channel:
        branch = d.branches(channel).CreateBranch(
            branches_pb2.CreateBranchRequest(
                parent="bases/demo", lease=lease, labels={"suite": suite}
            ),
            metadata=(("authorization", f"Bearer {token}"),),
            timeout=120,
        )
    return branch.name


def test_a_create_names_its_lease_and_the_branch_is_held_before_the_answer(
    lease_daemon: DaemonHandle,
) -> None:
    """CreateBranch(lease=...) holds the branch in the same call: a stream
    broken right after the answer loses it within the grace, without any
    `hold`. An unknown lease or another caller's is FAILED_PRECONDITION
    naming it, and nothing is created."""
    suite = uuid.uuid4().hex[:8]
    lease = RawLease(lease_daemon, TOKENS["alice"])
    name = lease.send(holder="creates").name
    with Client(lease_daemon.address, token=TOKENS["alice"]) as alice:
        free = alice.create_branch("bases/demo", ttl="1h", labels={"suite": suite})
    held = _create_in(lease_daemon, TOKENS["alice"], name, suite)
    for token, lease_name in ((TOKENS["alice"], "leases/ls-000000000000"), (TOKENS["bob"], name)):
        with pytest.raises(grpc.RpcError) as refused:
            _create_in(lease_daemon, token, lease_name, suite)
        assert refused.value.code() == grpc.StatusCode.FAILED_PRECONDITION
        assert f"lease {lease_name} is not open" in (refused.value.details() or "")
    assert _suite_branches(lease_daemon, suite) == sorted([free.name, held])
    lease.break_()
    _wait_for(
        lambda: _suite_branches(lease_daemon, suite) == [free.name],
        GRACE_S + 5,
        "the branch created in the lease deleted, the other kept",
    )
    with Client(lease_daemon.address, token=TOKENS["alice"]) as alice:
        alice.delete_branch(free.name)


def test_the_client_holds_what_it_creates_in_its_lease(lease_daemon: DaemonHandle) -> None:
    """client.branch() and create_branch(lease=) create in the client's lease
    (no separate hold); closing the lease deletes what was created in it."""
    with Client(lease_daemon.address) as client:
        with client.branch("bases/demo", ttl="1h") as branch:
            assert client.lease().held == frozenset({branch.name})
        lease = client.lease()
        made = client.create_branch("bases/demo", ttl="1h", lease=lease)
        assert made.name in lease.held
        assert lease.close() == [made.name]


def test_a_create_in_a_lease_the_daemon_forgot_opens_it_again(daemon: DaemonHandle) -> None:
    """After a daemon restart (leases live in memory) the client's create is
    refused for its old lease name; the client opens the lease again, holds
    again what it held, and the retried create (same request_id) lands in the
    new lease."""
    with Client(daemon.address) as client:
        lease = client.lease()
        before = client.create_branch("bases/demo", ttl="1h", lease=lease)
        old_name = lease.name
        daemon.stop()
        daemon.start()
        after = client.create_branch("bases/demo", ttl="1h", lease=lease)
        assert lease.name != old_name
        assert lease.held == frozenset({before.name, after.name})
        assert sorted(lease.close()) == sorted([before.name, after.name])
        assert list(client.list_branches()) == []
