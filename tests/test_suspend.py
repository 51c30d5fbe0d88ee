"""Idle suspend and transparent resume: a branch idle past its `idle_suspend`
has no postgres and shows SUSPENDED; the first connection to its unchanged
DSN resumes it and sees its data; it suspends again when idle; it survives a
daemon restart; it can be branched, reset and deleted. Real daemon, real
btrfs pool, real postgres."""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Iterator

import grpc
import psycopg
import pytest
from google.protobuf import duration_pb2, field_mask_pb2

from cowbranchd import postgres
from cowbranchd.daemon.acceptor import Acceptor, Waking
from cowbranchd.v1 import branches_pb2
from tests.fix_daemon import DaemonFactory, DaemonHandle

Branch = branches_pb2.Branch
WAIT_S = 60.0
# Connections fired at a resume: a burst at once, then one every STAGGER_S,
# together spanning the restart (postgres starts in ~100-250 ms here).
BURST = 4
STAGGERED = 20
STAGGER_S = 0.025


@pytest.fixture(scope="module")
def sleepy(daemon_factory: DaemonFactory) -> Iterator[DaemonHandle]:
    """A daemon whose branches suspend after 1 s idle by default (the reaper
    looks every 200 ms)."""
    d = daemon_factory(start=False)
    d.sections = {"daemon": 'idle_suspend = "1s"'}
    d.start()
    yield d
    d.stop()


def create(
    d: DaemonHandle,
    branch_id: str,
    parent: str = "bases/demo",
    idle_suspend: duration_pb2.Duration | None = None,
) -> Branch:
    with d.channel() as ch:
        return d.branches(ch).CreateBranch(
            branches_pb2.CreateBranchRequest(
                parent=parent, branch_id=branch_id, idle_suspend=idle_suspend
            ),
            timeout=120,
        )


def get(d: DaemonHandle, branch_id: str) -> Branch:
    with d.channel() as ch:
        return d.branches(ch).GetBranch(
            branches_pb2.GetBranchRequest(name=f"branches/{branch_id}"), timeout=30
        )


def wait_state(d: DaemonHandle, branch_id: str, state: Branch.State.ValueType) -> Branch:
    deadline = time.monotonic() + WAIT_S
    while time.monotonic() < deadline:
        branch = get(d, branch_id)
        if branch.state == state:
            return branch
        time.sleep(0.1)
    pytest.fail(f"{branch_id} not {Branch.State.Name(state)} within {WAIT_S}s")


def postmaster_of(d: DaemonHandle, branch_id: str) -> postgres.Postmaster | None:
    """The live postmaster of the branch, found from its data directory."""
    return postgres.find_postmaster(str(d.run_dir(branch_id)))


def items(dsn: str) -> list[str]:
    with psycopg.connect(dsn, autocommit=True, connect_timeout=10) as conn:
        return [r[0] for r in conn.execute("SELECT name FROM items ORDER BY id")]


def relayed(conn: psycopg.Connection[tuple[object, ...]]) -> bool:
    """Whether postgres sees this connection come from another port than the
    client's own: through the daemon's relay rather than straight to it."""
    sock = socket.socket(fileno=conn.pgconn.socket)
    try:
        local_port = sock.getsockname()[1]
    finally:
        sock.detach()
    row = conn.execute("SELECT inet_client_port()").fetchone()
    assert row is not None
    return bool(row[0] != local_port)


def test_an_idle_branch_suspends_and_its_dsn_resumes_it(sleepy: DaemonHandle) -> None:
    """Idle past its limit the branch has no postmaster and shows SUSPENDED;
    a connection to the old DSN works at once, sees the data, and is relayed;
    the next one goes straight to postgres; idle again, it suspends again."""
    d = sleepy
    branch = create(d, "nap")
    assert branch.idle_suspend.seconds == 1
    with psycopg.connect(branch.connection.dsn, autocommit=True) as conn:
        conn.execute("INSERT INTO items VALUES (4, 'date')")
        assert not relayed(conn)
    suspended = wait_state(d, "nap", Branch.SUSPENDED)
    assert postmaster_of(d, "nap") is None
    assert suspended.connection == branch.connection

    with psycopg.connect(branch.connection.dsn, autocommit=True, connect_timeout=10) as first:
        assert [r[0] for r in first.execute("SELECT name FROM items ORDER BY id")] == [
            "apple",
            "banana",
            "cherry",
            "date",
        ]
        assert relayed(first)
        assert get(d, "nap").state == Branch.READY
        assert postmaster_of(d, "nap") is not None
        with psycopg.connect(branch.connection.dsn, autocommit=True) as second:
            assert not relayed(second)
    wait_state(d, "nap", Branch.SUSPENDED)
    assert postmaster_of(d, "nap") is None
    assert items(branch.connection.dsn) == ["apple", "banana", "cherry", "date"]


