"""Per-branch size limits (storage.max_branch_bytes, CreateBranchRequest.max_bytes):
the limit is held by storage itself (btrfs simple quotas, ZFS `quota`), counts
only what a branch writes, and stops nobody but the branch that hits it."""

from __future__ import annotations

import errno
import os
import subprocess
import time
from pathlib import Path

import grpc
import psycopg
import pytest

from cowbranchd.config import StorageConfig, config_from_mapping
from cowbranchd.daemon.limits import size_limit
from cowbranchd.errors import InvalidArgument
from cowbranchd.storage.base import Kind, StorageDriver
from cowbranchd.storage.zfs import ZfsDriver
from cowbranchd.v1 import branches_pb2
from tests.fix_daemon import DaemonFactory, DaemonHandle

M = 1 << 20
Branch = branches_pb2.Branch


# -- the limit a create gets ---------------------------------------------------------


def test_size_limit_defaults_caps_and_refusals() -> None:
    """0 asks for the default; a request may go up to the cap (default: the
    default itself); above it, or any limit when none is configured, is refused
    naming max_bytes."""
    storage = StorageConfig(max_branch_bytes=64 * M, max_branch_bytes_cap=256 * M)
    assert size_limit(storage, 0) == 64 * M
    assert size_limit(storage, 128 * M) == 128 * M
    assert size_limit(storage, 256 * M) == 256 * M
    for asked in (256 * M + 1, -1):
        with pytest.raises(InvalidArgument) as over:
            size_limit(storage, asked)
        assert over.value.field == "max_bytes"
    uncapped = StorageConfig(max_branch_bytes=64 * M)
    assert size_limit(uncapped, 64 * M) == 64 * M
    with pytest.raises(InvalidArgument, match="cap of 67108864 bytes"):
        size_limit(uncapped, 64 * M + 1)
    with pytest.raises(InvalidArgument, match="size limits are off"):
        size_limit(StorageConfig(), 1)
    assert size_limit(StorageConfig(), 0) == 0


def test_config_sizes_zero_means_none_and_cap_not_below_default() -> None:
    """Both keys take sizes, 0 meaning no limit; a cap below the default is an error."""
    config = config_from_mapping(
        {"storage": {"max_branch_bytes": "2G", "max_branch_bytes_cap": "8G"}}
    )
    assert (config.storage.max_branch_bytes, config.storage.max_branch_bytes_cap) == (
        2 << 30,
        8 << 30,
    )
    zero = config_from_mapping({"storage": {"max_branch_bytes": "0", "max_branch_bytes_cap": 0}})
    assert (zero.storage.max_branch_bytes, zero.storage.max_branch_bytes_cap) == (0, 0)
    with pytest.raises(InvalidArgument) as low:
        config_from_mapping({"storage": {"max_branch_bytes": "2G", "max_branch_bytes_cap": "1G"}})
    assert low.value.field == "storage.max_branch_bytes_cap"
    with pytest.raises(InvalidArgument):
        config_from_mapping({"storage": {"min_free_bytes": "0"}})


# -- drivers ---------------------------------------------------------------------------


def _write_until_refused(path: Path, limit_bytes: int) -> tuple[int, int | None]:
    """Write incompressible data, fsynced, until refused or `limit_bytes`
    are written: (bytes written, errno or None)."""
    chunk = os.urandom(M)
    written = 0
    try:
        with open(path, "wb") as fh:
            while written < limit_bytes:
                fh.write(chunk)
                fh.flush()
                os.fsync(fh.fileno())
                written += len(chunk)
    except OSError as exc:
        return written, exc.errno
    return written, None


