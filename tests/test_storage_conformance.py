"""The storage-driver conformance suite: one set of tests, run unchanged
against every driver flavour on real pools (see tests/fix_pools.py)."""

from __future__ import annotations

import errno
import os
from pathlib import Path

import pytest

from cowbranchd.errors import AlreadyExists, NotFound, ResourceExhausted, StorageError
from cowbranchd.storage import BtrfsDriver
from cowbranchd.storage.base import Kind, SnapshotRef, StorageDriver, Volume
from tests.fix_pools import leave_leftovers, misplaced_like, reopen

BASES, BRANCHES = Kind.BASES, Kind.BRANCHES


def _write(volume: Path, name: str, text: str) -> None:
    (volume / "pgdata").mkdir(exist_ok=True)
    (volume / "pgdata" / name).write_text(text)


def _read(volume: Path, name: str) -> str:
    return (volume / "pgdata" / name).read_text()


def _by_name(driver: StorageDriver) -> dict[str, Volume]:
    return {f"{v.kind.value}/{v.name}": v for v in driver.list()}


def _fill(path: Path) -> int | None:
    """Write incompressible data to `path` until the pool refuses; the errno."""
    chunk = os.urandom(1 << 20)
    try:
        with open(path, "wb") as fh:
            while True:
                fh.write(chunk)
                fh.flush()
                os.fsync(fh.fileno())
    except OSError as exc:
        return exc.errno


def _base_with_snapshot(driver: StorageDriver, text: str = "v1") -> SnapshotRef:
    path = driver.create_volume(BASES, "shop", {"state": "ready"})
    _write(path, "table", text)
    return driver.snapshot(BASES, "shop", "v1")


def test_create_list_meta_round_trip(driver: StorageDriver) -> None:
    """A created volume is listed at once with its path and exactly its metadata."""
    meta = {"state": "creating", "labels": '{"pr": "12",\n"team":\t"web\\\\"}', "empty-ish": "-"}
    path = driver.create_volume(BRANCHES, "b1", meta)
    bare = driver.create_volume(BASES, "bare", {})

    assert path.is_dir() and bare.is_dir()
    assert _by_name(driver) == {
        "branches/b1": Volume(kind=BRANCHES, name="b1", path=path, meta=meta),
        "bases/bare": Volume(kind=BASES, name="bare", path=bare, meta={}),
    }


def test_clone_sees_snapshot_and_is_isolated(driver: StorageDriver) -> None:
    """A clone sees the data as of its snapshot; its writes reach neither the
    source nor a sibling clone."""
    ref = _base_with_snapshot(driver, "at snapshot")
    base = driver.list()[0].path
    _write(base, "table", "after snapshot")

    one = driver.clone(ref, BRANCHES, "one", {"state": "ready"})
    two = driver.clone(ref, BRANCHES, "two", {})
    _write(one, "table", "written in one")

    assert (_read(base, "table"), _read(one, "table"), _read(two, "table")) == (
        "after snapshot", "written in one", "at snapshot",
    )
    listed = _by_name(driver)
    assert listed["branches/one"].origin == ref
    assert listed["branches/one"].meta == {"state": "ready"}
    assert listed["branches/two"].meta == {}
    assert listed["bases/shop"].snapshots == ("v1",)


def test_clone_of_a_clone(driver: StorageDriver) -> None:
    """A snapshot of a branch can be cloned again, and records that branch as origin."""
    one = driver.clone(_base_with_snapshot(driver), BRANCHES, "one", {})
    _write(one, "table", "branch one")
    ref = driver.snapshot(BRANCHES, "one", "c-two")
    _write(one, "table", "branch one later")

    two = driver.clone(ref, BRANCHES, "two", {"parent": "branches/one"})

    assert _read(two, "table") == "branch one"
    assert _by_name(driver)["branches/two"].origin == SnapshotRef(BRANCHES, "one", "c-two")


def test_set_meta_merges_and_removes(driver: StorageDriver) -> None:
    """set_meta merges keys, and an empty value removes its key, durably."""
    driver.create_volume(BRANCHES, "b1", {"state": "creating", "port": "5433", "keep": "x"})

    driver.set_meta(BRANCHES, "b1", {"state": "ready", "port": "", "expires": "2030"})

    expected = {"state": "ready", "keep": "x", "expires": "2030"}
    assert _by_name(driver)["branches/b1"].meta == expected


def test_destroy_missing_is_success(driver: StorageDriver) -> None:
    """Destroying a volume or snapshot that does not exist succeeds."""
    driver.destroy(BRANCHES, "ghost")
    assert driver.destroy_snapshot(SnapshotRef(BASES, "ghost", "v1")) is True
    assert driver.list() == []


def test_destroy_removes_snapshots(driver: StorageDriver) -> None:
    """Destroying a volume takes its snapshots with it; its name is free again."""
    ref = _base_with_snapshot(driver)
    driver.snapshot(BASES, "shop", "v2")

    driver.destroy(BASES, "shop")

    assert driver.list() == []
    with pytest.raises(NotFound):
        driver.clone(ref, BRANCHES, "b1", {})
    driver.create_volume(BASES, "shop", {})
    driver.snapshot(BASES, "shop", "v1")  # no stale snapshot of that name survived


