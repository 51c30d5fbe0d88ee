"""Idmapped mounts on real pools: a branch user sees its clone as its own, writes
land on disk as `postgres`, and nothing else of the pool opens to it.

Everything is real: clones are btrfs subvolumes on the session's loop pool,
branch users are real uids from a high range (no /etc/passwd entry needed),
processes run as them through setpriv, and postgres runs on a mounted clone.
Each fixture undoes what it made, pass or fail: processes by pid, mounts,
subvolumes, directories.
"""

from __future__ import annotations

import contextlib
import itertools
import os
import pwd
import signal
import statistics
import subprocess
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import psutil
import psycopg
import pytest

from cowbranchd import postgres
from cowbranchd.ports import PortAllocator
from cowbranchd.run import SETPRIV, clean_env, run
from cowbranchd.storage import idmap
from cowbranchd.storage.idmap import (
    IdmapError,
    IdmapUnsupported,
    MountBusy,
    idmapped_mount,
    is_idmapped_mount,
    supports_idmap,
    unmount,
    user_namespace,
)

pytestmark = pytest.mark.btrfs

BRANCH_A = 310001  # uid and gid of one branch user
BRANCH_B = 310002  # and of another
OVERFLOW_ID = 65534  # what an unmapped id looks like through an idmapped mount
SUPERUSER = "cowbranch"
_counter = itertools.count()


def disk_ids() -> tuple[int, int]:
    """The uid and gid that own every clone on disk: the `postgres` user's."""
    entry = pwd.getpwnam("postgres")
    return entry.pw_uid, entry.pw_gid


def owner(path: Path) -> tuple[int, int]:
    st = os.lstat(path)
    return st.st_uid, st.st_gid


def as_branch(
    branch_id: int, script: str, cwd: Path = Path("/")
) -> subprocess.CompletedProcess[str]:
    """Run the shell `script` as branch user `branch_id` (uid = gid), least privileged."""
    argv = [
        SETPRIV,
        f"--reuid={branch_id}",
        f"--regid={branch_id}",
        "--clear-groups",
        "--no-new-privs",
        "--",
        "sh",
        "-c",
        script,
    ]
    return subprocess.run(
        argv, capture_output=True, text=True, env=clean_env(), cwd=cwd, check=False
    )


@dataclass
class Area:
    """A private directory on the btrfs pool; clones made here are subvolumes."""

    root: Path
    subvolumes: list[Path] = field(default_factory=list)
    targets: list[Path] = field(default_factory=list)
    processes: list[subprocess.Popen[bytes]] = field(default_factory=list)

    def clone(self, name: str, *, of: Path | None = None) -> Path:
        """A subvolume `name` holding a 0700 `pgdata` owned by postgres with a
        file `f` in it (or a snapshot of the clone `of`)."""
        path = self.root / name
        if of is None:
            run(["btrfs", "subvolume", "create", str(path)])
        else:
            run(["btrfs", "subvolume", "snapshot", str(of), str(path)])
        self.subvolumes.append(path)
        if of is None:
            uid, gid = disk_ids()
            pgdata = path / "pgdata"
            pgdata.mkdir(mode=0o700)
            (pgdata / "f").write_text(f"data of {name}\n")
            for made in (pgdata, pgdata / "f"):
                os.chown(made, uid, gid)
        return path

    def mount(self, source: Path, target: Path, branch_id: int) -> Path:
        """`source` presented at `target` to branch user `branch_id`."""
        uid, gid = disk_ids()
        self.targets.append(target)
        idmapped_mount(source, target, disk_uid=uid, disk_gid=gid, uid=branch_id, gid=branch_id)
        return target

    def cleanup(self) -> None:
        """Undo everything, each step even if an earlier one failed; the
        first failure is raised at the end."""
        errors: list[BaseException] = []

        def attempt(step: Callable[..., object], *args: object, **kwargs: object) -> None:
            try:
                step(*args, **kwargs)
            except Exception as exc:
                errors.append(exc)

        for proc in self.processes:
            if proc.poll() is None:
                # Its own session, so the group reaches every backend it forked.
                attempt(os.killpg, proc.pid, signal.SIGKILL)
                attempt(proc.wait, timeout=30)
        for target in reversed(self.targets):
            attempt(unmount, target, lazy=True)
        for volume in reversed(self.subvolumes):
            if volume.exists():
                attempt(run, ["btrfs", "subvolume", "delete", str(volume)])
        attempt(run, ["rm", "-rf", "--one-file-system", str(self.root)])
        if errors:
            raise errors[0]


