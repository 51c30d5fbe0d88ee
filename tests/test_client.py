"""The Python client library: pure helpers, unreachable daemons, and every call
against a real daemon on a real btrfs pool with real PostgreSQL behind each DSN."""

from __future__ import annotations

import asyncio
import random
import threading
import uuid
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from pathlib import Path

import psycopg
import pytest
from google.protobuf import duration_pb2, timestamp_pb2

import cowbranchd.client as client_module
from cowbranchd.client import (
    AlreadyExists,
    AsyncClient,
    Branch,
    Client,
    CowbranchError,
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    RetryPolicy,
    Unavailable,
    format_duration,
    format_selector,
    parse_duration,
)
from cowbranchd.client.transport import resolve_endpoint
from cowbranchd.client.types import sanitize_label_value
from cowbranchd.v1 import branches_pb2
from tests.fix_daemon import DaemonFactory, DaemonHandle

FAST_FAIL = RetryPolicy(max_elapsed=0.3)


# -- pure helpers ---------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("30m", timedelta(minutes=30)),
        ("2h", timedelta(hours=2)),
        ("1d", timedelta(days=1)),
        ("1h30m", timedelta(minutes=90)),
        ("90s", timedelta(seconds=90)),
        ("1w", timedelta(days=7)),
        ("45", timedelta(seconds=45)),
        (" 2H ", timedelta(hours=2)),
        (120, timedelta(minutes=2)),
        (timedelta(hours=3), timedelta(hours=3)),
    ],
)
def test_parse_duration_reads_compact_units(
    text: str | int | timedelta, expected: timedelta
) -> None:
    """Durations are `<number><unit>` parts (s, m, h, d, w), bare numbers are seconds."""
    assert parse_duration(text) == expected


@pytest.mark.parametrize("text", ["", "soon", "1y", "h2", "-5m", "2h-"])
def test_parse_duration_refuses_nonsense_naming_the_field(text: str) -> None:
    """A bad duration is InvalidArgument naming the field it was given for."""
    with pytest.raises(InvalidArgument) as info:
        parse_duration(text, field="--ttl")
    assert info.value.field == "--ttl"


def test_format_duration_round_trips_through_parse() -> None:
    """format_duration writes what parse_duration reads, largest units first."""
    assert [format_duration(parse_duration(t)) for t in ("1d2h", "90m", "0", "3661")] == [
        "1d2h",
        "1h30m",
        "0s",
        "1h1m1s",
    ]


def test_format_selector_sorts_mappings_and_checks_terms() -> None:
    """A mapping becomes sorted key=value terms; text terms are kept and checked."""
    assert format_selector({"team": "web", "pr": "123"}) == "pr=123,team=web"
    assert format_selector(" pr=123, team!=web ,owner ") == "pr=123,team!=web,owner"
    assert format_selector(None) == ""
    with pytest.raises(InvalidArgument, match="label_selector"):
        format_selector("Pr=1")


def test_sanitize_label_value_keeps_the_specific_end() -> None:
    """Node ids become valid label values, long ones keep their end behind `..`."""
    assert sanitize_label_value("tests/test_x.py::test_a[1-2]") == "tests_test_x.py_test_a_1-2"
    long = sanitize_label_value("tests/" + "x" * 100 + "::test_end")
    assert len(long) == 63
    assert long.startswith("..")
    assert long.endswith("_test_end")


def test_resolve_endpoint_accepts_sockets_and_tcp(monkeypatch: pytest.MonkeyPatch) -> None:
    """Addresses come from the argument, else COWBRANCHD_ADDRESS, else the default socket."""
    monkeypatch.delenv("COWBRANCHD_ADDRESS", raising=False)
    monkeypatch.delenv("COWBRANCHD_TOKEN", raising=False)
    assert resolve_endpoint().target == "unix:///run/cowbranchd/api.sock"
    monkeypatch.setenv("COWBRANCHD_ADDRESS", "runner-host:7443")
    assert resolve_endpoint().target == "runner-host:7443"
    assert resolve_endpoint("/tmp/cbd/api.sock").target == "unix:///tmp/cbd/api.sock"
    assert resolve_endpoint("[::1]:7443").target == "[::1]:7443"
    token = resolve_endpoint("localhost:1", token="s3cret")
    assert token.metadata() == (("authorization", "Bearer s3cret"),)


@pytest.mark.parametrize("address", ["localhost", "host:0", "host:70000", "unix://", "http://x"])
def test_resolve_endpoint_refuses_bad_addresses(address: str) -> None:
    """An address that is neither a socket nor host:port is InvalidArgument naming `address`."""
    with pytest.raises(InvalidArgument) as info:
        resolve_endpoint(address)
    assert info.value.field == "address"


