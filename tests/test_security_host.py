"""What a caller or a local user can get out of the root daemon: imports
read with the import user's rights, no password anywhere a local user can
read, init scripts without root's groups.

The daemon under test imports only from /tmp (fixture config
`daemon.import_roots = ["/tmp"]`) and reads imports as the `postgres` user.
"""

from __future__ import annotations

import os
import pwd
import shutil
import subprocess
import tempfile
from pathlib import Path

import grpc
import pytest

from cowbranchd.v1 import bases_pb2, branches_pb2
from tests.fix_daemon import DaemonFactory, DaemonHandle, code_of
from tests.fix_postgres import ImportSource

pytestmark = pytest.mark.btrfs




@pytest.fixture
def source(import_source: ImportSource) -> Path:
    """A clean data directory under /tmp (an import root), owned by postgres."""
    return import_source()


def pool_entries(d: DaemonHandle) -> list[str]:
    pool = Path(d.pool_root)
    return sorted(
        f"{sub}/{p.name}"
        for sub in ("bases", ".staging")
        if (pool / sub).is_dir()
        for p in (pool / sub).iterdir()
    )


def test_import_with_a_link_to_a_root_only_file_is_refused(
    daemon: DaemonHandle, source: Path
) -> None:
    """A link inside the source (other than pg_wal and pg_tblspc/*) is refused,
    naming it; nothing is copied and the root-only target is never read."""
    secret = source.parent / "root-only"
    secret.write_text("root's secret\n")
    os.chmod(secret, 0o600)
    (source / "global" / "innocent").symlink_to(secret)
    before = pool_entries(daemon)
    with daemon.channel() as ch:
        code, details = code_of(
            daemon.bases(ch).CreateBase,
            bases_pb2.CreateBaseRequest(base_id="linked", data_directory=str(source)),
        )
    assert code == grpc.StatusCode.FAILED_PRECONDITION, details
    assert "global/innocent: is a symbolic link" in details
    assert pool_entries(daemon) == before


def test_import_of_a_directory_the_import_user_cannot_read_is_refused(
    daemon: DaemonHandle, source: Path
) -> None:
    """A root-only data directory cannot be imported by a caller who is not
    root: the daemon reads it as the import user and gets no further."""
    shutil.copytree(source, source.parent / "root-copy", symlinks=True)
    root_only = source.parent / "root-copy"
    for path in [root_only, *root_only.rglob("*")]:
        os.lchown(path, 0, 0)
    os.chmod(root_only, 0o700)
    before = pool_entries(daemon)
    with daemon.channel() as ch:
        code, details = code_of(
            daemon.bases(ch).CreateBase,
            bases_pb2.CreateBaseRequest(base_id="stolen", data_directory=str(root_only)),
        )
    assert code == grpc.StatusCode.PERMISSION_DENIED, details
    assert "cannot be read by the import user 'postgres'" in details
    assert pool_entries(daemon) == before


@pytest.mark.parametrize(
    ("path", "code", "problem"),
    [
        ("/etc", grpc.StatusCode.PERMISSION_DENIED, "outside daemon.import_roots"),
        ("/tmp/../etc", grpc.StatusCode.INVALID_ARGUMENT, "must be normalised"),
    ],
)
def test_import_outside_the_import_roots_is_refused(
    daemon: DaemonHandle, path: str, code: grpc.StatusCode, problem: str
) -> None:
    """Only directories under the operator's import roots can be imported."""
    with daemon.channel() as ch:
        got, details = code_of(
            daemon.bases(ch).CreateBase,
            bases_pb2.CreateBaseRequest(base_id="etc", data_directory=path),
        )
    assert (got, details.split(":")[0]) == (code, "data_directory")
    assert problem in details


def test_import_through_a_linked_path_is_refused(daemon: DaemonHandle, source: Path) -> None:
    """A path that reaches the data directory through a link is refused before
    root resolves anything."""
    link = source.parent / "via-link"
    link.symlink_to(source)
    with daemon.channel() as ch:
        code, details = code_of(
            daemon.bases(ch).CreateBase,
            bases_pb2.CreateBaseRequest(base_id="vialink", data_directory=str(link)),
        )
    assert code == grpc.StatusCode.INVALID_ARGUMENT
    assert "goes through a symbolic link" in details


def test_linked_pg_wal_is_copied_in_and_the_source_is_untouched(
    daemon: DaemonHandle, source: Path
) -> None:
    """pg_wal may be a link (initdb --waldir): its content is copied, the base
    has a real pg_wal directory, and branches of it work."""
    waldir = source.parent / "wal"
    shutil.move(source / "pg_wal", waldir)
    (source / "pg_wal").symlink_to(waldir)
    with daemon.channel() as ch:
        base = daemon.bases(ch).CreateBase(
            bases_pb2.CreateBaseRequest(base_id="walled", data_directory=str(source)),
            timeout=120,
        )
        assert base.name == "bases/walled"
        pg_wal = Path(daemon.pool_root) / "bases" / "walled" / "pgdata" / "pg_wal"
        assert pg_wal.is_dir() and not pg_wal.is_symlink()
        assert (source / "pg_wal").is_symlink()
        branch = daemon.branches(ch).CreateBranch(
            branches_pb2.CreateBranchRequest(parent="bases/walled"), timeout=120
        )
        assert branch.state == branches_pb2.Branch.READY
        daemon.bases(ch).DeleteBase(
            bases_pb2.DeleteBaseRequest(name="bases/walled", force=True), timeout=120
        )


