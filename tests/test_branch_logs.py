"""A branch's postgres log over gRPC: `cowbranchctl logs -f` shows a line the
branch writes and ends cleanly on Ctrl-C; only the owner or an admin may read
it; the daemon keeps it to a size by rotation, never follows a link planted
beside it, and removes it with the branch. `cowbranchctl psql` runs psql on
the branch with the password in its environment, not its argv."""

from __future__ import annotations

import os
import queue
import signal
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import grpc
import psycopg
import pytest

from cowbranchd.client import Client
from cowbranchd.errors import PermissionDenied
from cowbranchd.v1 import logs_pb2, logs_pb2_grpc
from tests.fix_daemon import DaemonFactory, DaemonHandle, code_of

LOG_MAX = 64 * 1024
LOG_FILES = 2
ALICE_TOKEN = "alice-token-0123456789abcdef"
BOB_TOKEN = "bob-token-0123456789abcdef"
WAIT_S = 20.0  # bound on every wait below; none asserts how fast anything was


@pytest.fixture(scope="module")
def log_daemon(daemon_factory: DaemonFactory) -> Iterator[DaemonHandle]:
    """A daemon with two tenants (alice, bob) and small logs: 64 KiB, two rotated files."""
    d = daemon_factory(start=False)
    tokens = d.workdir / "tokens"
    tokens.mkdir(mode=0o700)
    for tenant, token in (("alice", ALICE_TOKEN), ("bob", BOB_TOKEN)):
        (tokens / tenant).write_text(token)
        (tokens / tenant).chmod(0o600)
    d.sections = {"postgres": f'log_max_bytes = "64K"\nlog_files = {LOG_FILES}'}
    d.extra_config = f'\n[tenants]\ntokens_dir = "{tokens}"\n'
    d.start()
    yield d
    d.cleanup()


def log_files(d: DaemonHandle, branch_id: str) -> list[Path]:
    return sorted((d.workdir / "state" / "logs").glob(f"{branch_id}.log*"))


def ctl(d: DaemonHandle, *argv: str, token: str = "") -> list[str]:
    """The argv of cowbranchctl as a separate process, as a user would run it."""
    auth = ["--token", token] if token else []
    return [sys.executable, "-m", "cowbranchd.ctl", "--address", d.address, *auth, *argv]


def raise_log(dsn: str, text: str, times: int = 1) -> None:
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute(
            f"DO $$ BEGIN FOR i IN 1..{times} LOOP RAISE LOG '%', '{text}'; END LOOP; END $$"
        )


def read_lines(stream: object, into: queue.Queue[str]) -> None:
    for line in stream:  # type: ignore[attr-defined]
        into.put(line.decode(errors="replace"))


def wait_for(lines: queue.Queue[str], needle: str) -> bool:
    deadline = time.monotonic() + WAIT_S
    while time.monotonic() < deadline:
        try:
            if needle in lines.get(timeout=0.1):
                return True
        except queue.Empty:
            continue
    return False


def test_follow_shows_a_raise_log_line_and_ends_cleanly_on_ctrl_c(
    log_daemon: DaemonHandle,
) -> None:
    """`logs -f` first prints what the log holds, then a line the branch
    writes afterwards (RAISE LOG in a DO block); Ctrl-C ends it with exit 0."""
    d = log_daemon
    marker = f"follow-{uuid.uuid4().hex}"
    with Client(d.address, token=ALICE_TOKEN) as client:
        branch = client.create_branch("bases/demo", branch_id=f"lf-{uuid.uuid4().hex[:8]}")
        with subprocess.Popen(
            ctl(d, "logs", branch.branch_id, "-f", token=ALICE_TOKEN),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
        ) as proc:
            try:
                lines: queue.Queue[str] = queue.Queue()
                reader = threading.Thread(target=read_lines, args=(proc.stdout, lines))
                reader.start()
                # The start-up lines arrive first: the stream is open and following.
                assert wait_for(lines, "ready to accept connections")
                raise_log(branch.dsn, marker)
                assert wait_for(lines, marker)
                proc.send_signal(signal.SIGINT)
                assert proc.wait(timeout=WAIT_S) == 0
                reader.join(timeout=WAIT_S)
                assert proc.stderr is not None and proc.stderr.read() == b""
            finally:
                if proc.poll() is None:
                    proc.kill()
        client.delete_branch(branch.name)


def test_another_owner_may_not_read_the_log(log_daemon: DaemonHandle) -> None:
    """Bob's StreamBranchLog of alice's branch is PERMISSION_DENIED (also
    through the client and cowbranchctl); alice and the admin read it."""
    d = log_daemon
    with Client(d.address, token=ALICE_TOKEN) as alice:
        branch = alice.create_branch("bases/demo", branch_id=f"lo-{uuid.uuid4().hex[:8]}")
        secret = f"alice-only-{uuid.uuid4().hex}"
        raise_log(branch.dsn, secret)
        assert secret in b"".join(alice.stream_branch_log(branch.name)).decode()
    request = logs_pb2.StreamBranchLogRequest(name=branch.name)
    bob = (("authorization", f"Bearer {BOB_TOKEN}"),)
    with d.channel() as ch:
        stub = logs_pb2_grpc.LogServiceStub(ch)
        code, details = code_of(
            lambda r, **kw: list(stub.StreamBranchLog(r, **kw)), request, metadata=bob
        )
        assert code == grpc.StatusCode.PERMISSION_DENIED
        assert "belongs to another owner" in details
    with Client(d.address, token=BOB_TOKEN) as client, pytest.raises(PermissionDenied):
        list(client.stream_branch_log(branch.name, follow=True))
    denied = subprocess.run(
        ctl(d, "logs", branch.branch_id, token=BOB_TOKEN), capture_output=True, check=False
    )
    assert (denied.returncode, secret.encode() in denied.stdout) == (1, False)
    with Client(d.address) as admin:
        assert secret in b"".join(admin.stream_branch_log(branch.name)).decode()
        admin.delete_branch(branch.name)