def test_tls_is_refused_for_unix_sockets() -> None:
    """A root certificate only makes sense for TCP."""
    with pytest.raises(InvalidArgument, match="tls_root_cert"):
        resolve_endpoint("unix:///tmp/x.sock", tls_root_cert=b"-----BEGIN CERTIFICATE-----")


def test_retry_delay_grows_with_jitter_and_stops_at_max_elapsed() -> None:
    """Backoff doubles up to its cap, half of it random; no retry past max_elapsed."""
    policy = RetryPolicy(initial_backoff=0.1, max_backoff=0.4, multiplier=2.0, max_elapsed=1.0)
    rng = random.Random(7)
    for attempt, cap in [(0, 0.1), (1, 0.2), (2, 0.4), (5, 0.4)]:
        assert cap / 2 <= policy.delay(attempt, rng) <= cap
    assert policy.next_delay(0, elapsed=0.99, remaining=10) is None
    assert policy.next_delay(0, elapsed=0.0, remaining=0.01) is None
    assert RetryPolicy(max_elapsed=0).next_delay(0, elapsed=0, remaining=10) is None


def test_branch_from_proto_gives_the_documented_json() -> None:
    """Branch.to_dict is the stable JSON document of docs/clients.md."""
    created = timestamp_pb2.Timestamp(seconds=1_700_000_000)
    message = branches_pb2.Branch(
        name="branches/pr-1",
        parent="bases/demo/versions/1",
        state=branches_pb2.Branch.READY,
        connection=branches_pb2.Connection(
            host="127.0.0.1",
            port=56001,
            user="postgres",
            password="pw",
            database="app",
            socket_dir="/run/x",
            dsn="postgresql://postgres:pw@127.0.0.1:56001/app",
        ),
        labels={"pr": "1"},
        create_time=created,
        written_bytes=8192,
        request_id="r1",
        idle_suspend=duration_pb2.Duration(seconds=900),
        frozen=True,
    )
    branch = Branch.from_proto(message)
    assert branch.branch_id == "pr-1"
    assert branch.connection_kwargs() == {
        "host": "127.0.0.1",
        "port": 56001,
        "user": "postgres",
        "password": "pw",
        "dbname": "app",
    }
    assert branch.to_dict() == {
        "name": "branches/pr-1",
        "branch_id": "pr-1",
        "parent": "bases/demo/versions/1",
        "state": "READY",
        "connection": {
            "host": "127.0.0.1",
            "port": 56001,
            "user": "postgres",
            "password": "pw",
            "database": "app",
            "socket_dir": "/run/x",
            "dsn": "postgresql://postgres:pw@127.0.0.1:56001/app",
        },
        "labels": {"pr": "1"},
        "create_time": datetime.fromtimestamp(1_700_000_000, UTC)
        .isoformat()
        .replace("+00:00", "Z"),
        "expire_time": None,
        "protected": False,
        "written_bytes": 8192,
        "request_id": "r1",
        "failure": "",
        "owner": "admin",
        "idle_suspend_seconds": 900.0,
        "frozen": True,
    }
    assert "pw" not in repr(branch)


def test_public_names_are_sorted_and_exist() -> None:
    """cowbranchd.client exports a deliberate, sorted __all__."""

    def isort_style(name: str) -> tuple[int, str]:  # constants, classes, functions (ruff RUF022)
        return (0 if name.isupper() else 1 if name[0].isupper() else 2, name)

    assert client_module.__all__ == sorted(client_module.__all__, key=isort_style)
    for name in client_module.__all__:
        assert hasattr(client_module, name), name


def test_update_with_nothing_to_change_is_refused_before_any_call(tmp_path: Path) -> None:
    """update_branch without labels, ttl or protected is InvalidArgument, no daemon needed."""
    with (
        Client(f"unix://{tmp_path}/none.sock") as client,
        pytest.raises(InvalidArgument, match="update_mask"),
    ):
        client.update_branch("x")


# -- unreachable daemon ---------------------------------------------------------


def test_unreachable_socket_says_what_to_do(tmp_path: Path) -> None:
    """Nothing listening at the socket is Unavailable asking whether the service runs."""
    address = f"unix://{tmp_path}/api.sock"
    with Client(address, retry=FAST_FAIL) as client, pytest.raises(Unavailable) as info:
        client.health()
    assert info.value.message.startswith(
        f"daemon not reachable at {address} — is the cowbranchd service running?"
    )


