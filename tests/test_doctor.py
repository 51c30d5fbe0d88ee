"""`cowbranchd doctor` on real hosts' parts: a btrfs loop pool, a directory that
is not btrfs, a base whose PostgreSQL major is not installed, a port taken by
a listening socket. Run as the operator runs it (a child process, --json),
and through `cowbranchctl doctor`."""

from __future__ import annotations

import contextlib
import encodings.raw_unicode_escape  # noqa: F401 - loaded before a child drops to nobody
import json
import os
import pwd
import shutil
import socket
import subprocess
import sys
import tempfile
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest

from cowbranchd.host.doctor import run_checks
from cowbranchd.model import BaseRecord, State
from cowbranchd.storage.base import Kind
from cowbranchd.storage.btrfs import BtrfsDriver
from tests.fix_postgres import TEST_PORTS

CHECKS = [
    "config",
    "btrfs",
    "zfs",
    "pool",
    "idmap",
    "postgres",
    "bases",
    "ports",
    "socket",
    "state_dir",
    "clock",
]
# Five ports at the top of this run's postgres test block, which no fixture hands out.
FIRST = TEST_PORTS[1] - 9


def write_config(directory: Path, pool_root: Path, *, extra: str = "") -> Path:
    """A config whose every path lies under `directory`, on pool `pool_root`."""
    path = directory / "config.toml"
    path.write_text(
        f"""
[daemon]
socket = "{directory}/run/api.sock"
state_dir = "{directory}/state"
{extra}
[storage]
driver = "btrfs"
root = "{pool_root}"

[postgres]
port_range = "{FIRST}-{FIRST + 4}"
"""
    )
    return path