def test_the_relay_does_not_let_another_password_in(sleepy: DaemonHandle) -> None:
    """The first connection to a suspended branch is relayed to its postgres
    over TCP, so its own password is asked: another branch's does not open it."""
    d = sleepy
    victim = create(d, "victim")
    intruder = create(d, "intruder", idle_suspend=duration_pb2.Duration(seconds=0))
    wait_state(d, "victim", Branch.SUSPENDED)
    stolen = victim.connection.dsn.replace(
        victim.connection.password, intruder.connection.password
    )
    with pytest.raises(psycopg.OperationalError, match="password authentication failed"):
        psycopg.connect(stolen, connect_timeout=10).close()
    assert items(victim.connection.dsn) == ["apple", "banana", "cherry"]


def test_per_branch_idle_suspend_and_update(sleepy: DaemonHandle) -> None:
    """idle_suspend zero at create means never (GetBranch shows none);
    UpdateBranch sets it, and then the branch suspends."""
    d = sleepy
    branch = create(d, "awake", idle_suspend=duration_pb2.Duration(seconds=0))
    assert not branch.HasField("idle_suspend")
    with d.channel() as ch:
        updated = d.branches(ch).UpdateBranch(
            branches_pb2.UpdateBranchRequest(
                branch=Branch(name="branches/awake", idle_suspend=duration_pb2.Duration(seconds=1)),
                update_mask=field_mask_pb2.FieldMask(paths=["idle_suspend"]),
            ),
            timeout=30,
        )
    assert updated.idle_suspend.seconds == 1
    wait_state(d, "awake", Branch.SUSPENDED)


def test_branch_from_and_reset_of_a_suspended_branch(sleepy: DaemonHandle) -> None:
    """A child of a suspended branch sees its data (the parent stays
    suspended); a reset of a suspended branch makes it READY as it was made."""
    d = sleepy
    parent = create(d, "sleeper")
    with psycopg.connect(parent.connection.dsn, autocommit=True) as conn:
        conn.execute("INSERT INTO items VALUES (5, 'elder')")
    wait_state(d, "sleeper", Branch.SUSPENDED)
    child = create(
        d, "wakeful", parent="branches/sleeper", idle_suspend=duration_pb2.Duration(seconds=0)
    )
    assert items(child.connection.dsn)[-1] == "elder"
    assert get(d, "sleeper").state == Branch.SUSPENDED
    with d.channel() as ch:
        reset = d.branches(ch).ResetBranch(
            branches_pb2.ResetBranchRequest(name="branches/sleeper"), timeout=120
        )
    assert reset.state == Branch.READY
    assert reset.connection == parent.connection
    assert items(parent.connection.dsn) == ["apple", "banana", "cherry"]


def test_a_suspended_branch_survives_a_daemon_restart(sleepy: DaemonHandle) -> None:
    """After a restart the branch is still SUSPENDED, not started, and the
    first connection to its DSN still resumes it."""
    d = sleepy
    branch = create(d, "durable")
    wait_state(d, "durable", Branch.SUSPENDED)
    d.stop()
    d.start()
    assert get(d, "durable").state == Branch.SUSPENDED
    assert postmaster_of(d, "durable") is None
    assert items(branch.connection.dsn) == ["apple", "banana", "cherry"]
    assert get(d, "durable").state == Branch.READY


