"""Callers have identities and branches have owners: tenants by token or by
their own socket, the admin on the main socket. One tenant cannot see the
secrets of, delete, reset, update or branch from another's branch; request
ids and quotas are per owner; bases change only by admins; a base can hand
out a non-superuser role; pg_hba admits only the listen addresses."""

from __future__ import annotations

import grp
import os
import pwd
import stat
import subprocess
from collections.abc import Iterator
from pathlib import Path

import grpc
import psycopg
import pytest

from cowbranchd.v1 import bases_pb2, branches_pb2, branches_pb2_grpc, daemon_pb2, daemon_pb2_grpc
from tests.fix_daemon import DaemonFactory, DaemonHandle, code_of

TOKENS = {"alice": "alice-token-0123456789abcdef", "bob": "bob-token-0123456789abcdef"}
SOCKET_GROUP = grp.getgrgid(pwd.getpwnam("postgres").pw_gid).gr_name


def write_token(tokens_dir: Path, tenant: str, token: str, mode: int = 0o600) -> None:
    """As an operator would: a 0600 file written beside, then renamed in."""
    temp = tokens_dir / f".{tenant}.new"
    temp.write_text(token + "\n")
    temp.chmod(mode)
    temp.rename(tokens_dir / tenant)


@pytest.fixture(scope="module")
def tenant_daemon(daemon_factory: DaemonFactory) -> Iterator[DaemonHandle]:
    """A daemon with two token tenants (alice, bob), a socket tenant (carol),
    a quota of two branches per owner, and alice allowed to change bases."""
    d = daemon_factory(start=False)
    tokens_dir = d.workdir / "tokens"
    tokens_dir.mkdir(mode=0o700)
    for tenant, token in TOKENS.items():
        write_token(tokens_dir, tenant, token)
    # A token readable by others is not honoured.
    write_token(tokens_dir, "leaky", "leaky-token-0123456789abcdef", mode=0o644)
    d.extra_config = f"""
[tenants]
tokens_dir = "{tokens_dir}"
socket_dir = "{d.workdir / "tenants"}"
sockets = {{ carol = "{SOCKET_GROUP}" }}
max_branches = 2
base_changes = ["alice"]
"""
    d.start()
    yield d
    d.cleanup()


def as_tenant(token: str) -> tuple[tuple[str, str], ...]:
    return (("authorization", f"Bearer {token}"),)


ALICE, BOB = as_tenant(TOKENS["alice"]), as_tenant(TOKENS["bob"])


def create(
    d: DaemonHandle,
    metadata: tuple[tuple[str, str], ...],
    branch_id: str = "",
    request_id: str = "",
) -> branches_pb2.Branch:
    with d.channel() as ch:
        return d.branches(ch).CreateBranch(
            branches_pb2.CreateBranchRequest(
                parent="bases/demo", branch_id=branch_id, request_id=request_id
            ),
            metadata=metadata,
            timeout=120,
        )