def doctor(config: Path, *command: str) -> tuple[int, dict[str, Any]]:
    """Run doctor on `config` with --json; its exit code and document."""
    argv = list(command) or [sys.executable, "-m", "cowbranchd.host", "doctor"]
    proc = subprocess.run(
        [*argv, "--config", str(config), "--json"],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    return proc.returncode, json.loads(proc.stdout)


def by_check(document: dict[str, Any]) -> dict[str, dict[str, str]]:
    return {c["check"]: c for c in document["checks"]}


@pytest.fixture
def pool_root(btrfs_pool: Path) -> Iterator[Path]:
    """An empty directory of its own on the session's btrfs loop pool."""
    root = btrfs_pool / f"doctor-{uuid.uuid4().hex[:8]}"
    root.mkdir()
    try:
        yield root
    finally:
        driver = BtrfsDriver(root)
        for volume in driver.list():
            driver.destroy(volume.kind, volume.name)
        driver.gc()
        for sub in (".trash", ".staging", "branches", "bases", ""):
            with contextlib.suppress(OSError):
                (root / sub).rmdir()


@pytest.mark.btrfs
def test_a_healthy_btrfs_pool_passes(tmp_path: Path, pool_root: Path) -> None:
    """On a real btrfs pool with free ports, doctor exits 0 and lists every check, none failed."""
    code, document = doctor(write_config(tmp_path, pool_root))
    found = by_check(document)
    assert list(found) == CHECKS
    assert [name for name, c in found.items() if c["status"] == "fail"] == []
    assert (code, document["ok"]) == (0, True)
    assert found["pool"]["status"] == "ok"
    assert found["pool"]["summary"].startswith(f"btrfs {pool_root}: ")
    assert found["config"] == {
        "check": "config",
        "status": "ok",
        "summary": f"{tmp_path / 'config.toml'} is valid",
        "about": "the daemon refuses to start (status 2) on an unknown key or a bad value",
        "fix": "",
    }


def test_a_pool_directory_that_is_not_btrfs_fails_naming_it(tmp_path: Path) -> None:
    """A storage.root on another filesystem is a failure that names the directory and its fs."""
    plain = tmp_path / "plain"
    plain.mkdir()
    code, document = doctor(write_config(tmp_path, plain))
    pool = by_check(document)["pool"]
    assert code == 1
    assert pool["status"] == "fail"
    assert pool["summary"].startswith(f"{plain} is on ")
    assert pool["summary"].endswith(
        ", not btrfs: the btrfs driver needs a directory on a btrfs mount"
    )
    assert "storage.root" in pool["fix"]


@pytest.mark.btrfs
def test_a_base_of_a_missing_postgres_major_fails_naming_it(
    tmp_path: Path, pool_root: Path
) -> None:
    """A base whose metadata says PostgreSQL 99 (written as the daemon writes it) fails the
    postgres check, naming the base and the major."""
    driver = BtrfsDriver(root=pool_root)
    driver.ensure_layout()
    record = BaseRecord(
        base_id="old",
        state=State.READY,
        create_time=datetime.now(UTC),
        pg_version=99,
        user="postgres",
        database="postgres",
    )
    driver.create_volume(Kind.BASES, "old", record.to_meta())
    code, document = doctor(write_config(tmp_path, pool_root))
    check = by_check(document)["postgres"]
    assert code == 1
    assert check["status"] == "fail"
    assert check["summary"].startswith("bases/old needs PostgreSQL 99, not installed (installed: ")
    assert "apt-get install postgresql-N" in check["fix"]


@pytest.mark.btrfs
def test_a_base_holding_a_file_of_roots_group_warns_naming_it(
    tmp_path: Path, pool_root: Path
) -> None:
    """A base whose data holds a file of root's group (as an older cowbranchd sealed
    them; no branch's uid could write it) warns in the bases check, naming base and file."""
    driver = BtrfsDriver(root=pool_root)
    driver.ensure_layout()
    record = BaseRecord(
        base_id="regrouped",
        state=State.READY,
        create_time=datetime.now(UTC),
        pg_version=15,
        user="postgres",
        database="postgres",
    )
    pgdata = driver.create_volume(Kind.BASES, "regrouped", record.to_meta()) / "pgdata"
    postgres = pwd.getpwnam("postgres")
    (pgdata / "pg_logical").mkdir(parents=True)
    (pgdata / "pg_logical" / "replorigin_checkpoint").write_bytes(b"\0" * 8)
    for path in (pgdata, pgdata / "pg_logical"):
        os.chown(path, postgres.pw_uid, postgres.pw_gid)
    os.chown(pgdata / "pg_logical" / "replorigin_checkpoint", postgres.pw_uid, 0)
    code, document = doctor(write_config(tmp_path, pool_root))
    check = by_check(document)["bases"]
    assert (code, check["status"], check["summary"]) == (
        0,
        "warn",
        "files not owned by postgres and its group: bases/regrouped "
        f"(pg_logical/replorigin_checkpoint is postgres:root ({postgres.pw_uid}:0))",
    )


def test_an_occupied_port_fails_naming_it(tmp_path: Path) -> None:
    """A socket listening on a port of postgres.port_range fails the ports check, naming the
    port and the program holding it."""
    with socket.socket() as held:
        held.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        held.bind(("127.0.0.1", FIRST + 2))
        held.listen()
        code, document = doctor(write_config(tmp_path, tmp_path))
    check = by_check(document)["ports"]
    assert code == 1
    assert check["status"] == "fail"
    assert f"port {FIRST + 2} (" in check["summary"]
    assert check["summary"].startswith(f"{FIRST}-{FIRST + 4}: 4 free; in use by other programs")


def test_an_invalid_config_fails_and_skips_the_rest(tmp_path: Path) -> None:
    """An unknown key fails the config check naming it; nothing else is checked."""
    config = write_config(tmp_path, tmp_path, extra='socket_grup = "x"\n')
    code, document = doctor(config)
    found = by_check(document)
    assert code == 1
    assert found["config"]["status"] == "fail"
    assert "daemon.socket_grup" in found["config"]["summary"]
    assert {c["status"] for name, c in found.items() if name != "config"} == {"skip"}


def test_cowbranchctl_doctor_is_the_same_report(tmp_path: Path) -> None:
    """`cowbranchctl doctor` runs the same checks with the same verdict."""
    config = write_config(tmp_path, tmp_path / "missing")
    code, document = doctor(config)
    ctl_code, ctl_document = doctor(config, sys.executable, "-m", "cowbranchd.ctl", "doctor")
    assert (ctl_code, list(by_check(ctl_document))) == (code, CHECKS)
    assert [c["status"] for c in ctl_document["checks"]] == [
        c["status"] for c in document["checks"]
    ]


def test_the_table_says_what_failed_and_how_to_fix_it(tmp_path: Path) -> None:
    """Without --json, each failed check is one line, then why it matters and the fix."""
    config = write_config(tmp_path, tmp_path / "missing")
    proc = subprocess.run(
        [sys.executable, "-m", "cowbranchd.host", "doctor", "--config", str(config)],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    lines = proc.stdout.splitlines()
    failed = next(i for i, line in enumerate(lines) if line.startswith("  FAIL  pool"))
    assert proc.returncode == 1
    assert lines[0] == f"cowbranchd doctor: {config}"
    assert lines[failed + 1].strip().startswith("why: branches are copy-on-write clones")
    assert lines[failed + 2].strip().startswith("fix: point storage.root at a directory")
    assert lines[-1].startswith("FAILED: pool")


@pytest.mark.btrfs
def test_a_non_root_user_gets_warnings_not_failures_for_what_it_cannot_read(
    pool_root: Path,
) -> None:
    """A CI job's user runs doctor on a host whose pool only root may read:
    what it cannot look at is a warning naming its uid, not a failure. (A
    forked child drops to `nobody`, after the same checks ran once as root
    so that every module they load is loaded: the interpreter's library may
    lie where that user cannot read.)"""
    directory = Path(tempfile.mkdtemp(prefix="cbt-doctor-", dir="/tmp"))
    os.chmod(directory, 0o755)
    config = write_config(directory, pool_root)
    config.chmod(0o644)
    assert run_checks(config)  # as root: loads every module the checks need
    os.chmod(pool_root, 0o700)
    nobody = pwd.getpwnam("nobody")
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: never returns into pytest
        try:
            os.close(read_end)
            os.setgroups([])
            os.setegid(nobody.pw_gid)
            os.seteuid(nobody.pw_uid)
            found = [[f.check, f.status.value, f.summary] for f in run_checks(config)]
            os.write(write_end, json.dumps(found).encode())
        except BaseException as exc:  # said to the parent, which fails on it
            os.write(write_end, json.dumps([["child", "crashed", repr(exc)]]).encode())
        finally:
            os._exit(0)
    os.close(write_end)
    with os.fdopen(read_end) as pipe:
        data = pipe.read()
    os.waitpid(pid, 0)
    os.chmod(pool_root, 0o755)
    shutil.rmtree(directory, ignore_errors=True)
    findings = json.loads(data)
    unread = [f for f in findings if "could not check as uid" in f[2]]
    assert unread, findings
    assert {status for _, status, _ in unread} == {"warn"}
    assert [name for name, status, _ in findings if status == "fail"] == []