def nobody_finds(needle: str, *roots: str) -> list[str]:
    """Files under `roots` in which uid nobody can read `needle`."""
    proc = subprocess.run(
        [
            "setpriv", "--reuid=nobody", "--regid=nogroup", "--clear-groups", "--",
            "grep", "-r", "-l", "-F", "-s", "--", needle, *roots,
        ],
        capture_output=True,
        text=True,
        check=False,
    )  # fmt: skip
    return proc.stdout.split()


def test_no_password_is_readable_by_other_users(daemon_factory: DaemonFactory) -> None:
    """As uid nobody, a search of the whole pool and state directory for the
    base's and a branch's password finds nothing; the daemon key is root's
    alone; the password is in no storage metadata."""
    d = daemon_factory()
    with d.channel() as ch:
        branch = d.branches(ch).CreateBranch(
            branches_pb2.CreateBranchRequest(parent="bases/demo"), timeout=120
        )
    password = branch.connection.password
    assert len(password) >= 24
    state = d.workdir / "state"
    assert nobody_finds(password, d.pool_root, str(state), str(d.workdir / "pg")) == []
    # Root can read everything: the password is stored nowhere, not only hidden.
    found = subprocess.run(
        ["grep", "-r", "-l", "-F", "-s", "--", password, d.pool_root, str(state)],
        capture_output=True,
        text=True,
        check=False,
    ).stdout.split()
    assert found == []
    key = state / "keys" / "daemon.key"
    assert (os.stat(key).st_mode & 0o777, os.stat(key.parent).st_mode & 0o777) == (0o600, 0o700)
    assert os.stat(key).st_uid == 0
    for sidecar in Path(d.pool_root).glob("*/*/cowbranch.json"):
        assert os.stat(sidecar).st_mode & 0o077 == 0, sidecar


def test_a_storage_failure_reveals_no_password(daemon_factory: DaemonFactory) -> None:
    """A create that fails in storage (branches/ made immutable) returns an error
    and writes debug logs that hold no password."""
    d = daemon_factory()
    with d.channel() as ch:
        stub = d.branches(ch)
        branch = stub.CreateBranch(
            branches_pb2.CreateBranchRequest(parent="bases/demo"), timeout=120
        )
        branches_dir = Path(d.pool_root) / "branches"
        subprocess.run(["chattr", "+i", str(branches_dir)], check=True)
        try:
            code, details = code_of(
                stub.CreateBranch, branches_pb2.CreateBranchRequest(parent="bases/demo")
            )
        finally:
            subprocess.run(["chattr", "-i", str(branches_dir)], check=True)
        child_code, child_details = code_of(
            stub.CreateBranch,
            branches_pb2.CreateBranchRequest(parent=branch.name, branch_id="x" * 64),
        )
    assert code == grpc.StatusCode.INTERNAL, details
    assert child_code == grpc.StatusCode.INVALID_ARGUMENT
    password = branch.connection.password
    log = d.log_path.read_text()
    assert '"level": "debug"' in log  # the daemon logged at debug level
    for text in (details, child_details, log):
        assert password not in text


def test_init_sql_shell_escapes_get_no_root_group(daemon: DaemonHandle) -> None:
    """`\\!` in init_sql runs as the postgres user with no supplementary group:
    neither root's group 0 nor any other of root's."""
    out_dir = Path(tempfile.mkdtemp(prefix="cbt-groups-", dir="/tmp"))
    postgres_user = pwd.getpwnam("postgres")
    os.chown(out_dir, postgres_user.pw_uid, postgres_user.pw_gid)
    try:
        with daemon.channel() as ch:
            daemon.bases(ch).CreateBase(
                bases_pb2.CreateBaseRequest(
                    base_id="groups",
                    initdb=bases_pb2.InitdbSource(
                        init_sql=f"\\! id -G > {out_dir}/groups\n"
                        f"\\! cat /proc/self/status > {out_dir}/status\n"
                    ),
                ),
                timeout=120,
            )
            daemon.bases(ch).DeleteBase(bases_pb2.DeleteBaseRequest(name="bases/groups"))
        groups = (out_dir / "groups").read_text().split()
        assert groups == [str(postgres_user.pw_gid)]
        status = (out_dir / "status").read_text()
        assert "NoNewPrivs:\t1" in status
    finally:
        shutil.rmtree(out_dir)