def _let_branch_users_through(path: Path) -> None:
    """Branch users must traverse the session pool's private (0700) parents."""
    for parent in path.parents:
        if parent == Path("/tmp"):
            break
        os.chmod(parent, parent.stat().st_mode | 0o011)


@pytest.fixture
def area(btrfs_pool: Path) -> Iterator[Area]:
    made = Area(btrfs_pool / f"idmap{next(_counter)}")
    made.root.mkdir(mode=0o755)
    _let_branch_users_through(made.root)
    try:
        yield made
    finally:
        made.cleanup()


def test_a_branch_user_owns_its_clone_through_the_mount(area: Area) -> None:
    """Through the mount, files postgres owns on disk appear as the branch
    user's, and a file the branch user writes lands on disk as postgres."""
    clone = area.clone("a")
    target = area.mount(clone, area.root / "a.mnt", BRANCH_A)

    assert owner(target / "pgdata" / "f") == (BRANCH_A, BRANCH_A)
    written = as_branch(BRANCH_A, "echo x > pgdata/new && cat pgdata/f", cwd=target)
    assert (written.returncode, written.stdout, written.stderr) == (0, "data of a\n", "")
    assert owner(clone / "pgdata" / "new") == disk_ids()
    assert owner(target / "pgdata" / "new") == (BRANCH_A, BRANCH_A)
    # The clone's own root-owned top directory has no mapping: the overflow id.
    assert owner(target) == (OVERFLOW_ID, OVERFLOW_ID)


def test_ids_without_a_mapping_cannot_create_through_the_mount(area: Area) -> None:
    """Root itself cannot create a file through the mount (its id has no
    mapping), and the branch user cannot write the root-owned top directory."""
    target = area.mount(area.clone("a"), area.root / "a.mnt", BRANCH_A)

    with pytest.raises(OSError, match="Value too large") as root_try:
        (target / "pgdata" / "by-root").write_text("x")
    assert root_try.value.errno == 75  # EOVERFLOW
    top = as_branch(BRANCH_A, f"echo x > {target}/top")
    assert (top.returncode, top.stderr) == (
        2,
        f"sh: 1: cannot create {target}/top: Permission denied\n",
    )


def test_a_branch_user_reaches_nothing_it_was_not_presented(area: Area) -> None:
    """The branch user cannot read a sibling clone, its own clone through the
    raw path, or another branch user's mount; a second branch user cannot
    read the first one's mount either."""
    mine = area.clone("a")
    sibling = area.clone("b", of=mine)
    mount_a = area.mount(mine, area.root / "a.mnt", BRANCH_A)
    mount_b = area.mount(sibling, area.root / "b.mnt", BRANCH_B)

    for path in (sibling / "pgdata" / "f", mine / "pgdata" / "f", mount_b / "pgdata" / "f"):
        tried = as_branch(BRANCH_A, f"cat {path}")
        assert (tried.returncode, tried.stderr) == (1, f"cat: {path}: Permission denied\n")
    other = as_branch(BRANCH_B, f"cat {mount_a}/pgdata/f; ls {mount_a}/pgdata")
    assert other.returncode != 0
    assert other.stdout == ""
    assert other.stderr.count("Permission denied") == 2
    assert as_branch(BRANCH_B, f"cat {mount_b}/pgdata/f").stdout == "data of a\n"


