"""Every status code of the DESIGN.md table, produced by a real request to a
real daemon; bad input is rejected with a message naming the field, and the
daemon keeps serving with nothing lost."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import psutil
import pytest
from google.protobuf import duration_pb2, field_mask_pb2

from cowbranchd.v1 import bases_pb2, branches_pb2
from tests.fix_daemon import DaemonFactory, DaemonHandle, code_of


@pytest.fixture
def channel(daemon: DaemonHandle) -> Iterator[grpc.Channel]:
    with daemon.channel() as ch:
        yield ch



def branch_names(d: DaemonHandle, ch: grpc.Channel) -> set[str]:
    listed = d.branches(ch).ListBranches(branches_pb2.ListBranchesRequest(page_size=1000))
    return {b.name for b in listed.branches}


BAD_CREATES = [
    ("branch_id", {"branch_id": "Upper"}),
    ("branch_id", {"branch_id": "-dash"}),
    ("branch_id", {"branch_id": "a" * 64}),
    ("branch_id", {"branch_id": "../etc"}),
    ("branch_id", {"branch_id": "x/../../y"}),
    ("parent", {"parent": ""}),
    ("parent", {"parent": "bases/../../etc"}),
    ("parent", {"parent": "bases/demo/versions/zero"}),
    ("parent", {"parent": "bases/demo/versions/-1"}),
    ("parent", {"parent": "snapshots/x"}),
    ("request_id", {"request_id": "has space"}),
    ("request_id", {"request_id": "r" * 129}),
    ("labels", {"labels": {"Bad Key": "v"}}),
    ("labels", {"labels": {"k": "v" * 64}}),
    ("labels", {"labels": {f"k{i}": "v" for i in range(33)}}),
    ("labels", {"labels": {"k": "x" * 100_000}}),
    ("ttl", {"ttl": duration_pb2.Duration(seconds=-5)}),
    ("ttl", {"ttl": duration_pb2.Duration(seconds=400 * 86400)}),
    ("postgres_settings", {"postgres_settings": {"port": "1"}}),
    ("postgres_settings", {"postgres_settings": {"bad name": "1"}}),
    ("postgres_settings", {"postgres_settings": {"work_mem": "1\nport=2"}}),
]


@pytest.mark.parametrize(
    ("field", "fields"), BAD_CREATES, ids=[f"{f}-{i}" for i, (f, _) in enumerate(BAD_CREATES)]
)
def test_bad_create_input_is_invalid_argument(
    daemon: DaemonHandle, channel: grpc.Channel, field: str, fields: dict[str, object]
) -> None:
    """Each malformed CreateBranch field is INVALID_ARGUMENT naming that field,
    and creates nothing."""
    before = branch_names(daemon, channel)
    request = {"parent": "bases/demo", **fields}
    code, details = code_of(
        daemon.branches(channel).CreateBranch,
        branches_pb2.CreateBranchRequest(**request),  # type: ignore[arg-type]
    )
    assert code == grpc.StatusCode.INVALID_ARGUMENT
    assert details.startswith(field)
    assert branch_names(daemon, channel) == before


def test_other_bad_input_is_invalid_argument(daemon: DaemonHandle, channel: grpc.Channel) -> None:
    """Bad names, selectors, page tokens, paths and masks are INVALID_ARGUMENT naming the field."""
    br, ba = daemon.branches(channel), daemon.bases(channel)
    cases = [
        ("name", br.GetBranch, branches_pb2.GetBranchRequest(name="branches/UP")),
        (
            "label_selector",
            br.ListBranches,
            branches_pb2.ListBranchesRequest(label_selector="a=b,,"),
        ),
        (
            "label_selector",
            br.ListBranches,
            branches_pb2.ListBranchesRequest(label_selector="a=(b)"),
        ),
        ("page_token", br.ListBranches, branches_pb2.ListBranchesRequest(page_token="garbage!")),
        ("page_size", br.ListBranches, branches_pb2.ListBranchesRequest(page_size=-1)),
        (
            "data_directory",
            ba.CreateBase,
            bases_pb2.CreateBaseRequest(base_id="x", data_directory="relative/path"),
        ),
        (
            "data_directory",
            ba.CreateBase,
            bases_pb2.CreateBaseRequest(base_id="x", data_directory="/var/lib/../../etc"),
        ),
        ("base_id", ba.CreateBase, bases_pb2.CreateBaseRequest(base_id="Bad_Id")),
        (
            "update_mask",
            br.UpdateBranch,
            branches_pb2.UpdateBranchRequest(
                branch=branches_pb2.Branch(name="branches/x"),
                update_mask=field_mask_pb2.FieldMask(paths=["state"]),
            ),
        ),
    ]
    for field, call, request in cases:
        code, details = code_of(call, request)
        assert (code, details.split(":")[0]) == (grpc.StatusCode.INVALID_ARGUMENT, field), details
    # Still serving, nothing lost.
    assert daemon.health() == "SERVING"


def test_oversized_request_is_rejected(daemon: DaemonHandle, channel: grpc.Channel) -> None:
    """A request over the message size limit is refused without harming the daemon."""
    code, _ = code_of(
        daemon.branches(channel).CreateBranch,
        branches_pb2.CreateBranchRequest(parent="bases/demo", labels={"k": "x" * (5 << 20)}),
    )
    assert code == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert daemon.health() == "SERVING"


def test_not_found_and_allow_missing(daemon: DaemonHandle, channel: grpc.Channel) -> None:
    """Unknown branches, bases and versions are NOT_FOUND; allow_missing deletes succeed."""
    br, ba = daemon.branches(channel), daemon.bases(channel)
    assert code_of(br.GetBranch, branches_pb2.GetBranchRequest(name="branches/nope"))[0] == (
        grpc.StatusCode.NOT_FOUND
    )
    assert code_of(br.DeleteBranch, branches_pb2.DeleteBranchRequest(name="branches/nope"))[0] == (
        grpc.StatusCode.NOT_FOUND
    )
    assert (
        code_of(
            br.DeleteBranch,
            branches_pb2.DeleteBranchRequest(name="branches/nope", allow_missing=True),
        )[0]
        == grpc.StatusCode.OK
    )
    assert code_of(ba.GetBase, bases_pb2.GetBaseRequest(name="bases/nope"))[0] == (
        grpc.StatusCode.NOT_FOUND
    )
    assert (
        code_of(br.CreateBranch, branches_pb2.CreateBranchRequest(parent="bases/demo/versions/99"))[
            0
        ]
        == grpc.StatusCode.NOT_FOUND
    )
    assert (
        code_of(br.CreateBranch, branches_pb2.CreateBranchRequest(parent="branches/nope"))[0]
        == grpc.StatusCode.NOT_FOUND
    )


@pytest.fixture
def shared_tmp() -> Iterator[Path]:
    """A temporary directory the postgres OS user can reach."""
    path = Path(tempfile.mkdtemp(prefix="cbt-", dir="/tmp"))
    os.chmod(path, 0o755)
    yield path
    shutil.rmtree(path, ignore_errors=True)


def test_dirty_base_is_failed_precondition(
    daemon: DaemonHandle, channel: grpc.Channel, shared_tmp: Path
) -> None:
    """A data directory that was not shut down cleanly is refused as a base,
    and the source directory is left untouched."""
    tmp_path = shared_tmp
    pgdata = tmp_path / "dirty"
    pgdata.mkdir(mode=0o700)
    shutil.chown(pgdata, "postgres", "postgres")
    bindir = "/usr/lib/postgresql/15/bin"
    subprocess.run(
        ["runuser", "-u", "postgres", "--", f"{bindir}/initdb", "-D", str(pgdata), "-A", "trust"],
        check=True,
        capture_output=True,
    )
    proc = subprocess.Popen(
        [
            "runuser",
            "-u",
            "postgres",
            "--",
            f"{bindir}/postgres",
            "-D",
            str(pgdata),
            "-c",
            "listen_addresses=",
            "-c",
            f"unix_socket_directories={pgdata}",
            "-c",
            "port=5999",
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        pid_file = pgdata / "postmaster.pid"
        for _ in range(300):
            if pid_file.exists() and "ready" in pid_file.read_text():
                break
            time.sleep(0.05)
        postmaster = int(pid_file.read_text().split()[0])
        os.kill(postmaster, 9)  # crash: the cluster state stays "in production"
        psutil.Process(postmaster).wait(10) if psutil.pid_exists(postmaster) else None
    finally:
        proc.wait(10)
    snapshot = sorted(p.name for p in pgdata.iterdir())
    code, details = code_of(
        daemon.bases(channel).CreateBase,
        bases_pb2.CreateBaseRequest(base_id="dirty", data_directory=str(pgdata)),
    )
    assert code == grpc.StatusCode.FAILED_PRECONDITION
    assert "in production" in details
    assert sorted(p.name for p in pgdata.iterdir()) == snapshot
    shutil.rmtree(pgdata)


def test_unavailable_while_starting(daemon_factory: DaemonFactory) -> None:
    """Until start-up (reconcile and the demo base) is done, RPCs are UNAVAILABLE
    and health is not SERVING."""
    d = daemon_factory(start=False)
    d.start(wait=False)
    with d.channel() as ch:
        grpc.channel_ready_future(ch).result(timeout=60)
        code, details = code_of(d.branches(ch).ListBranches, branches_pb2.ListBranchesRequest())
        assert code == grpc.StatusCode.UNAVAILABLE
        assert "starting" in details
        assert d.health() == "NOT_SERVING"
    d.wait_serving()
    d.stop()


def test_resource_exhausted_ports_and_squatted_port(daemon_factory: DaemonFactory) -> None:
    """A port someone else holds is skipped; with every port in use, create is
    RESOURCE_EXHAUSTED, and deleting frees a port again."""
    d = daemon_factory(start=False)
    d.ports = (d.ports[0], d.ports[0] + 2)
    squatter = socket.socket()
    squatter.bind(("127.0.0.1", d.ports[0]))
    squatter.listen()
    try:
        d.start()
        with d.channel() as ch:
            stub = d.branches(ch)
            one = stub.CreateBranch(
                branches_pb2.CreateBranchRequest(parent="bases/demo"), timeout=120
            )
            two = stub.CreateBranch(
                branches_pb2.CreateBranchRequest(parent="bases/demo"), timeout=120
            )
            assert {one.connection.port, two.connection.port} == {d.ports[0] + 1, d.ports[0] + 2}
            code, details = code_of(
                stub.CreateBranch, branches_pb2.CreateBranchRequest(parent="bases/demo")
            )
            assert code == grpc.StatusCode.RESOURCE_EXHAUSTED
            assert "port" in details
            stub.DeleteBranch(branches_pb2.DeleteBranchRequest(name=one.name), timeout=120)
            three = stub.CreateBranch(
                branches_pb2.CreateBranchRequest(parent="bases/demo"), timeout=120
            )
            assert three.connection.port == one.connection.port
    finally:
        squatter.close()
        d.stop()


def test_resource_exhausted_branch_slots(daemon_factory: DaemonFactory) -> None:
    """With daemon.max_branches reached, create is RESOURCE_EXHAUSTED naming the limit."""
    d = daemon_factory(start=False)
    d.sections = {"daemon": "max_branches = 1"}
    d.start()
    with d.channel() as ch:
        stub = d.branches(ch)
        stub.CreateBranch(branches_pb2.CreateBranchRequest(parent="bases/demo"), timeout=120)
        code, details = code_of(
            stub.CreateBranch, branches_pb2.CreateBranchRequest(parent="bases/demo")
        )
    assert code == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "max_branches" in details
    d.stop()


def test_resource_exhausted_disk(daemon_factory: DaemonFactory) -> None:
    """Below the pool's free-space reserve, create is RESOURCE_EXHAUSTED and says so."""
    d = daemon_factory(start=False)
    d.sections = {"storage": "min_free_bytes = '64T'"}
    d.start()
    with d.channel() as ch:
        code, details = code_of(
            d.branches(ch).CreateBranch, branches_pb2.CreateBranchRequest(parent="bases/demo")
        )
    assert code == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "min_free_bytes" in details
    d.stop()


def test_unreachable_pool_is_failed_precondition(
    daemon: DaemonHandle, channel: grpc.Channel
) -> None:
    """A pool the postgres OS user cannot reach fails base creation with a message
    naming the directory, not a bare permission error from initdb."""
    bases_dir = Path(daemon.pool_root) / "bases"
    mode = bases_dir.stat().st_mode
    os.chmod(bases_dir, 0o700)
    try:
        code, details = code_of(
            daemon.bases(channel).CreateBase, bases_pb2.CreateBaseRequest(base_id="hidden")
        )
    finally:
        os.chmod(bases_dir, mode)
    assert code == grpc.StatusCode.FAILED_PRECONDITION
    assert f"{bases_dir} is mode 0700" in details
    assert "hidden" not in {p.name for p in bases_dir.iterdir()}
