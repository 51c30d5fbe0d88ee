"""Bases from existing data directories: copied in (the source untouched),
refreshed as new versions, whatever the source's superuser is called; and
never a version holding files a branch's own uid could not write."""

from __future__ import annotations

import json
import os
import pwd
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path

import grpc
import psycopg
import pytest

from cowbranchd import ctl, postgres
from cowbranchd.v1 import bases_pb2, branches_pb2
from tests.fix_daemon import DaemonFactory, DaemonHandle, code_of

BIN_DIRS = ("/usr/lib/postgresql/{version}/bin",)
# What a base sealed by cowbranchd before f759db0 held: its single-user
# postgres ran with the postgres uid but root's gid, so the shutdown
# checkpoint left this file postgres:root.
ROOT_GROUP_FILE = "pg_logical/replorigin_checkpoint"


@pytest.fixture
def source_dir() -> Iterator[Path]:
    """A clean data directory outside the pool, owned by postgres, superuser `owner`."""
    root = Path(tempfile.mkdtemp(prefix="cbt-src-", dir="/tmp"))
    os.chmod(root, 0o755)
    pgdata = root / "pgdata"
    pgdata.mkdir(mode=0o700)
    binaries = postgres.find_binaries(15, BIN_DIRS)
    postgres.initdb(
        str(pgdata),
        binaries,
        os_user="postgres",
        superuser="owner",
        password="pw",
        database="app",
        init_sql="CREATE TABLE t (x int); INSERT INTO t VALUES (1), (2);",
    )
    yield pgdata
    shutil.rmtree(root, ignore_errors=True)


def fingerprint(pgdata: Path) -> list[tuple[str, int, int]]:
    return sorted(
        (str(p.relative_to(pgdata)), p.stat().st_size, p.stat().st_mtime_ns)
        for p in pgdata.rglob("*")
        if p.is_file()
    )


def change_source(pgdata: Path, sql: str) -> None:
    """Start the source on a private socket, run `sql`, shut it down cleanly."""
    binaries = postgres.find_binaries(15, BIN_DIRS)
    sock = pgdata.parent / "sock"
    dsn = postgres.dsn(str(sock), 5433, "owner", "", "app")
    master = postgres.start(
        str(pgdata),
        binaries=binaries,
        os_user="postgres",
        port=5433,
        socket_dir=str(sock),
        listen_addresses="",
        settings={},
        log_path=str(pgdata.parent / "log"),
        ready_dsn=dsn,
    )
    try:
        with psycopg.connect(dsn, autocommit=True) as conn:
            conn.execute(sql)
    finally:
        postgres.stop(master)


def rows(dsn: str) -> list[int]:
    with psycopg.connect(dsn) as conn:
        return [r[0] for r in conn.execute("SELECT x FROM t ORDER BY x")]


