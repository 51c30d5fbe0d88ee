"""The storage-driver conformance suite: one set of tests, run unchanged
against every driver flavour on real pools. Each flavour (tests/fix_storage.py)
says how to make, reopen and misplace its driver and what a crash leaves; what
a driver can do is read from its capability flags, never from its class."""

from __future__ import annotations

import errno
import os
import time
from pathlib import Path

import pytest

from cowbranchd.errors import AlreadyExists, NotFound, ResourceExhausted, StorageError
from cowbranchd.storage.base import Kind, SnapshotRef, StorageDriver, Volume
from tests.fix_storage import Flavour, tool_shim

BASES, BRANCHES = Kind.BASES, Kind.BRANCHES
_WRITTEN = 8 << 20


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


def _base_with_snapshot(
    flavour: Flavour, driver: StorageDriver, text: bytes = b"v1"
) -> SnapshotRef:
    path = driver.create_volume(BASES, "shop", {"state": "ready"})
    flavour.write(path, "table", text)
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


def test_clone_sees_snapshot_and_is_isolated(flavour: Flavour, driver: StorageDriver) -> None:
    """A clone sees the data as of its snapshot; its writes reach neither the
    source nor a sibling clone."""
    ref = _base_with_snapshot(flavour, driver, b"at snapshot")
    base = driver.list()[0].path
    flavour.write(base, "table", b"after snapshot")

    one = driver.clone(ref, BRANCHES, "one", {"state": "ready"})
    two = driver.clone(ref, BRANCHES, "two", {})
    flavour.write(one, "table", b"written in one")

    seen = [flavour.read(volume, "table") for volume in (base, one, two)]
    assert seen == [b"after snapshot", b"written in one", b"at snapshot"]
    listed = _by_name(driver)
    assert listed["branches/one"].origin == ref
    assert listed["branches/one"].meta == {"state": "ready"}
    assert listed["branches/two"].meta == {}
    assert listed["bases/shop"].snapshots == ("v1",)


def test_clone_of_a_clone(flavour: Flavour, driver: StorageDriver) -> None:
    """A snapshot of a branch can be cloned again, and records that branch as origin."""
    one = driver.clone(_base_with_snapshot(flavour, driver), BRANCHES, "one", {})
    flavour.write(one, "table", b"branch one")
    ref = driver.snapshot(BRANCHES, "one", "c-two")
    flavour.write(one, "table", b"branch one later")

    two = driver.clone(ref, BRANCHES, "two", {"parent": "branches/one"})

    assert flavour.read(two, "table") == b"branch one"
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


def test_destroy_removes_snapshots(flavour: Flavour, driver: StorageDriver) -> None:
    """Destroying a volume takes its snapshots with it; its name is free again."""
    ref = _base_with_snapshot(flavour, driver)
    driver.snapshot(BASES, "shop", "v2")

    driver.destroy(BASES, "shop")

    assert driver.list() == []
    with pytest.raises(NotFound):
        driver.clone(ref, BRANCHES, "b1", {})
    driver.create_volume(BASES, "shop", {})
    driver.snapshot(BASES, "shop", "v1")  # no stale snapshot of that name survived


def test_destroy_volume_whose_snapshot_has_a_clone(
    flavour: Flavour, driver: StorageDriver
) -> None:
    """A volume whose snapshot has a clone leaves the inventory at once, but the
    snapshot stays, under its name, for as long as a clone came from it: it is
    that clone's reset source. gc() removes it once the clone is gone."""
    ref = _base_with_snapshot(flavour, driver, b"kept")
    clone = driver.clone(ref, BRANCHES, "b1", {})
    if driver.clones_pin_snapshots:
        assert _by_name(driver)["bases/shop"].busy_snapshots == ("v1",)
        assert driver.destroy_snapshot(ref) is False

    driver.destroy(BASES, "shop")

    assert list(_by_name(driver)) == ["branches/b1"]
    assert flavour.read(clone, "table") == b"kept"
    assert driver.gc() == []  # the clone still needs it
    again = driver.clone(ref, BRANCHES, "b1-reset", {})  # a reset of b1 clones it anew
    assert flavour.read(again, "table") == b"kept"
    driver.destroy(BRANCHES, "b1-reset")
    driver.destroy(BRANCHES, "b1")
    removed = driver.gc()
    assert len(removed) == 1
    assert driver.list() == [] and driver.gc() == []


def test_already_exists_and_not_found(flavour: Flavour, driver: StorageDriver) -> None:
    """Duplicates raise AlreadyExists and missing things raise NotFound."""
    ref = _base_with_snapshot(flavour, driver)
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