def test_other_owners_branch_is_out_of_reach(tenant_daemon: DaemonHandle) -> None:
    """Bob holds nothing of alice's branch: getting it, deleting, resetting,
    updating, freezing and branching from it are PERMISSION_DENIED, and it
    keeps working (not frozen: it still answers as READY). A listing shows
    it to him without secrets; alice and the admin see them."""
    d = tenant_daemon
    a = create(d, ALICE, branch_id="own-a")
    b = create(d, BOB, branch_id="own-b")
    assert (a.owner, b.owner) == ("alice", "bob")
    with d.channel() as ch:
        stub = d.branches(ch)
        name = "branches/own-a"
        denied = [
            code_of(stub.GetBranch, branches_pb2.GetBranchRequest(name=name), metadata=BOB),
            code_of(
                stub.DeleteBranch,
                branches_pb2.DeleteBranchRequest(name=name, force=True),
                metadata=BOB,
            ),
            code_of(stub.ResetBranch, branches_pb2.ResetBranchRequest(name=name), metadata=BOB),
            code_of(
                stub.UpdateBranch,
                branches_pb2.UpdateBranchRequest(
                    branch=branches_pb2.Branch(name=name, protected=True)
                ),
                metadata=BOB,
            ),
            code_of(
                stub.CreateBranch,
                branches_pb2.CreateBranchRequest(parent=name, branch_id="bob-child"),
                metadata=BOB,
            ),
            code_of(stub.FreezeBranch, branches_pb2.FreezeBranchRequest(name=name), metadata=BOB),
        ]
        assert [code for code, _ in denied] == [grpc.StatusCode.PERMISSION_DENIED] * 6
        assert "belongs to another owner" in denied[0][1]
        listed = {
            br.name: br
            for br in stub.ListBranches(branches_pb2.ListBranchesRequest(), metadata=BOB).branches
        }
        mine = stub.GetBranch(branches_pb2.GetBranchRequest(name=name), metadata=ALICE)
        admin_view = stub.GetBranch(branches_pb2.GetBranchRequest(name=name))
    others = listed["branches/own-a"]
    assert others.owner == "alice"
    assert others.connection.password == ""
    assert a.connection.password not in others.connection.dsn
    assert listed["branches/own-b"].connection.password == b.connection.password
    assert mine.connection.password == admin_view.connection.password == a.connection.password
    with psycopg.connect(a.connection.dsn) as conn:
        assert conn.execute("SELECT count(*) FROM items").fetchone() == (3,)
    assert (mine.state, mine.frozen) == (branches_pb2.Branch.READY, False)
    for branch, token in (("own-a", ALICE), ("own-b", BOB)):
        with d.channel() as ch:
            d.branches(ch).DeleteBranch(
                branches_pb2.DeleteBranchRequest(name=f"branches/{branch}"), metadata=token
            )


def test_request_id_is_scoped_to_its_owner(tenant_daemon: DaemonHandle) -> None:
    """The same request_id from alice and from bob makes two branches; alice
    repeating hers gets her branch back."""
    d = tenant_daemon
    first = create(d, ALICE, request_id="job-42")
    other = create(d, BOB, request_id="job-42")
    again = create(d, ALICE, request_id="job-42")
    assert first.name != other.name
    assert again.name == first.name
    assert (first.owner, other.owner) == ("alice", "bob")
    for branch, token in ((first, ALICE), (other, BOB)):
        with d.channel() as ch:
            d.branches(ch).DeleteBranch(
                branches_pb2.DeleteBranchRequest(name=branch.name),
                metadata=token,
            )


def test_quota_stops_one_owner_only(tenant_daemon: DaemonHandle) -> None:
    """At tenants.max_branches, alice's next create is RESOURCE_EXHAUSTED
    naming the quota and her; bob still creates; the admin has no quota."""
    d = tenant_daemon
    made = [create(d, ALICE, branch_id=f"quota-a{n}") for n in range(2)]
    with d.channel() as ch:
        code, details = code_of(
            d.branches(ch).CreateBranch,
            branches_pb2.CreateBranchRequest(parent="bases/demo", branch_id="quota-a2"),
            metadata=ALICE,
        )
    assert code == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "tenants.max_branches" in details and "'alice'" in details
    bobs = create(d, BOB, branch_id="quota-b0")
    admins = [create(d, (), branch_id=f"quota-admin{n}") for n in range(3)]
    with d.channel() as ch:
        for branch in [*made, bobs, *admins]:
            d.branches(ch).DeleteBranch(branches_pb2.DeleteBranchRequest(name=branch.name))
    assert create(d, ALICE, branch_id="quota-a3").owner == "alice"
    with d.channel() as ch:
        d.branches(ch).DeleteBranch(branches_pb2.DeleteBranchRequest(name="branches/quota-a3"))


