"""cowbranchctl: rendering and exit codes on their own, then every command in
table and JSON output against a real daemon."""

from __future__ import annotations

import json
import time
import uuid
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import psycopg
import pytest
from google.protobuf import duration_pb2

from cowbranchd import __version__
from cowbranchd.client import Branch
from cowbranchd.ctl import EXIT_FAILURE, EXIT_NOT_FOUND, EXIT_OK, EXIT_USAGE, main
from cowbranchd.ctl.render import branch_rows, format_bytes, key_values, table
from cowbranchd.v1 import branches_pb2
from tests.fix_daemon import DaemonHandle

NOW = datetime(2026, 1, 2, 12, 0, tzinfo=UTC)


def run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    """cowbranchctl `argv` in-process: exit code, stdout, stderr."""
    code = main(list(argv))
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def details(out: str) -> dict[str, str]:
    """A key/value block as `show` prints it."""
    return {k: v.strip() for k, v in (line.split(":", 1) for line in out.splitlines())}


def run_json(capsys: pytest.CaptureFixture[str], *argv: str) -> Any:
    """cowbranchctl `argv --output json`, which must succeed; its parsed document."""
    code, out, err = run(capsys, *argv, "--output", "json")
    assert code == EXIT_OK, err
    return json.loads(out)


# -- rendering ------------------------------------------------------------------


def test_table_aligns_columns_without_trailing_blanks() -> None:
    """Columns are as wide as their widest cell, two spaces apart."""
    assert table(("A", "LONGER"), [["xx", "1"], ["y", ""]]) == "A   LONGER\nxx  1\ny"


def test_key_values_align_values() -> None:
    """Key/value blocks align the values after the longest key."""
    assert key_values([("a", "1"), ("long", "2")]) == "a:     1\nlong:  2"


def test_format_bytes_uses_binary_units() -> None:
    """Sizes read as B, KiB, MiB, GiB."""
    assert [format_bytes(n) for n in (0, 512, 1536, 3 * 1024**3)] == [
        "0 B",
        "512 B",
        "1.5 KiB",
        "3.0 GiB",
    ]


def test_branch_rows_show_age_expiry_size_and_labels() -> None:
    """A branch row has id, state, parent, owner, port, age, expiry, written bytes and labels."""
    branch = Branch(
        name="branches/pr-7",
        parent="bases/shop/versions/3",
        state="READY",
        host="127.0.0.1",
        port=56010,
        user="postgres",
        password="pw",
        database="shop",
        socket_dir="/run/x",
        dsn="postgresql://x",
        labels={"team": "web", "pr": "7"},
        create_time=NOW - timedelta(minutes=5),
        expire_time=NOW + timedelta(hours=1, minutes=55, seconds=3),
        protected=True,
        written_bytes=2048,
        request_id="r",
        failure="",
        owner="ci",
    )
    assert branch_rows([branch], NOW) == [
        [
            "pr-7 (protected)",
            "READY",
            "bases/shop/versions/3",
            "ci",
            "56010",
            "5m",
            "in 1h55m",
            "2.0 KiB",
            "pr=7,team=web",
        ]
    ]


# -- exit codes without a daemon ------------------------------------------------


def test_version_needs_no_daemon(capsys: pytest.CaptureFixture[str]) -> None:
    """`version` prints the client version in both outputs and exits 0."""
    assert run(capsys, "version") == (EXIT_OK, f"cowbranchctl {__version__}\n", "")
    assert run_json(capsys, "version") == {"client_version": __version__}


@pytest.mark.parametrize(
    "argv",
    [
        ["frobnicate"],
        ["list", "--bogus"],
        ["create"],
        ["--output", "yaml", "list"],
        ["update", "x", "--ttl", "1h", "--no-expiry"],
    ],
)
def test_bad_usage_exits_2(capsys: pytest.CaptureFixture[str], argv: list[str]) -> None:
    """Unknown commands, flags, missing or conflicting arguments exit 2."""
    assert run(capsys, *argv)[0] == EXIT_USAGE