@pytest.mark.slow
def test_clone_limit_counts_only_its_own_writes(driver: StorageDriver) -> None:
    """A clone limited to 24 MiB of a 40 MiB origin is not charged for the
    origin: it writes 8 MiB fine, is refused (EDQUOT) near 24 MiB, while an
    unlimited sibling clone writes past that."""
    base = driver.create_volume(Kind.BASES, "big", {})
    (base / "pgdata").mkdir()
    assert _write_until_refused(base / "pgdata" / "data", 40 * M) == (40 * M, None)
    source = driver.snapshot(Kind.BASES, "big", "v1")

    assert driver.limits_bytes
    limited = driver.clone(source, Kind.BRANCHES, "small", {}, max_bytes=24 * M)
    free = driver.clone(source, Kind.BRANCHES, "free", {})

    assert _write_until_refused(limited / "pgdata" / "first", 8 * M) == (8 * M, None)
    written, code = _write_until_refused(limited / "pgdata" / "second", 64 * M)
    assert code in (errno.EDQUOT, errno.ENOSPC), (written, code)
    # ZFS enforces quotas per transaction group, so it may let a little more through.
    assert 8 * M <= written <= 24 * M
    assert _write_until_refused(free / "pgdata" / "more", 48 * M) == (48 * M, None)
    if isinstance(driver, ZfsDriver):
        quota = subprocess.run(
            ["zfs", "get", "-H", "-p", "-o", "value", "quota", f"{driver.dataset}/branches/small"],
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
        assert quota == str(24 * M)


# -- daemon ------------------------------------------------------------------------------


def _create(d: DaemonHandle, ch: grpc.Channel, **fields: object) -> Branch:
    fields.setdefault("parent", f"bases/{d.base}")
    request = branches_pb2.CreateBranchRequest(**fields)  # type: ignore[arg-type]
    branch: Branch = d.branches(ch).CreateBranch(request, timeout=120)
    return branch


def _get(d: DaemonHandle, ch: grpc.Channel, name: str) -> Branch:
    branch: Branch = d.branches(ch).GetBranch(
        branches_pb2.GetBranchRequest(name=name), timeout=30
    )
    return branch


def _commit_rows(dsn: str, rows: int) -> None:
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute("CREATE TABLE IF NOT EXISTS t (x text)")
        conn.execute(
            "INSERT INTO t SELECT md5(i::text) FROM generate_series(1, %s) i", (rows,)
        )


_FILL = (
    "CREATE TABLE fill AS SELECT i, md5(i::text) || md5((i + 1)::text) AS x "
    "FROM generate_series(1, {rows}) i"
)


def _fill(dsn: str, rows: int) -> psycopg.Error | None:
    """Write about 100 bytes a row (plus WAL) in one statement; the error, if any."""
    try:
        with psycopg.connect(dsn, autocommit=True, connect_timeout=10) as conn:
            conn.execute(_FILL.format(rows=rows))
    except psycopg.Error as exc:
        return exc
    return None


def _limited_daemon(daemon_factory: DaemonFactory, **kwargs: str) -> DaemonHandle:
    d = daemon_factory(start=False, **kwargs)
    d.sections = {"storage": "max_branch_bytes = '64M'\nmax_branch_bytes_cap = '512M'"}
    d.start()
    return d


@pytest.mark.slow
def test_branch_at_its_limit_fails_alone(daemon_factory: DaemonFactory) -> None:
    """A branch limited to 64 MiB fails its own big insert with "Disk quota
    exceeded" (and, if its postgres cannot go on, turns FAILED with failure
    "size limit"); a sibling keeps committing and new branches of the base work."""
    d = _limited_daemon(daemon_factory)
    with d.channel() as ch:
        hog = _create(d, ch)
        sibling = _create(d, ch)
        error = _fill(hog.connection.dsn, 2_000_000)  # ~200 MiB of table alone
        assert error is not None
        assert "Disk quota exceeded" in str(error) or isinstance(error, psycopg.OperationalError)

        _commit_rows(sibling.connection.dsn, 10_000)
        newcomer = _create(d, ch)
        _commit_rows(newcomer.connection.dsn, 10_000)
        with psycopg.connect(sibling.connection.dsn) as conn:
            assert conn.execute("SELECT count(*) FROM t").fetchone() == (10_000,)

        # The hog either still answers (only its writes fail) or is FAILED for its limit.
        deadline = time.monotonic() + 30
        while True:
            state = _get(d, ch, hog.name)
            try:
                with psycopg.connect(hog.connection.dsn, connect_timeout=5) as conn:
                    conn.execute("SELECT 1")
                answered = True
            except psycopg.Error:
                answered = False
            if answered and state.state == Branch.READY:
                break
            if state.state == Branch.FAILED:
                assert state.failure.startswith("size limit"), state.failure
                break
            assert time.monotonic() < deadline, (state.state, state.failure)
            time.sleep(0.5)


@pytest.mark.slow
def test_parent_data_is_not_charged_and_overrides_stay_within_the_cap(
    daemon_factory: DaemonFactory,
) -> None:
    """A branch may ask for more than the default (up to the cap): given 512 MiB
    it holds ~100 MiB the 64 MiB default would refuse; its child, on the default
    64 MiB, still writes (the parent's data is not its own); above the cap is
    INVALID_ARGUMENT naming max_bytes."""
    d = _limited_daemon(daemon_factory)
    with d.channel() as ch:
        with pytest.raises(grpc.RpcError) as over:
            _create(d, ch, max_bytes=512 * M + 1)
        assert over.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "max_bytes" in (over.value.details() or "")
        assert "cap" in (over.value.details() or "")

        big = _create(d, ch, max_bytes=512 * M)
        assert _fill(big.connection.dsn, 1_000_000) is None  # ~100 MiB with WAL
        # Hint bits set now, as in any prepared base: otherwise the child's first
        # read of these rows would write every page again, on its own account.
        with psycopg.connect(big.connection.dsn, autocommit=True) as conn:
            conn.execute("VACUUM (FREEZE) fill")
        child = _create(d, ch, parent=big.name)
        _commit_rows(child.connection.dsn, 50_000)
        with psycopg.connect(child.connection.dsn) as conn:
            assert conn.execute("SELECT count(*) FROM fill").fetchone() == (1_000_000,)
            assert conn.execute("SELECT count(*) FROM t").fetchone() == (50_000,)


@pytest.mark.slow
def test_zfs_branch_gets_quota_on_its_clone(zfs_pool: str, daemon_factory: DaemonFactory) -> None:
    """On ZFS the limit is the clone's `quota` (not `refquota`): the default,
    or the request's own max_bytes."""
    d = _limited_daemon(daemon_factory, driver="zfs", pool_root=f"{zfs_pool}/cbq")
    try:
        with d.channel() as ch:
            default = _create(d, ch)
            own = _create(d, ch, max_bytes=128 * M)

            def prop(branch: Branch, name: str) -> str:
                dataset = f"{zfs_pool}/cbq/branches/{branch.name.split('/')[-1]}"
                return subprocess.run(
                    ["zfs", "get", "-H", "-p", "-o", "value", name, dataset],
                    capture_output=True,
                    text=True,
                    check=True,
                ).stdout.strip()

            assert (prop(default, "quota"), prop(default, "refquota")) == (str(64 * M), "0")
            assert prop(own, "quota") == str(128 * M)
            _commit_rows(default.connection.dsn, 10_000)
    finally:
        d.cleanup()