def test_tokens_decide_who_calls(tenant_daemon: DaemonHandle) -> None:
    """An unknown token, and a token in a file others may read, are
    UNAUTHENTICATED; a token file added while the daemon runs is honoured."""
    d = tenant_daemon

    def caller(metadata: tuple[tuple[str, str], ...]) -> str:
        with d.channel() as ch:
            status = daemon_pb2_grpc.DaemonServiceStub(ch).GetStatus(
                daemon_pb2.GetStatusRequest(), metadata=metadata
            )
        return status.caller

    assert caller(ALICE) == "alice"
    assert caller(()) == "admin"
    with d.channel() as ch:
        status = daemon_pb2_grpc.DaemonServiceStub(ch).GetStatus
        for token in ("made-up-token-0123456789", "leaky-token-0123456789abcdef"):
            code, _ = code_of(status, daemon_pb2.GetStatusRequest(), metadata=as_tenant(token))
            assert code == grpc.StatusCode.UNAUTHENTICATED
    write_token(d.workdir / "tokens", "dave", "dave-token-0123456789abcdef")
    assert caller(as_tenant("dave-token-0123456789abcdef")) == "dave"


def test_tenant_socket_is_its_tenant_and_its_groups_only(tenant_daemon: DaemonHandle) -> None:
    """On its own socket carol needs no token; the socket's directory is
    root:<group> 0750, and a user outside that group cannot connect."""
    d = tenant_daemon
    sock = d.workdir / "tenants" / "carol" / "api.sock"
    directory = sock.parent
    st = directory.stat()
    assert (st.st_uid, stat.S_IMODE(st.st_mode)) == (0, 0o750)
    assert grp.getgrgid(st.st_gid).gr_name == SOCKET_GROUP
    with grpc.insecure_channel(f"unix://{sock}") as ch:
        status = daemon_pb2_grpc.DaemonServiceStub(ch).GetStatus(
            daemon_pb2.GetStatusRequest(), timeout=10
        )
        created = branches_pb2_grpc.BranchServiceStub(ch).CreateBranch(
            branches_pb2.CreateBranchRequest(parent="bases/demo", branch_id="carols"), timeout=120
        )
    assert status.caller == "carol"
    assert created.owner == "carol"
    # Reachable path for an unprivileged user: every parent must be searchable.
    nobody = pwd.getpwnam("nobody")
    assert SOCKET_GROUP not in [g.gr_name for g in grp.getgrall() if "nobody" in g.gr_mem]
    probe = (
        "import socket, sys\n"
        "s = socket.socket(socket.AF_UNIX)\n"
        "try:\n    s.connect(sys.argv[1])\nexcept PermissionError:\n    sys.exit(13)\n"
    )
    result = subprocess.run(
        ["/usr/bin/python3", "-c", probe, str(sock)],
        user=nobody.pw_uid,
        group=nobody.pw_gid,
        extra_groups=[],
        capture_output=True,
        text=True,
        check=False,
    )
    assert result.returncode == 13, result.stderr
    with d.channel() as ch:
        d.branches(ch).DeleteBranch(branches_pb2.DeleteBranchRequest(name="branches/carols"))


def test_base_changes_are_for_admins_and_named_tenants(tenant_daemon: DaemonHandle) -> None:
    """Bob may not create, version or delete a base; alice, named in
    tenants.base_changes, may version one; the admin may do all."""
    d = tenant_daemon
    with d.channel() as ch:
        stub = d.bases(ch)
        codes = [
            code_of(stub.CreateBase, bases_pb2.CreateBaseRequest(base_id="bobs"), metadata=BOB),
            code_of(
                stub.CreateBaseVersion,
                bases_pb2.CreateBaseVersionRequest(parent="bases/demo"),
                metadata=BOB,
            ),
            code_of(stub.DeleteBase, bases_pb2.DeleteBaseRequest(name="bases/demo"), metadata=BOB),
        ]
        version = stub.CreateBaseVersion(
            bases_pb2.CreateBaseVersionRequest(parent="bases/demo"), metadata=ALICE, timeout=120
        )
        # Even a tenant who may change bases does not pick the server whose
        # pg_basebackup writes on this host: that is the admins' call.
        from_server = code_of(
            stub.ImportBase,
            bases_pb2.ImportBaseRequest(base_id="alices", from_server="host=192.0.2.1"),
            metadata=ALICE,
        )
    assert [code for code, _ in codes] == [grpc.StatusCode.PERMISSION_DENIED] * 3
    assert version.version >= 2
    assert from_server[0] == grpc.StatusCode.PERMISSION_DENIED
    assert "from_server is for admins" in from_server[1]