def test_bad_duration_or_label_exits_2_before_calling(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    """A bad --ttl, --idle-suspend or -l is a usage error (2), found before any
    call to the daemon; a bad --idle-suspend is named."""
    address = f"unix://{tmp_path}/none.sock"
    code, _, err = run(capsys, "--address", address, "create", "bases/x", "--ttl", "soon")
    assert (code, "ttl" in err) == (EXIT_USAGE, True)
    for bad in ("soon", "-5m", "1h30"):
        code, out, err = run(
            capsys, "--address", address, "create", "bases/x", f"--idle-suspend={bad}"
        )
        assert (code, out, err.splitlines()) == (
            EXIT_USAGE,
            "",
            [
                f"cowbranchctl: error: --idle-suspend: {bad!r} is not a duration; "
                "use e.g. 90s, 30m, 2h, 1d or 1h30m"
            ],
        )
    assert run(capsys, "--address", address, "create", "bases/x", "-l", "novalue")[0] == EXIT_USAGE
    assert run(capsys, "--address", address, "delete")[0] == EXIT_USAGE


def test_unreachable_daemon_exits_1_with_advice(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    """No daemon at the address: exit 1 and a message saying what to check."""
    address = f"unix://{tmp_path}/none.sock"
    code, out, err = run(capsys, "list", "--address", address, "--wait", "0.2")
    assert (code, out) == (EXIT_FAILURE, "")
    assert err.startswith(
        f"cowbranchctl: error: daemon not reachable at {address} — "
        "is the cowbranchd service running?"
    )


# -- every command against a real daemon ------------------------------------------


@pytest.fixture
def ctl(
    daemon: DaemonHandle, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> pytest.CaptureFixture[str]:
    """capsys, with COWBRANCHD_ADDRESS pointing cowbranchctl at the test daemon."""
    monkeypatch.setenv("COWBRANCHD_ADDRESS", daemon.address)
    return capsys


def test_branch_commands_in_json(ctl: pytest.CaptureFixture[str], daemon: DaemonHandle) -> None:
    """create, show, list, update, reset and delete print the documented JSON documents."""
    run_id = uuid.uuid4().hex[:8]
    created = run_json(ctl, "create", f"bases/{daemon.base}", "-l", f"run={run_id}", "--ttl", "1h")
    assert (created["state"], created["labels"]) == ("READY", {"run": run_id})
    assert created["expire_time"] is not None
    with psycopg.connect(created["connection"]["dsn"]) as conn:
        assert conn.execute("select count(*) from items").fetchone() == (3,)
    name = created["name"]
    assert run_json(ctl, "show", created["branch_id"])["name"] == name
    assert [b["name"] for b in run_json(ctl, "list", "-l", f"run={run_id}")] == [name]
    updated = run_json(ctl, "update", name, "-l", "extra=yes", "--no-expiry", "--protect")
    assert (updated["labels"], updated["expire_time"], updated["protected"]) == (
        {"extra": "yes", "run": run_id},
        None,
        True,
    )
    removed = run_json(ctl, "update", name, "--remove-label", "extra", "--unprotect")
    assert (removed["labels"], removed["protected"]) == ({"run": run_id}, False)
    assert run_json(ctl, "reset", name)["connection"] == created["connection"]
    assert run_json(ctl, "delete", name) == {"deleted": [name], "missing": []}
    assert run_json(ctl, "list", "--selector", f"run={run_id}") == []


def test_freeze_makes_a_template_children_clone(
    ctl: pytest.CaptureFixture[str], daemon: DaemonHandle
) -> None:
    """`freeze` leaves the branch SUSPENDED and frozen; a child created from
    it has its data as frozen; `reset` of a template fails naming why."""
    run_id = uuid.uuid4().hex[:8]
    tpl = run_json(ctl, "create", f"bases/{daemon.base}", "-l", f"run={run_id}")
    with psycopg.connect(tpl["connection"]["dsn"], autocommit=True) as conn:
        conn.execute("INSERT INTO items VALUES (42, 'frozen')")
    frozen = run_json(ctl, "freeze", tpl["name"])
    assert (frozen["state"], frozen["frozen"]) == ("SUSPENDED", True)
    code, out, _ = run(ctl, "show", tpl["name"])
    assert code == EXIT_OK and "frozen:" in out and "yes (a template" in out
    child = run_json(ctl, "create", tpl["name"], "-l", f"run={run_id}")
    with psycopg.connect(child["connection"]["dsn"]) as conn:
        assert conn.execute("SELECT max(id) FROM items").fetchone() == (42,)
    code, _, err = run(ctl, "reset", tpl["name"])
    assert code != EXIT_OK and "is frozen" in err
    assert run(ctl, "delete", "--selector", f"run={run_id}")[0] == EXIT_OK


def test_branch_commands_in_tables(ctl: pytest.CaptureFixture[str], daemon: DaemonHandle) -> None:
    """The same commands print aligned tables and key/value blocks for people."""
    run_id = uuid.uuid4().hex[:8]
    code, out, _ = run(ctl, "create", f"bases/{daemon.base}", "-l", f"run={run_id}")
    assert code == EXIT_OK
    fields = dict(line.split(":", 1) for line in out.splitlines())
    name = fields["name"].strip()
    assert (fields["state"].strip(), fields["labels"].strip()) == ("READY", f"run={run_id}")
    code, out, _ = run(ctl, "show", name, "--dsn-only")
    assert (code, out.strip()) == (EXIT_OK, fields["dsn"].strip())
    code, out, _ = run(ctl, "list", "-l", f"run={run_id}")
    header, row = out.splitlines()
    assert header.split() == [
        "BRANCH",
        "STATE",
        "PARENT",
        "OWNER",
        "PORT",
        "AGE",
        "EXPIRES",
        "WRITTEN",
        "LABELS",
    ]
    assert row.startswith(name.removeprefix("branches/"))
    assert header.index("STATE") == row.index("READY")
    code, out, _ = run(ctl, "update", name, "--ttl", "30m")
    expires = dict(line.split(":", 1) for line in out.splitlines())["expires"].strip()
    assert expires.startswith("in ")
    assert run(ctl, "reset", name)[0] == EXIT_OK
    assert run(ctl, "delete", "--selector", f"run={run_id}") == (EXIT_OK, f"deleted {name}\n", "")
    assert run(ctl, "list", "-l", f"run={run_id}") == (EXIT_OK, "no branches\n", "")


def test_create_idle_suspend_sets_it_and_show_says_suspended(
    ctl: pytest.CaptureFixture[str], daemon: DaemonHandle
) -> None:
    """`create --idle-suspend 1s` makes a branch whose GetBranch has that
    idle_suspend and which `show` reports SUSPENDED once idle, with its
    idle_suspend; `0` (never) leaves it unset; a value the daemon refuses is a
    usage error naming it."""
    created = run_json(ctl, "create", f"bases/{daemon.base}", "--idle-suspend", "1s")
    never = run_json(ctl, "create", f"bases/{daemon.base}", "--idle-suspend", "0")
    with daemon.channel() as channel:
        stub = daemon.branches(channel)
        got = stub.GetBranch(branches_pb2.GetBranchRequest(name=created["name"]), timeout=30)
        unset = stub.GetBranch(branches_pb2.GetBranchRequest(name=never["name"]), timeout=30)
    assert got.idle_suspend.ToTimedelta() == timedelta(seconds=1)
    assert not unset.HasField("idle_suspend")
    for _ in range(600):
        code, out, _ = run(ctl, "show", created["name"])
        if details(out)["state"] == "SUSPENDED":
            break
        time.sleep(0.1)
    shown = details(out)
    assert (code, shown["state"], shown["idle_suspend"]) == (EXIT_OK, "SUSPENDED", "1s")
    code, _, err = run(ctl, "create", f"bases/{daemon.base}", "--idle-suspend", "0.5s")
    assert (code, err) == (
        EXIT_USAGE,
        "cowbranchctl: error: idle_suspend: must be zero (never) or at least 1s\n",
    )
    assert run(ctl, "delete", created["name"], never["name"])[0] == EXIT_OK


def test_update_idle_suspend_sets_and_clears_it(
    ctl: pytest.CaptureFixture[str], daemon: DaemonHandle
) -> None:
    """`update --idle-suspend` sets a branch's idle_suspend and `0` clears it
    (never), as GetBranch and `show` then say; a bad value is a usage error
    naming the flag, and changes nothing."""
    name = run_json(ctl, "create", f"bases/{daemon.base}")["name"]

    def idle_suspend() -> duration_pb2.Duration | None:
        with daemon.channel() as channel:
            got = daemon.branches(channel).GetBranch(
                branches_pb2.GetBranchRequest(name=name), timeout=30
            )
        return got.idle_suspend if got.HasField("idle_suspend") else None

    assert details(run(ctl, "show", name)[1])["idle_suspend"] == "never"
    code, out, _ = run(ctl, "update", name, "--idle-suspend", "1h30m")
    assert (code, details(out)["idle_suspend"]) == (EXIT_OK, "1h30m")
    set_to = idle_suspend()
    assert set_to is not None and set_to.ToTimedelta() == timedelta(hours=1, minutes=30)
    assert run(ctl, "update", name, "--idle-suspend", "later") == (
        EXIT_USAGE,
        "",
        "cowbranchctl: error: --idle-suspend: 'later' is not a duration; "
        "use e.g. 90s, 30m, 2h, 1d or 1h30m\n",
    )
    assert idle_suspend() == set_to
    code, out, _ = run(ctl, "update", name, "--idle-suspend", "0")
    assert (code, details(out)["idle_suspend"]) == (EXIT_OK, "never")
    assert idle_suspend() is None
    assert run(ctl, "delete", name)[0] == EXIT_OK


def test_not_found_exits_3(ctl: pytest.CaptureFixture[str], daemon: DaemonHandle) -> None:
    """show, reset and delete of a missing branch exit 3; --allow-missing makes delete succeed."""
    for argv in (["show", "nope"], ["reset", "nope"], ["base", "show", "nope"]):
        code, out, err = run(ctl, *argv)
        assert (code, out, err.startswith("cowbranchctl: error:")) == (EXIT_NOT_FOUND, "", True)
    code, out, _ = run(ctl, "delete", "nope", "--output", "json")
    assert (code, json.loads(out)) == (
        EXIT_NOT_FOUND,
        {"deleted": [], "missing": ["nope"]},
    )
    assert run(ctl, "delete", "nope", "--allow-missing")[0] == EXIT_OK


def test_invalid_argument_from_the_daemon_exits_2(
    ctl: pytest.CaptureFixture[str], daemon: DaemonHandle
) -> None:
    """A branch id the daemon refuses is a usage error (2) naming the problem."""
    code, _, err = run(ctl, "create", f"bases/{daemon.base}", "--id", "Bad_Id")
    assert (code, err.startswith("cowbranchctl: error:")) == (EXIT_USAGE, True)


def test_status_in_both_outputs(ctl: pytest.CaptureFixture[str], daemon: DaemonHandle) -> None:
    """status shows health, base and branch counts, the daemon's version and pool
    usage; JSON has the documented keys."""
    document = run_json(ctl, "status")
    assert document["health"] == {"daemon": "SERVING", "branch_service": "SERVING"}
    assert document["address"] == daemon.address
    assert set(document) == {
        "address",
        "health",
        "bases",
        "branches",
        "branches_by_state",
        "base_bytes",
        "written_bytes",
        "daemon",
    }
    assert document["bases"] >= 1
    assert document["daemon"]["driver"] == "btrfs"
    assert document["daemon"]["pool"] == daemon.pool_root
    assert 0 < document["daemon"]["pool_used_bytes"] < document["daemon"]["pool_total_bytes"]
    assert document["daemon"]["isolation"] == "uid"
    assert document["daemon"]["warnings"] == []
    code, out, _ = run(ctl, "status")
    assert code == EXIT_OK
    assert [line.split(":")[0] for line in out.splitlines()] == [
        "address",
        "health",
        "bases",
        "branches",
        "written",
        "daemon",
        "pool",
        "isolation",
        "caller",
        "pool used",
        "capacity",
    ]


def test_base_commands_in_both_outputs(
    ctl: pytest.CaptureFixture[str], daemon: DaemonHandle, tmp_path: Path
) -> None:
    """base create/list/show/version/delete work in JSON and in tables."""
    base_id = f"c-{uuid.uuid4().hex[:8]}"
    sql = tmp_path / "init.sql"
    sql.write_text("create table t (id int);")
    created = run_json(ctl, "base", "create", base_id, "--init-sql-file", str(sql), "-l", "k=v")
    assert (created["name"], created["labels"], len(created["versions"])) == (
        f"bases/{base_id}",
        {"k": "v"},
        1,
    )
    assert base_id in [b["base_id"] for b in run_json(ctl, "base", "list")]
    code, out, _ = run(ctl, "base", "list")
    assert out.splitlines()[0].split() == [
        "BASE",
        "PG",
        "LATEST",
        "VERSIONS",
        "BRANCHES",
        "SIZE",
        "AGE",
        "LABELS",
    ]
    assert any(line.startswith(base_id + " ") for line in out.splitlines())
    assert run(ctl, "base", "version", base_id) == (
        EXIT_OK,
        f"created bases/{base_id}/versions/2\n",
        "",
    )
    assert run_json(ctl, "base", "version", base_id)["version"] == 3
    code, out, _ = run(ctl, "base", "show", base_id)
    assert code == EXIT_OK
    assert out.splitlines()[0] == f"name:        bases/{base_id}"
    assert f"bases/{base_id}/versions/3" in out
    assert [v["version"] for v in run_json(ctl, "base", "show", base_id)["versions"]] == [1, 2, 3]
    assert run(ctl, "base", "delete", base_id) == (EXIT_OK, f"deleted bases/{base_id}\n", "")
    assert run(ctl, "base", "delete", base_id)[0] == EXIT_NOT_FOUND


def test_create_at_takes_an_iso_time_and_only_for_followed_bases(
    ctl: pytest.CaptureFixture[str], daemon: DaemonHandle
) -> None:
    """`create --at` parses an ISO 8601 time here (a bad one is a usage error
    naming the option); the daemon refuses `at` on a base that is not
    followed, naming it."""
    code, _, err = run(ctl, "create", f"bases/{daemon.base}", "--at", "yesterday")
    assert code == EXIT_USAGE and "--at" in err and "'yesterday'" in err
    code, _, err = run(ctl, "create", f"bases/{daemon.base}", "--at", "2026-01-01T00:00:00Z")
    assert code == EXIT_USAGE, err
    assert "at" in err and "follow" in err