def test_destroy_volume_whose_snapshot_has_a_clone(driver: StorageDriver) -> None:
    """A volume whose snapshot has a clone leaves the inventory at once, but the
    snapshot stays, under its name, for as long as a clone came from it: it is
    that clone's reset source. gc() removes it once the clone is gone."""
    ref = _base_with_snapshot(driver, "kept")
    clone = driver.clone(ref, BRANCHES, "b1", {})
    if driver.clones_pin_snapshots:
        assert _by_name(driver)["bases/shop"].busy_snapshots == ("v1",)
        assert driver.destroy_snapshot(ref) is False

    driver.destroy(BASES, "shop")

    assert list(_by_name(driver)) == ["branches/b1"]
    assert _read(clone, "table") == "kept"
    assert driver.gc() == []  # the clone still needs it
    again = driver.clone(ref, BRANCHES, "b1-reset", {})  # a reset of b1 clones it anew
    assert _read(again, "table") == "kept"
    driver.destroy(BRANCHES, "b1-reset")
    driver.destroy(BRANCHES, "b1")
    removed = driver.gc()
    assert len(removed) == 1
    assert driver.list() == [] and driver.gc() == []


def test_already_exists_and_not_found(driver: StorageDriver) -> None:
    """Duplicates raise AlreadyExists and missing things raise NotFound."""
    ref = _base_with_snapshot(driver)
    driver.clone(ref, BRANCHES, "b1", {})

    with pytest.raises(AlreadyExists):
        driver.create_volume(BASES, "shop", {})
    with pytest.raises(AlreadyExists):
        driver.snapshot(BASES, "shop", "v1")
    with pytest.raises(AlreadyExists):
        driver.clone(ref, BRANCHES, "b1", {})
    with pytest.raises(NotFound):
        driver.snapshot(BASES, "ghost", "v1")
    with pytest.raises(NotFound):
        driver.clone(SnapshotRef(BASES, "shop", "v9"), BRANCHES, "b2", {})
    with pytest.raises(NotFound):
        driver.set_meta(BRANCHES, "ghost", {"state": "ready"})
    assert sorted(_by_name(driver)) == ["bases/shop", "branches/b1"]


def test_gc_removes_an_interrupted_clone(driver: StorageDriver) -> None:
    """What a crash mid-clone leaves is invisible to list() and removed by gc()."""
    ref = _base_with_snapshot(driver)
    leave_leftovers(driver, ref)

    assert sorted(_by_name(driver)) == ["bases/shop"]
    removed = driver.gc()

    torn = ["branches/torn"] if isinstance(driver, BtrfsDriver) else []
    assert sorted(r for r in removed if r.startswith("branches/")) == ["branches/half", *torn]
    assert len(removed) == 2 + len(torn)
    assert driver.gc() == []
    driver.clone(ref, BRANCHES, "half", {})  # the name is usable again


def test_fresh_instance_rebuilds_inventory(driver: StorageDriver) -> None:
    """A new driver instance on the same pool lists exactly the same inventory."""
    ref = _base_with_snapshot(driver)
    driver.clone(ref, BRANCHES, "b1", {"state": "ready", "labels": "{}"})
    driver.snapshot(BRANCHES, "b1", "c-b2")
    before = driver.list()

    assert reopen(driver).list() == before and len(before) == 2


def test_usage_counts_written_bytes(driver: StorageDriver) -> None:
    """usage() is a non-negative byte count and pool_usage() a sane pair."""
    path = driver.clone(_base_with_snapshot(driver), BRANCHES, "b1", {})
    _write(path, "big", "x" * (1 << 20))
    os.sync()

    assert driver.usage(BRANCHES, "b1") >= 0
    pool = driver.pool_usage()
    assert 0 < pool.used_bytes <= pool.total_bytes
    with pytest.raises(NotFound):
        driver.usage(BRANCHES, "ghost")


def test_check_rejects_storage_of_the_wrong_kind(driver: StorageDriver) -> None:
    """check() refuses storage that is not its filesystem and says what it found."""
    misplaced, found = misplaced_like(driver)

    with pytest.raises(StorageError, match=found):
        misplaced.check()


def test_full_pool_raises_resource_exhausted(tiny_driver: StorageDriver) -> None:
    """On a full pool, creating and cloning raise ResourceExhausted and leave nothing behind."""
    tiny_driver.check()
    tiny_driver.ensure_layout()
    ref = _base_with_snapshot(tiny_driver)
    fill = tiny_driver.create_volume(BRANCHES, "fill", {})
    assert _fill(fill / "fill") == errno.ENOSPC

    with pytest.raises(ResourceExhausted):
        tiny_driver.clone(ref, BRANCHES, "b1", {"state": "creating"})
    with pytest.raises(ResourceExhausted):
        tiny_driver.create_volume(BASES, "more", {"state": "creating"})
    assert sorted(_by_name(tiny_driver)) == ["bases/shop", "branches/fill"]