ROLES_SQL = """
CREATE ROLE app LOGIN;
CREATE ROLE reader LOGIN;
CREATE TABLE secrets (v text);
INSERT INTO secrets VALUES ('s');
GRANT SELECT ON secrets TO app;
"""


@pytest.mark.btrfs
def test_base_hands_out_its_branch_role(daemon_factory: DaemonFactory) -> None:
    """A base with branch_role=app hands out app (no superuser) with the
    branch's own password; a request may ask for an allowed role, not for
    another (INVALID_ARGUMENT naming the allowed ones); an allowed role
    missing from the base is FAILED_PRECONDITION naming it."""
    d = daemon_factory()
    with d.channel() as ch:
        d.bases(ch).CreateBase(
            bases_pb2.CreateBaseRequest(
                base_id="roles",
                initdb=bases_pb2.InitdbSource(database="shop", init_sql=ROLES_SQL),
                branch_role="app",
                roles=["reader", "ghost"],
            ),
            timeout=120,
        )
        stub = d.branches(ch)
        app = stub.CreateBranch(
            branches_pb2.CreateBranchRequest(parent="bases/roles", branch_id="as-app"), timeout=120
        )
        reader = stub.CreateBranch(
            branches_pb2.CreateBranchRequest(parent="bases/roles", branch_id="rd", role="reader"),
            timeout=120,
        )
        refused = code_of(
            stub.CreateBranch, branches_pb2.CreateBranchRequest(parent="bases/roles", role="x")
        )
        missing = code_of(
            stub.CreateBranch, branches_pb2.CreateBranchRequest(parent="bases/roles", role="ghost")
        )
        child = stub.CreateBranch(
            branches_pb2.CreateBranchRequest(parent="branches/as-app", branch_id="app-child"),
            timeout=120,
        )
    assert refused[0] == grpc.StatusCode.INVALID_ARGUMENT
    assert "app, ghost, reader" in refused[1]
    assert missing[0] == grpc.StatusCode.FAILED_PRECONDITION
    assert "'ghost'" in missing[1]
    assert (app.connection.user, reader.connection.user, child.connection.user) == (
        "app",
        "reader",
        "app",
    )
    with psycopg.connect(app.connection.dsn) as conn:
        row = conn.execute(
            "SELECT current_user, rolsuper FROM pg_roles WHERE rolname = current_user"
        ).fetchone()
        assert row == ("app", False)
        assert conn.execute("SELECT v FROM secrets").fetchone() == ("s",)
    with (
        psycopg.connect(reader.connection.dsn) as conn,
        pytest.raises(psycopg.errors.InsufficientPrivilege),
    ):
        conn.execute("SELECT v FROM secrets")
    d.cleanup()


@pytest.mark.btrfs
def test_pg_hba_admits_only_the_listen_networks(daemon_factory: DaemonFactory) -> None:
    """Listening on 127.0.0.1, a clone's pg_hba has TCP rules for
    127.0.0.1/32 alone, whatever its parent's said."""
    d = daemon_factory()
    with d.channel() as ch:
        made = d.branches(ch).CreateBranch(
            branches_pb2.CreateBranchRequest(parent="bases/demo", branch_id="hba"), timeout=120
        )
    pgdata = next(Path(d.pool_root).glob("branches/hba*/pgdata"))
    hosts = [
        line.split()
        for line in (pgdata / "pg_hba.conf").read_text().splitlines()
        if line.startswith("host")
    ]
    assert hosts and {fields[3] for fields in hosts} == {"127.0.0.1/32"}
    assert made.connection.host == "127.0.0.1"
    assert os.path.exists(pgdata / "PG_VERSION")
    d.cleanup()