def test_unmount_is_idempotent_and_state_shows(area: Area) -> None:
    """is_idmapped_mount follows the mount; unmount removes it, leaves the
    directory, and succeeds again with nothing (or no directory) there."""
    clone = area.clone("a")
    target = area.root / "a.mnt"
    assert (is_idmapped_mount(target), is_idmapped_mount(clone)) == (False, False)

    area.mount(clone, target, BRANCH_A)
    assert (is_idmapped_mount(target), is_idmapped_mount(clone)) == (True, False)
    assert sorted(os.listdir(target)) == ["pgdata"]

    unmount(target)
    assert (is_idmapped_mount(target), os.listdir(target)) == (False, [])
    unmount(target)
    target.rmdir()
    unmount(target)
    assert not is_idmapped_mount(target)


def test_unmount_leaves_other_mounts_alone(area: Area) -> None:
    """unmount given a path where a plain (not idmapped) mount sits refuses
    and leaves that mount in place: a wrong path cannot take a pool down."""
    clone = area.clone("a")
    bind = area.root / "bind"
    bind.mkdir()
    run(["mount", "--bind", str(clone), str(bind)])
    try:
        with pytest.raises(IdmapError, match="not an idmapped mount"):
            unmount(bind)
        assert os.listdir(bind) == ["pgdata"]
    finally:
        run(["umount", str(bind)])


def test_a_second_mount_on_a_target_is_refused(area: Area) -> None:
    """A target that already holds a mount is an error, and the mount there stays."""
    target = area.mount(area.clone("a"), area.root / "a.mnt", BRANCH_A)
    with pytest.raises(IdmapError, match="already a mount point"):
        area.mount(area.clone("b"), target, BRANCH_B)
    assert owner(target / "pgdata") == (BRANCH_A, BRANCH_A)
    assert (target / "pgdata" / "f").read_text() == "data of a\n"


def test_links_are_never_followed(area: Area) -> None:
    """A symlink as source or target is refused: nothing is mounted and the
    link's own target stays untouched."""
    clone = area.clone("a")
    (area.root / "link-src").symlink_to(clone)
    (area.root / "link-dst").symlink_to(area.root / "elsewhere")
    (area.root / "elsewhere").mkdir()

    with pytest.raises(IdmapError, match="symbolic link"):
        area.mount(area.root / "link-src", area.root / "x.mnt", BRANCH_A)
    assert not (area.root / "x.mnt").exists()  # the target it made is gone again
    with pytest.raises(IdmapError, match="symbolic link"):
        area.mount(clone, area.root / "link-dst", BRANCH_A)
    assert (is_idmapped_mount(area.root / "elsewhere"), os.listdir(area.root / "elsewhere")) == (
        False,
        [],
    )
    assert not is_idmapped_mount(area.root / "link-dst")


def test_a_busy_mount_is_not_detached_unless_asked(area: Area) -> None:
    """unmount refuses (MountBusy) while a branch process works in the mount;
    lazy=True detaches it at once while that process keeps its view."""
    target = area.mount(area.clone("a"), area.root / "a.mnt", BRANCH_A)
    argv = [SETPRIV, f"--reuid={BRANCH_A}", f"--regid={BRANCH_A}", "--clear-groups"]
    holder = subprocess.Popen(
        [*argv, "--", "sleep", "600"], cwd=target / "pgdata", start_new_session=True
    )
    area.processes.append(holder)

    with pytest.raises(MountBusy):
        unmount(target)
    assert is_idmapped_mount(target)
    unmount(target, lazy=True)
    assert (is_idmapped_mount(target), os.listdir(target)) == (False, [])
    assert (Path(f"/proc/{holder.pid}/cwd") / "f").read_text() == "data of a\n"