def test_base_from_data_directory_and_refreshed_version(
    daemon: DaemonHandle, source_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A clean data directory becomes a base without changing the source; branches
    connect as its own superuser; a refresh from the changed source is version 2,
    and version 1 keeps the old data."""
    before = fingerprint(source_dir)
    with daemon.channel() as ch:
        bases, branches = daemon.bases(ch), daemon.branches(ch)
        base = bases.CreateBase(
            bases_pb2.CreateBaseRequest(base_id="copied", data_directory=str(source_dir)),
            timeout=120,
        )
        assert (base.user, [v.version for v in base.versions]) == ("owner", [1])
        assert fingerprint(source_dir) == before
        v1 = branches.CreateBranch(
            branches_pb2.CreateBranchRequest(parent="bases/copied"), timeout=120
        )
        assert v1.connection.user == "owner"
        dsn_app = v1.connection.dsn.rsplit("/", 1)[0] + "/app"
        assert rows(dsn_app) == [1, 2]

        change_source(source_dir, "INSERT INTO t VALUES (3)")
        version = bases.CreateBaseVersion(
            bases_pb2.CreateBaseVersionRequest(
                parent="bases/copied", data_directory=str(source_dir)
            ),
            timeout=120,
        )
        assert version.version == 2
        v2 = branches.CreateBranch(
            branches_pb2.CreateBranchRequest(parent="bases/copied"), timeout=120
        )
        assert v2.parent == "bases/copied/versions/2"
        assert v2.connection.password != v1.connection.password  # each branch its own
        assert rows(v2.connection.dsn.rsplit("/", 1)[0] + "/app") == [1, 2, 3]
        assert rows(dsn_app) == [1, 2]

        # The same refresh from the command line.
        change_source(source_dir, "INSERT INTO t VALUES (4)")
        capsys.readouterr()
        code = ctl.main(
            [
                "--address",
                daemon.address,
                "-o",
                "json",
                "base",
                "version",
                "copied",
                "--data-directory",
                str(source_dir),
            ]
        )
        assert code == 0
        assert json.loads(capsys.readouterr().out)["version"] == 3
        v3 = branches.CreateBranch(
            branches_pb2.CreateBranchRequest(parent="bases/copied"), timeout=120
        )
        assert rows(v3.connection.dsn.rsplit("/", 1)[0] + "/app") == [1, 2, 3, 4]
        bases.DeleteBase(bases_pb2.DeleteBaseRequest(name="bases/copied", force=True), timeout=120)


def _give_root_group(pgdata: Path) -> None:
    """chgrp root ROOT_GROUP_FILE in `pgdata`, as the old daemon left it."""
    os.chown(pgdata / ROOT_GROUP_FILE, pwd.getpwnam("postgres").pw_uid, 0, follow_symlinks=False)


def _btrfs_read_only(path: Path, value: bool) -> None:
    subprocess.run(
        ["btrfs", "property", "set", "-ts", str(path), "ro", str(value).lower()],
        check=True,
        capture_output=True,
    )


def test_base_sealed_with_roots_group_is_refused_not_handed_out_to_panic(
    daemon_factory: DaemonFactory,
) -> None:
    """A base version holding a file of root's group, as an older cowbranchd sealed them, is
    FAILED_PRECONDITION naming the file; before, the branch started (its own uid reads the
    file through the idmapped mount) and its first CHECKPOINT, the one a branch from it
    takes, PANICked: `could not open file "pg_logical/replorigin_checkpoint": Permission
    denied` (the kernel writes no inode with an unmapped group through the mount)."""
    d = daemon_factory()
    d.stop()
    base = Path(d.pool_root) / "bases"
    _give_root_group(base / "demo" / "pgdata")
    _btrfs_read_only(base / "demo@v1", False)
    try:
        _give_root_group(base / "demo@v1" / "pgdata")
    finally:
        _btrfs_read_only(base / "demo@v1", True)
    d.start()
    with d.channel() as ch:
        branches = d.branches(ch)
        code, details = code_of(
            branches.CreateBranch, branches_pb2.CreateBranchRequest(parent="bases/demo")
        )
        if code is grpc.StatusCode.OK:  # before the fix: the PANIC comes one step later
            listed = branches.ListBranches(branches_pb2.ListBranchesRequest(), timeout=60)
            code, details = code_of(
                branches.CreateBranch,
                branches_pb2.CreateBranchRequest(parent=listed.branches[0].name),
            )
    assert (code, f"{ROOT_GROUP_FILE} is postgres:root" in details) == (
        grpc.StatusCode.FAILED_PRECONDITION,
        True,
    ), details


def test_no_version_is_sealed_from_files_of_another_group(daemon: DaemonHandle) -> None:
    """CreateBaseVersion of a base whose data holds a file of root's group is
    FAILED_PRECONDITION naming it, and the base keeps the versions it had."""
    with daemon.channel() as ch:
        bases = daemon.bases(ch)
        bases.CreateBase(bases_pb2.CreateBaseRequest(base_id="regrouped"), timeout=120)
        try:
            _give_root_group(Path(daemon.pool_root) / "bases" / "regrouped" / "pgdata")
            code, details = code_of(
                bases.CreateBaseVersion,
                bases_pb2.CreateBaseVersionRequest(parent="bases/regrouped"),
            )
            got = bases.GetBase(bases_pb2.GetBaseRequest(name="bases/regrouped"), timeout=60)
            assert (
                code,
                f"{ROOT_GROUP_FILE} is postgres:root" in details,
                [v.version for v in got.versions],
            ) == (grpc.StatusCode.FAILED_PRECONDITION, True, [1]), details
        finally:
            bases.DeleteBase(
                bases_pb2.DeleteBaseRequest(name="bases/regrouped", force=True), timeout=120
            )