def test_gc_removes_an_interrupted_clone(flavour: Flavour, driver: StorageDriver) -> None:
    """What a crash mid-clone leaves is invisible to list() and removed by gc()."""
    ref = _base_with_snapshot(flavour, driver)
    unreadable = flavour.leave_leftovers(driver, ref)

    assert sorted(_by_name(driver)) == ["bases/shop"]
    removed = driver.gc()

    assert "half" in unreadable
    assert sorted(r for r in removed if r.startswith("branches/")) == sorted(
        f"branches/{name}" for name in unreadable
    )
    assert len(removed) == 1 + len(unreadable)  # and the staged copy
    assert driver.gc() == []
    driver.clone(ref, BRANCHES, "half", {})  # the name is usable again


def test_fresh_instance_rebuilds_inventory(flavour: Flavour, driver: StorageDriver) -> None:
    """A new driver instance on the same pool lists exactly the same inventory."""
    ref = _base_with_snapshot(flavour, driver)
    driver.clone(ref, BRANCHES, "b1", {"state": "ready", "labels": "{}"})
    driver.snapshot(BRANCHES, "b1", "c-b2")
    before = driver.list()

    assert flavour.open(driver.location).list() == before and len(before) == 2


def test_usage_counts_written_bytes(flavour: Flavour, driver: StorageDriver) -> None:
    """usage() of a clone grows by (at least most of) what was written into it,
    once written back; pool_usage() is a sane pair; a missing volume is NotFound."""
    path = driver.clone(_base_with_snapshot(flavour, driver), BRANCHES, "b1", {})
    os.sync()
    before = driver.usage(BRANCHES, "b1")
    # Incompressible, so no filesystem can store it in less than it is.
    flavour.write(path, "big", os.urandom(_WRITTEN))
    os.sync()

    # ZFS accounts written data when its transaction group commits (seconds
    # on zfs-fuse, whatever sync says): wait for it, with a deadline.
    grown = driver.usage(BRANCHES, "b1") - before
    deadline = time.monotonic() + 60
    while grown < _WRITTEN * 3 // 4 and time.monotonic() < deadline:
        time.sleep(0.2)
        grown = driver.usage(BRANCHES, "b1") - before
    assert grown >= _WRITTEN * 3 // 4, f"usage grew by {grown} after writing {_WRITTEN}"
    pool = driver.pool_usage()
    assert 0 < pool.used_bytes <= pool.total_bytes
    with pytest.raises(NotFound):
        driver.usage(BRANCHES, "ghost")


@pytest.mark.parametrize("exit_code", [1, 127], ids=["tool-fails", "tool-missing"])
def test_usage_raises_when_it_cannot_tell(
    driver: StorageDriver,
    exit_code: int,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    request: pytest.FixtureRequest,
) -> None:
    """usage() raises StorageError when the filesystem cannot say (its tool
    fails, or is gone): never a made-up 0 that reads as "nothing written"."""
    driver.create_volume(BRANCHES, "b1", {})
    shims = tool_shim(tmp_path / "bin", exit_code)
    if exit_code == 127:  # "command not found": no tool on PATH at all
        for tool in ("btrfs", "zfs"):
            (shims / tool).unlink()
        monkeypatch.setenv("PATH", str(shims))
    else:
        monkeypatch.setenv("PATH", f"{shims}:{os.environ['PATH']}")

    with pytest.raises(StorageError):
        driver.usage(BRANCHES, "b1")


def test_check_rejects_storage_of_the_wrong_kind(
    flavour: Flavour, driver: StorageDriver
) -> None:
    """check() refuses storage that is not its filesystem and says what it found."""
    location, found = flavour.misplaced()

    with pytest.raises(StorageError, match=found):
        flavour.open(location).check()


def test_full_pool_raises_resource_exhausted(
    flavour: Flavour, tiny_driver: StorageDriver
) -> None:
    """On a full pool, creating and cloning raise ResourceExhausted and leave nothing behind."""
    tiny_driver.check()
    tiny_driver.ensure_layout()
    ref = _base_with_snapshot(flavour, tiny_driver)
    fill = tiny_driver.create_volume(BRANCHES, "fill", {})
    assert _fill(fill / "fill") == errno.ENOSPC

    with pytest.raises(ResourceExhausted):
        tiny_driver.clone(ref, BRANCHES, "b1", {"state": "creating"})
    with pytest.raises(ResourceExhausted):
        tiny_driver.create_volume(BASES, "more", {"state": "creating"})
    assert sorted(_by_name(tiny_driver)) == ["bases/shop", "branches/fill"]