def test_deleting_a_mounted_subvolume_is_not_refused(area: Area) -> None:
    """btrfs deletes a clone even while an idmapped mount of it exists (the
    mount does not pin it): the caller must unmount first. What remains at
    the target is an empty, dead directory that unmounts normally."""
    clone = area.clone("a")
    target = area.mount(clone, area.root / "a.mnt", BRANCH_A)

    run(["btrfs", "subvolume", "delete", str(clone)])
    assert (is_idmapped_mount(target), os.listdir(target)) == (True, [])
    unmount(target)
    assert not is_idmapped_mount(target)


def test_user_namespace_holds_exactly_the_maps() -> None:
    """The namespace is new, and a process that joins it sees the given maps."""
    fd = user_namespace((101, 310001, 1), (104, 310002, 3))
    try:
        assert os.readlink(f"/proc/self/fd/{fd}") != os.readlink("/proc/self/ns/user")
        # nsenter joins it (keeping its unmapped root ids) and reads the maps.
        shown = run(
            [
                "nsenter",
                "--preserve-credentials",
                f"--user=/proc/{os.getpid()}/fd/{fd}",
                "--",
                "sh",
                "-c",
                "cat /proc/self/uid_map /proc/self/gid_map",
            ]
        ).stdout.split()
        assert shown == ["101", "310001", "1", "104", "310002", "3"]
    finally:
        os.close(fd)
    with pytest.raises(ValueError, match="uid_map"):
        user_namespace((0, 0, 0), (0, 0, 1))


def test_supports_idmap_on_btrfs(area: Area) -> None:
    """btrfs supports idmapped mounts; the probe leaves nothing behind."""
    idmap._supported.clear()
    assert supports_idmap(area.root)
    assert os.listdir(area.root) == []
    # Nothing of the probe's is mounted (daemons of other tests may hold mounts).
    assert str(area.root) not in Path("/proc/self/mountinfo").read_text()


@pytest.mark.zfs
def test_zfs_fuse_has_no_idmapped_mounts(zfs_pool: str) -> None:
    """On a zfs-fuse pool supports_idmap is False, with no leftover, and
    idmapped_mount says why, naming the filesystem and the errno."""
    mountpoint = Path(
        run(["zfs", "get", "-H", "-o", "value", "mountpoint", zfs_pool]).stdout.strip()
    )
    directory = mountpoint / f"idmap{next(_counter)}"
    directory.mkdir()
    try:
        idmap._supported.clear()
        assert not supports_idmap(directory)
        assert os.listdir(directory) == []
        (directory / "src").mkdir()
        with pytest.raises(IdmapUnsupported) as refused:
            idmapped_mount(
                directory / "src", directory / "dst", disk_uid=0, disk_gid=0, uid=1, gid=1
            )
        assert "fuse" in refused.value.reason
        assert "EINVAL" in refused.value.reason
        assert sorted(os.listdir(directory)) == ["src"]
    finally:
        run(["rm", "-rf", "--one-file-system", str(directory)])


@dataclass
class _Postmaster:
    proc: subprocess.Popen[bytes]
    socket_dsn: str


def _start_as_branch(
    binaries: postgres.Binaries, pgdata: Path, socket_dir: Path, port: int, log: Path
) -> subprocess.Popen[bytes]:
    argv = [
        SETPRIV,
        f"--reuid={BRANCH_A}",
        f"--regid={BRANCH_A}",
        "--clear-groups",
        "--no-new-privs",
        "--",
        binaries.postgres,
        "-D",
        str(pgdata),
        "-c",
        f"port={port}",
        "-c",
        "listen_addresses=",
        "-c",
        f"unix_socket_directories={socket_dir}",
    ]
    with open(log, "ab") as log_file:
        return subprocess.Popen(
            argv,
            stdin=subprocess.DEVNULL,
            stdout=log_file,
            stderr=subprocess.STDOUT,
            cwd="/",
            env=clean_env(),
            start_new_session=True,
        )