def test_async_unreachable_socket_says_what_to_do(tmp_path: Path) -> None:
    """The async client raises the same Unavailable with the same advice."""
    address = f"unix://{tmp_path}/api.sock"

    async def call() -> None:
        async with AsyncClient(address, retry=FAST_FAIL) as client:
            await client.get_branch("x")

    with pytest.raises(Unavailable, match="is the cowbranchd service running"):
        asyncio.run(call())


def test_close_is_idempotent_and_final(tmp_path: Path) -> None:
    """close() may be called twice; a closed client refuses further calls."""
    client = Client(f"unix://{tmp_path}/api.sock")
    client.close()
    client.close()
    with pytest.raises(CowbranchError, match="closed"):
        client.get_branch("x")


# -- against a real daemon ------------------------------------------------------


def _count_items(branch: Branch) -> int:
    with branch.connect() as conn:
        row = conn.execute("select count(*) from items").fetchone()
    assert row is not None
    return int(row[0])


def test_create_get_list_delete(daemon: DaemonHandle) -> None:
    """A created branch answers queries with the base's data, is listed by label, then deleted."""
    run = uuid.uuid4().hex[:8]
    with Client(daemon.address) as client:
        branch = client.create_branch(f"bases/{daemon.base}", labels={"run": run}, ttl="1h")
        assert branch.state == "READY"
        assert branch.labels == {"run": run}
        assert branch.expire_time is not None
        assert _count_items(branch) == 3
        fetched = client.get_branch(branch.branch_id)
        assert replace(fetched, written_bytes=branch.written_bytes) == branch  # it grows
        assert [b.name for b in client.list_branches({"run": run})] == [branch.name]
        client.delete_branch(branch.name)
        with pytest.raises(NotFound):
            client.get_branch(branch.name)
        assert list(client.list_branches(f"run={run}")) == []


def test_async_create_get_list_delete(daemon: DaemonHandle) -> None:
    """The async client does the same round trip, connecting with psycopg's async API."""
    run = uuid.uuid4().hex[:8]

    async def scenario() -> None:
        async with AsyncClient(daemon.address) as client:
            branch = await client.create_branch(f"bases/{daemon.base}", labels={"run": run})
            async with await branch.connect_async() as conn:
                cur = await conn.execute("select count(*) from items")
                assert await cur.fetchone() == (3,)
            fetched = await client.get_branch(branch.name)
            assert replace(fetched, written_bytes=branch.written_bytes) == branch
            assert [b.name async for b in client.list_branches({"run": run})] == [branch.name]
            await client.delete_branch(branch.name)
            with pytest.raises(NotFound):
                await client.get_branch(branch.name)
            async with client.branch(f"bases/{daemon.base}", labels={"run": run}) as temp:
                assert temp.state == "READY"
            assert [b async for b in client.list_branches({"run": run})] == []

    asyncio.run(scenario())


def test_reset_throws_writes_away_on_the_same_port(daemon: DaemonHandle) -> None:
    """reset_branch brings the branch back to its parent's data, same port and credentials."""
    with Client(daemon.address) as client, client.branch(f"bases/{daemon.base}") as branch:
        with branch.connect() as conn:
            conn.execute("insert into items values (100, 'scratch')")
        assert _count_items(branch) == 4
        reset = client.reset_branch(branch.name)
        assert (reset.port, reset.dsn) == (branch.port, branch.dsn)
        assert _count_items(reset) == 3


def test_branch_context_manager_deletes_even_on_error(daemon: DaemonHandle) -> None:
    """client.branch() deletes its branch when the block raises."""
    run = uuid.uuid4().hex[:8]
    with Client(daemon.address) as client:
        with (
            pytest.raises(ZeroDivisionError),
            client.branch(f"bases/{daemon.base}", labels={"run": run}),
        ):
            _ = 1 / 0
        assert list(client.list_branches({"run": run})) == []


def test_update_labels_ttl_and_protection(daemon: DaemonHandle) -> None:
    """update_branch changes only what it is given; a protected branch needs force to go."""
    with Client(daemon.address) as client:
        branch = client.create_branch(f"bases/{daemon.base}", labels={"a": "1"})
        assert branch.expire_time is None
        updated = client.update_branch(branch.name, labels={"b": "2"}, ttl="2h", protected=True)
        assert (dict(updated.labels), updated.protected) == ({"b": "2"}, True)
        assert updated.expire_time is not None
        assert client.update_branch(branch.name, ttl=0).expire_time is None
        with pytest.raises(FailedPrecondition):
            client.delete_branch(branch.name)
        client.delete_branch(branch.name, force=True)


