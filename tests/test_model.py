"""Pure logic: ids, parents, labels, selectors, TTLs and metadata round trips."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest

from cowbranchd.errors import InvalidArgument
from cowbranchd.model import (
    BaseRecord,
    BranchRecord,
    Parent,
    Selector,
    State,
    parse_parent,
    validate_id,
    validate_labels,
    validate_ttl,
)


@pytest.mark.parametrize("good", ["a", "shop", "pr-123", "a" * 63, "x0-"])
def test_valid_ids_pass(good: str) -> None:
    """Ids of 1-63 lowercase letters, digits and dashes starting with a letter are accepted."""
    assert validate_id("branch_id", good) == good


@pytest.mark.parametrize("bad", ["", "A", "1abc", "-a", "a_b", "a" * 64, "../x", "a/b", "é", "a b"])
def test_invalid_ids_name_the_field(bad: str) -> None:
    """Anything else is InvalidArgument naming the field."""
    with pytest.raises(InvalidArgument) as info:
        validate_id("branch_id", bad)
    assert info.value.field == "branch_id"
    assert str(info.value).startswith("branch_id: ")


def test_parents_parse_to_their_kind() -> None:
    """The three parent forms parse; their canonical text round-trips."""
    assert parse_parent("parent", "bases/shop") == Parent(base="shop")
    assert parse_parent("parent", "bases/shop/versions/3") == Parent(base="shop", version=3)
    assert parse_parent("parent", "branches/x") == Parent(branch="x")
    for text in ("bases/shop", "bases/shop/versions/3", "branches/x"):
        assert str(parse_parent("parent", text)) == text


@pytest.mark.parametrize(
    "bad",
    [
        "",
        "shop",
        "bases/",
        "bases/shop/versions/0",
        "bases/shop/versions/x",
        "bases/shop/versions/3/extra",
        "branches/../x",
        "snapshots/a",
    ],
)
def test_bad_parents_are_rejected(bad: str) -> None:
    """Malformed parents are InvalidArgument on the parent field."""
    with pytest.raises(InvalidArgument) as info:
        parse_parent("parent", bad)
    assert info.value.field == "parent"


def test_selectors_match_all_terms() -> None:
    """A selector matches only when every term holds."""
    sel = Selector.parse("team=web, pr!=7, ci, !keep")
    assert sel.matches({"team": "web", "pr": "8", "ci": "1"})
    assert not sel.matches({"team": "web", "pr": "7", "ci": "1"})
    assert not sel.matches({"team": "web", "ci": "1", "keep": "y"})
    assert not sel.matches({"team": "api", "ci": "1"})
    assert Selector.parse("").matches({})


@pytest.mark.parametrize("bad", ["a=b,,c", "=b", "a=(x)", "A=b", "a!=b c", "x" * 5000])
def test_bad_selectors_are_rejected(bad: str) -> None:
    """Malformed selectors name the label_selector field."""
    with pytest.raises(InvalidArgument) as info:
        Selector.parse(bad)
    assert info.value.field == "label_selector"


def test_labels_and_ttl_limits() -> None:
    """Labels are bounded in count, key and value; TTLs are non-negative and at most a year."""
    assert validate_labels("labels", {"pr": "123", "node": "tests/a.py::t"}) == {
        "pr": "123",
        "node": "tests/a.py::t",
    }
    for bad in ({"K": "v"}, {"k": "v" * 64}, {"k": "sp ace"}, {f"k{i}": "" for i in range(33)}):
        with pytest.raises(InvalidArgument):
            validate_labels("labels", bad)
    assert validate_ttl("ttl", timedelta(0)) is None
    assert validate_ttl("ttl", timedelta(hours=1)) == timedelta(hours=1)
    for bad_ttl in (timedelta(seconds=-1), timedelta(days=366)):
        with pytest.raises(InvalidArgument):
            validate_ttl("ttl", bad_ttl)


def test_records_round_trip_through_storage_metadata() -> None:
    """Branch and base records survive the str->str metadata kept on storage."""
    created = datetime(2026, 1, 2, 3, 4, 5, tzinfo=UTC)
    branch = BranchRecord(
        branch_id="b",
        base_id="shop",
        parent="bases/shop/versions/2",
        source_snapshot="bases/shop@v2",
        state=State.READY,
        create_time=created,
        port=54001,
        labels={"pr": "1"},
        expire_time=created + timedelta(hours=1),
        protected=True,
        request_id="r-1",
        settings={"work_mem": "8MB"},
    )
    meta = branch.to_meta()
    assert all(isinstance(v, str) for v in meta.values())
    assert BranchRecord.from_meta("b", meta) == branch
    base = BaseRecord(
        base_id="shop",
        state=State.READY,
        create_time=created,
        pg_version=15,
        user="postgres",
        password="pw",
        database="shop",
        labels={},
        versions={1: created, 2: created},
    )
    assert BaseRecord.from_meta("shop", base.to_meta()) == base
    assert base.latest_version == 2