def _wait_ready(proc: subprocess.Popen[bytes], dsn: str, log: Path) -> None:
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise AssertionError(f"postgres exited {proc.returncode}:\n{log.read_text()}")
        with contextlib.suppress(psycopg.OperationalError):
            with psycopg.connect(dsn, connect_timeout=2) as conn:
                conn.execute("SELECT 1")
            return
        time.sleep(0.02)
    raise AssertionError(f"postgres not ready in 60 s:\n{log.read_text()}")


@pytest.mark.slow
def test_postgres_runs_as_the_branch_user_on_its_mount(
    area: Area, pg_binaries: postgres.Binaries, pg_ports: PortAllocator
) -> None:
    """postgres accepts the mounted data directory as the branch user's own,
    runs as that uid, and the relation files it creates land on disk as postgres."""
    base = area.root / "base"
    run(["btrfs", "subvolume", "create", str(base)])
    area.subvolumes.append(base)
    (base / "pgdata").mkdir()
    postgres.initdb(
        str(base / "pgdata"), pg_binaries, os_user="postgres", superuser=SUPERUSER, password="pw"
    )
    clone = area.clone("branch", of=base)
    target = area.mount(clone, area.root / "branch.mnt", BRANCH_A)
    socket_dir = area.root / "socket"
    socket_dir.mkdir(mode=0o700)
    os.chown(socket_dir, BRANCH_A, BRANCH_A)
    log = area.root / "postgres.log"
    port = pg_ports.allocate()
    try:
        proc = _start_as_branch(pg_binaries, target / "pgdata", socket_dir, port, log)
        area.processes.append(proc)
        dsn = postgres.dsn(str(socket_dir), port, SUPERUSER, "", "postgres")
        _wait_ready(proc, dsn, log)
        assert psutil.Process(proc.pid).uids().effective == BRANCH_A
        with psycopg.connect(dsn, autocommit=True) as conn:
            conn.execute("CREATE TABLE t AS SELECT g FROM generate_series(1, 1000) g")
            row = conn.execute("SELECT pg_relation_filepath('t')").fetchone()
        assert row is not None
        relation = str(row[0])
        proc.send_signal(signal.SIGINT)  # fast shutdown
        assert proc.wait(timeout=60) == 0, log.read_text()
    finally:
        pg_ports.release(port)

    assert owner(clone / "pgdata" / relation) == disk_ids()
    assert owner(target / "pgdata" / relation) == (BRANCH_A, BRANCH_A)
    assert os.stat(clone / "pgdata" / relation).st_size > 0
    assert {owner(p) for p in (clone / "pgdata" / "pg_wal").iterdir()} == {disk_ids()}


def _timed(fn: Callable[[], object]) -> float:
    started = time.perf_counter()
    fn()
    return (time.perf_counter() - started) * 1000


def test_costs_are_measured(area: Area, capsys: pytest.CaptureFixture[str]) -> None:
    """Measures (never asserts) user_namespace, idmapped_mount and unmount over
    50 rounds; the figures are printed for docs/performance.md."""
    clone = area.clone("a")
    target = area.root / "a.mnt"
    uid, gid = disk_ids()
    times: dict[str, list[float]] = {"user_namespace": [], "idmapped_mount": [], "unmount": []}
    for _ in range(50):
        times["user_namespace"].append(
            _timed(lambda: os.close(user_namespace((uid, BRANCH_A, 1), (gid, BRANCH_A, 1))))
        )
        times["idmapped_mount"].append(
            _timed(
                lambda: idmapped_mount(
                    clone, target, disk_uid=uid, disk_gid=gid, uid=BRANCH_A, gid=BRANCH_A
                )
            )
        )
        times["unmount"].append(_timed(lambda: unmount(target)))
    assert not is_idmapped_mount(target)
    with capsys.disabled():
        for step, samples in times.items():
            samples.sort()
            print(
                f"\n{step}: median {statistics.median(samples):.3f} ms, "
                f"p95 {samples[int(len(samples) * 0.95) - 1]:.3f} ms, max {samples[-1]:.3f} ms"
            )