def test_status_codes_come_back_as_error_classes(daemon: DaemonHandle) -> None:
    """Status codes arrive as their error classes: NotFound, InvalidArgument, AlreadyExists."""
    parent = f"bases/{daemon.base}"
    with Client(daemon.address) as client:
        with pytest.raises(NotFound):
            client.get_branch("no-such-branch")
        with pytest.raises(NotFound):
            client.delete_branch("no-such-branch")
        client.delete_branch("no-such-branch", allow_missing=True)
        with pytest.raises(InvalidArgument):
            client.create_branch(parent, branch_id="Not_Valid")
        with pytest.raises(NotFound):
            client.create_branch("bases/no-such-base")
        branch_id = f"dup-{uuid.uuid4().hex[:8]}"
        with client.branch(parent, branch_id=branch_id), pytest.raises(AlreadyExists):
            client.create_branch(parent, branch_id=branch_id)


def test_same_request_id_returns_the_same_branch(daemon: DaemonHandle) -> None:
    """Creating twice with one request_id, as a retry does, makes exactly one branch."""
    run = uuid.uuid4().hex[:8]
    request_id = str(uuid.uuid4())
    with Client(daemon.address) as client:
        first = client.create_branch(
            f"bases/{daemon.base}", labels={"run": run}, request_id=request_id
        )
        again = client.create_branch(
            f"bases/{daemon.base}", labels={"run": run}, request_id=request_id
        )
        assert again.name == first.name
        assert first.request_id == request_id
        assert [b.name for b in client.list_branches({"run": run})] == [first.name]
        client.delete_branch(first.name)


def test_list_branches_follows_pages(daemon: DaemonHandle) -> None:
    """list_branches fetches every page: three branches with page_size=1."""
    run = uuid.uuid4().hex[:8]
    with Client(daemon.address) as client:
        made = {
            client.create_branch(f"bases/{daemon.base}", labels={"run": run}).name for _ in range(3)
        }
        assert {b.name for b in client.list_branches({"run": run}, page_size=1)} == made
        for name in made:
            client.delete_branch(name)


def test_health_reports_serving(daemon: DaemonHandle) -> None:
    """health() is SERVING for the daemon and for the branch service."""
    with Client(daemon.address) as client:
        assert (client.health(""), client.health()) == ("SERVING", "SERVING")


def test_bases_create_version_list_delete(daemon: DaemonHandle) -> None:
    """A base made by initdb gets version 1, a second version on request, and can be deleted."""
    base_id = f"b-{uuid.uuid4().hex[:8]}"
    with Client(daemon.address) as client:
        base = client.create_base(
            base_id, database="app", init_sql="create table t (id int); insert into t values (1);"
        )
        assert (base.name, base.database, [v.version for v in base.versions]) == (
            f"bases/{base_id}",
            "app",
            [1],
        )
        assert base_id in [b.base_id for b in client.list_bases()]
        version = client.create_base_version(base_id)
        assert (version.name, version.version) == (f"bases/{base_id}/versions/2", 2)
        assert client.get_base(base_id).latest_version == version
        with client.branch(f"bases/{base_id}/versions/1") as branch, branch.connect() as conn:
            assert conn.execute("select id from t").fetchall() == [(1,)]
        client.delete_base(base_id)
        with pytest.raises(NotFound):
            client.get_base(base_id)


def test_retry_across_a_daemon_restart_makes_one_branch(daemon_factory: DaemonFactory) -> None:
    """A create that meets UNAVAILABLE (daemon killed, then restarted) yields one branch."""
    handle = daemon_factory()
    run = uuid.uuid4().hex[:8]
    results: list[Branch | BaseException] = []
    client = Client(handle.address, retry=RetryPolicy(max_elapsed=180, max_backoff=0.5))

    def create() -> None:
        try:
            results.append(client.create_branch(f"bases/{handle.base}", labels={"run": run}))
        except BaseException as exc:
            results.append(exc)

    worker = threading.Thread(target=create)
    worker.start()
    handle.kill()  # the create is in flight, not yet sent, or already done: all must end alike
    handle.start()
    worker.join(timeout=240)
    [branch] = results
    assert isinstance(branch, Branch), branch
    assert [b.name for b in client.list_branches({"run": run})] == [branch.name]
    assert _count_items(branch) == 3
    client.delete_branch(branch.name)
    client.close()


def test_psycopg_connection_kwargs_reach_the_branch(daemon: DaemonHandle) -> None:
    """connection_kwargs() works with psycopg.connect, over TCP and over the Unix socket."""
    with Client(daemon.address) as client, client.branch(f"bases/{daemon.base}") as branch:
        for kwargs in (branch.connection_kwargs(), branch.connection_kwargs(via_socket=True)):
            with psycopg.connect(**kwargs) as conn:
                assert conn.execute("select 1").fetchone() == (1,)