def test_rotation_keeps_the_log_bounded_and_delete_removes_it(log_daemon: DaemonHandle) -> None:
    """A branch writing far more than log_max_bytes keeps at most log_files
    rotated files besides the live one, each near the limit; the newest
    lines are still there (`-n` gives exactly the last ones); deleting the
    branch removes every file of its log."""
    d = log_daemon
    burst = 200  # lines of ~100 bytes: well under one log_max_bytes per burst
    with Client(d.address) as client:
        branch = client.create_branch("bases/demo", branch_id=f"lr-{uuid.uuid4().hex[:8]}")
        for n in range(20):  # ~400 KiB in all, six times what is kept
            raise_log(branch.dsn, f"burst-{n:02d}-" + "x" * 60, times=burst)
            # Let the reaper (every 200 ms here) see each burst, bounded.
            deadline = time.monotonic() + WAIT_S
            while os.stat(log_files(d, branch.branch_id)[0]).st_size > LOG_MAX:
                assert time.monotonic() < deadline, "the log was never rotated"
                time.sleep(0.05)
        files = log_files(d, branch.branch_id)
        assert [f.name for f in files] == [
            f"{branch.branch_id}.log",
            f"{branch.branch_id}.log.1",
            f"{branch.branch_id}.log.2",
        ]
        total = sum(f.stat().st_size for f in files)
        # Each rotated file is at most the limit plus one burst (~250 bytes a line).
        assert total <= (LOG_FILES + 1) * LOG_MAX + LOG_FILES * burst * 250
        assert all(oct(f.stat().st_mode & 0o777) == "0o600" for f in files)
        kept = b"".join(client.stream_branch_log(branch.name)).decode()
        assert "burst-19-" in kept and "burst-00-" not in kept
        last = b"".join(client.stream_branch_log(branch.name, tail_lines=4)).decode()
        assert last.count("\n") == 4 and "burst-19-" in last
        assert b"".join(client.stream_branch_log(branch.name, tail_lines=0)) == b""
        client.delete_branch(branch.name)
    assert log_files(d, branch.branch_id) == []


def test_a_link_planted_beside_the_log_is_not_followed(log_daemon: DaemonHandle) -> None:
    """A symbolic link where a rotated log would be (pointing at a root-only
    file) makes the read fail; its target's content never reaches the caller."""
    d = log_daemon
    canary = d.workdir / "canary"
    canary.write_text("root-only-canary\n")
    canary.chmod(0o600)
    with Client(d.address) as client:
        branch = client.create_branch("bases/demo", branch_id=f"ll-{uuid.uuid4().hex[:8]}")
        link = d.workdir / "state" / "logs" / f"{branch.branch_id}.log.1"
        link.symlink_to(canary)
        with d.channel() as ch:
            stub = logs_pb2_grpc.LogServiceStub(ch)
            request = logs_pb2.StreamBranchLogRequest(name=branch.name)
            code, details = code_of(lambda r, **kw: list(stub.StreamBranchLog(r, **kw)), request)
        assert code == grpc.StatusCode.FAILED_PRECONDITION
        assert "symbolic link" in details and "root-only-canary" not in details
        client.delete_branch(branch.name)
    assert not link.is_symlink()
    assert canary.read_text() == "root-only-canary\n"


def test_psql_runs_on_the_branch_with_the_password_out_of_argv(log_daemon: DaemonHandle) -> None:
    """`cowbranchctl psql NAME -c ...` reaches the branch; the password is in
    psql's environment (PGPASSWORD), not in its command line."""
    d = log_daemon
    with Client(d.address) as client:
        branch = client.create_branch("bases/demo", branch_id=f"lp-{uuid.uuid4().hex[:8]}")
        done = subprocess.run(
            ctl(
                d,
                "psql",
                branch.branch_id,
                "-At",
                "-c",
                "select count(*) from items",
                "-c",
                r"\! tr '\0' ' ' < /proc/$PPID/cmdline; echo; echo pw=${PGPASSWORD:+set}",
            ),
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
        assert done.returncode == 0, done.stderr
        lines = done.stdout.splitlines()
        # Debian's psql is a wrapper that execs the real one with the same arguments.
        (cmdline,) = [line for line in lines if "--host" in line]
        assert "3" in lines and "pw=set" in lines
        assert cmdline.split()[1:5] == ["--host", branch.host, "--port", str(branch.port)]
        assert branch.password not in cmdline
        client.delete_branch(branch.name)