def test_deleting_a_suspended_branch_leaves_nothing_listening(sleepy: DaemonHandle) -> None:
    """Delete of a suspended branch succeeds; its port then refuses connections."""
    d = sleepy
    branch = create(d, "gone")
    wait_state(d, "gone", Branch.SUSPENDED)
    with d.channel() as ch:
        d.branches(ch).DeleteBranch(
            branches_pb2.DeleteBranchRequest(name="branches/gone"), timeout=120
        )
        with pytest.raises(grpc.RpcError) as caught:
            d.branches(ch).GetBranch(branches_pb2.GetBranchRequest(name="branches/gone"))
    assert caught.value.code() == grpc.StatusCode.NOT_FOUND
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection(
            (branch.connection.host, branch.connection.port), timeout=5
        ).close()


def test_no_connection_is_refused_while_a_branch_resumes(sleepy: DaemonHandle) -> None:
    """Connections to a suspended branch's DSN all through its resume (a burst
    at once, then one every few ms for half a second) each get in and see its
    data: none meets a port nobody listens on, nor postgres still starting up."""
    d = sleepy
    branch = create(d, "crowd")
    with psycopg.connect(branch.connection.dsn, autocommit=True) as conn:
        conn.execute("INSERT INTO items VALUES (6, 'fig')")
    wait_state(d, "crowd", Branch.SUSPENDED)
    go = threading.Event()
    outcomes: dict[int, object] = {}

    def attempt(n: int, delay: float) -> None:
        go.wait()
        time.sleep(delay)
        try:
            outcomes[n] = items(branch.connection.dsn)
        except psycopg.Error as exc:
            outcomes[n] = f"{type(exc).__name__}: {exc}"

    delays = [0.0] * BURST + [i * STAGGER_S for i in range(STAGGERED)]
    threads = [threading.Thread(target=attempt, args=(n, delay)) for n, delay in enumerate(delays)]
    for thread in threads:
        thread.start()
    go.set()
    for thread in threads:
        thread.join()
    expected = ["apple", "banana", "cherry", "fig"]
    failed = [
        f"+{delay * 1000:.0f} ms: {outcomes.get(n)}"
        for n, delay in enumerate(delays)
        if outcomes.get(n) != expected
    ]
    assert failed == [], "\n".join(failed)
    assert get(d, "crowd").state == Branch.READY


def test_a_waking_port_is_steered_only_at_its_own_address() -> None:
    """While a branch wakes, a new connection to its port at its listen
    address queues for the relay even though a postgres-like listener has
    bound the port meanwhile; the same port at another local address is not
    taken (refused: nothing listens there); once relayed, a new connection
    reaches that listener directly. The acceptor alone, no postgres."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    acceptor = Acceptor()
    bound = threading.Event()
    release = threading.Event()
    relayed: list[int] = []
    server = socket.socket()

    def on_wake(waking: Waking) -> None:
        # As postgres binds: SO_REUSEADDR, no SO_REUSEPORT.
        server.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        server.bind(("127.0.0.1", port))
        server.listen(16)
        bound.set()
        release.wait(WAIT_S)
        relayed.append(waking.relay("127.0.0.1", port))

    try:
        acceptor.arm("steered", [(socket.AF_INET, "127.0.0.1")], port, on_wake)
        first = socket.create_connection(("127.0.0.1", port), timeout=10)
        assert bound.wait(WAIT_S)
        during = socket.create_connection(("127.0.0.1", port), timeout=10)
        server.setblocking(False)
        with pytest.raises(BlockingIOError):
            server.accept()  # not the new listener's yet: postgres would still be starting
        with pytest.raises(ConnectionRefusedError):
            socket.create_connection(("127.0.0.2", port), timeout=10).close()
        release.set()
        server.settimeout(10)
        upstreams = [server.accept()[0] for _ in range(2)]
        for upstream in upstreams:
            upstream.sendall(b"hello")
        assert [first.recv(5), during.recv(5)] == [b"hello", b"hello"]
        after = socket.create_connection(("127.0.0.1", port), timeout=10)
        direct, peer = server.accept()
        assert peer == after.getsockname()
        for sock in (first, during, after, direct, *upstreams):
            sock.close()
    finally:
        release.set()
        acceptor.close()
        server.close()
    assert relayed == [2]
