"""The pytest plugin: its pure rules, then whole pytest runs (pytester, in a
subprocess) against a real daemon: passing and failing tests, keep-failed,
factories and markers, the session branch, xdist, and an unreachable daemon."""

from __future__ import annotations

import re
import uuid
from pathlib import Path

import pytest

from cowbranchd.client import Client, NotFound
from cowbranchd.pytest_plugin.rules import branch_id_for, ci_labels, marker_args
from tests.fix_daemon import DaemonHandle

pytest_plugins = ["pytester"]

BRANCH_ID = re.compile(r"^[a-z][a-z0-9-]{0,62}$")


# -- pure rules -------------------------------------------------------------------


def test_branch_ids_are_valid_and_carry_worker_run_and_serial() -> None:
    """Generated ids are valid branch ids made of worker, run id, serial and a name hint."""
    assert (
        branch_id_for("gw1", "ab12cd34", 7, "test_items[1-x]") == "pt-gw1-ab12cd34-7-test-items-1-x"
    )
    long = branch_id_for("gw12", "ab12cd34", 123456, "test_" + "x" * 200)
    assert BRANCH_ID.match(long)
    assert long.startswith("pt-gw12-ab12cd34-123456-")
    assert BRANCH_ID.match(branch_id_for("main", "0123", 0, "___"))


def test_ci_labels_from_github_and_gitlab() -> None:
    """CI variables become ci.provider, ci.pipeline, ci.job and ci.pr labels."""
    github = {
        "GITHUB_ACTIONS": "true",
        "GITHUB_RUN_ID": "981",
        "GITHUB_JOB": "tests",
        "GITHUB_REF": "refs/pull/42/merge",
    }
    assert ci_labels(github) == {
        "ci.provider": "github",
        "ci.pipeline": "981",
        "ci.job": "tests",
        "ci.pr": "42",
    }
    gitlab = {"GITLAB_CI": "true", "CI_PIPELINE_ID": "77", "CI_JOB_ID": "5"}
    assert ci_labels(gitlab) == {"ci.provider": "gitlab", "ci.pipeline": "77", "ci.job": "5"}
    assert ci_labels({}) == {}


def test_marker_arguments_are_checked() -> None:
    """The marker takes parent (also positionally), settings, labels and ttl, nothing else."""
    args = marker_args(("bases/shop",), {"settings": {"work_mem": "8MB"}})
    assert (args.parent, args.settings, args.labels) == ("bases/shop", {"work_mem": "8MB"}, {})
    with pytest.raises(TypeError, match="unknown argument"):
        marker_args((), {"parnet": "bases/shop"})
    with pytest.raises(TypeError, match="parent once"):
        marker_args(("bases/a",), {"parent": "bases/b"})


# -- whole runs -------------------------------------------------------------------


def _options(daemon: DaemonHandle, *extra: str) -> list[str]:
    return [
        "--cowbranch-address",
        daemon.address,
        f"--cowbranch-parent=bases/{daemon.base}",
        "-p",
        "no:cacheprovider",
        *extra,
    ]


def _left(daemon: DaemonHandle, suite: str) -> list[str]:
    with Client(daemon.address) as client:
        return [b.name for b in client.list_branches({"suite": suite})]


PASS_AND_FAIL = """
import psycopg, pytest

pytestmark = pytest.mark.cowbranch(labels={{"suite": "{suite}"}})

def test_reads_the_base(cowbranch):
    with cowbranch.connect() as conn:
        assert conn.execute("select count(*) from items").fetchone() == (3,)

def test_writes_then_fails(cowbranch_dsn):
    with psycopg.connect(cowbranch_dsn) as conn:
        conn.execute("insert into items values (99, 'left for debugging')")
    assert False, "deliberate failure"
"""


def test_passing_and_failing_tests_leave_nothing(
    pytester: pytest.Pytester, daemon: DaemonHandle
) -> None:
    """Without keep-failed, both the passing and the failing test's branches are deleted."""
    suite = uuid.uuid4().hex[:8]
    pytester.makepyfile(PASS_AND_FAIL.format(suite=suite))
    result = pytester.runpytest_subprocess(*_options(daemon))
    result.assert_outcomes(passed=1, failed=1)
    assert "kept for" not in result.stdout.str()
    assert _left(daemon, suite) == []


def test_keep_failed_keeps_the_failed_branch_and_reports_its_dsn(
    pytester: pytest.Pytester, daemon: DaemonHandle
) -> None:
    """With keep-failed, a failed test's branch stays (ttl set, writes kept), its DSN shown."""
    suite = uuid.uuid4().hex[:8]
    pytester.makepyfile(PASS_AND_FAIL.format(suite=suite))
    result = pytester.runpytest_subprocess(*_options(daemon, "--cowbranch-keep-failed=2h"))
    result.assert_outcomes(passed=1, failed=1)
    [name] = _left(daemon, suite)
    with Client(daemon.address) as client:
        kept = client.get_branch(name)
        assert kept.expire_time is not None
        assert kept.labels["pytest.test"].endswith("test_writes_then_fails")
        with kept.connect() as conn:
            assert conn.execute("select count(*) from items").fetchone() == (4,)
        result.stdout.fnmatch_lines(
            [
                "*cowbranchd: branches kept for debugging*",
                f"{name} kept for 2h: {kept.dsn}",
                "*= cowbranchd =*",
                "branches of failed tests kept for debugging:",
            ]
        )
        client.delete_branch(name)


def test_factory_marker_and_labels(pytester: pytest.Pytester, daemon: DaemonHandle) -> None:
    """cowbranch_factory takes other parents, settings and labels; the marker sets defaults."""
    suite = uuid.uuid4().hex[:8]
    pytester.makepyfile(
        f"""
        import pytest

        @pytest.fixture
        def tuned(cowbranch_factory):
            return cowbranch_factory(
                "bases/{daemon.base}/versions/1",
                settings={{"work_mem": "7MB"}},
                labels={{"suite": "{suite}", "kind": "tuned"}},
            )

        def test_factory_branch(tuned, cowbranch_client):
            assert tuned.parent == "bases/{daemon.base}/versions/1"
            with tuned.connect() as conn:
                assert conn.execute("show work_mem").fetchone() == ("7MB",)
            labels = cowbranch_client.get_branch(tuned.name).labels
            assert labels["kind"] == "tuned"
            assert labels["pytest.test"].endswith("test_factory_branch")
            assert labels["pytest.worker"] == "main"
            assert "pytest.run" in labels

        @pytest.mark.cowbranch(settings={{"work_mem": "9MB"}}, labels={{"suite": "{suite}"}})
        def test_marker_settings(cowbranch):
            with cowbranch.connect() as conn:
                assert conn.execute("show work_mem").fetchone() == ("9MB",)

        @pytest.mark.cowbranch(labels={{"suite": "{suite}"}})
        def test_two_branches_differ(cowbranch, cowbranch_factory):
            other = cowbranch_factory()
            assert other.name != cowbranch.name and other.port != cowbranch.port
        """
    )
    result = pytester.runpytest_subprocess(*_options(daemon))
    result.assert_outcomes(passed=3)
    assert _left(daemon, suite) == []


def test_session_branch_is_shared_and_deleted_at_the_end(
    pytester: pytest.Pytester, daemon: DaemonHandle
) -> None:
    """cowbranch_session is one branch for the whole run, deleted when it ends."""
    pytester.makepyfile(
        """
        def test_first_writes(cowbranch_session):
            with cowbranch_session.connect() as conn:
                conn.execute("insert into items values (50, 'shared')")

        def test_second_sees_it(cowbranch_session, cowbranch_client):
            with cowbranch_session.connect() as conn:
                assert conn.execute("select count(*) from items").fetchone() == (4,)
            print("SESSION-BRANCH", cowbranch_session.name)
        """
    )
    result = pytester.runpytest_subprocess(*_options(daemon, "-s"))
    result.assert_outcomes(passed=2)
    [name] = re.findall(r"SESSION-BRANCH (branches/[a-z0-9-]+)", result.stdout.str())
    with Client(daemon.address) as client, pytest.raises(NotFound):
        client.get_branch(name)


def test_xdist_workers_get_distinct_branches(
    pytester: pytest.Pytester, daemon: DaemonHandle, tmp_path: Path
) -> None:
    """Under xdist with 2 workers, every test gets its own branch named after its worker."""
    suite = uuid.uuid4().hex[:8]
    names = tmp_path / "names.txt"
    pytester.makepyfile(
        f"""
        import os, pytest

        pytestmark = pytest.mark.cowbranch(labels={{"suite": "{suite}"}})

        @pytest.mark.parametrize("n", range(6))
        def test_isolated(cowbranch, n):
            worker = os.environ["PYTEST_XDIST_WORKER"]
            assert cowbranch.branch_id.startswith(f"pt-{{worker}}-")
            assert cowbranch.labels["pytest.worker"] == worker
            with cowbranch.connect() as conn:
                conn.execute("insert into items values (%s, 'mine')", (100 + n,))
                assert conn.execute("select count(*) from items").fetchone() == (4,)
            with open({str(names)!r}, "a") as out:
                out.write(cowbranch.name + "\\n")
        """
    )
    result = pytester.runpytest_subprocess(*_options(daemon, "-n", "2"))
    result.assert_outcomes(passed=6)
    written = names.read_text().split()
    assert len(set(written)) == 6
    assert _left(daemon, suite) == []


def test_unreachable_daemon_is_one_clear_error(pytester: pytest.Pytester, tmp_path: Path) -> None:
    """With no daemon, tests needing a branch error with one short line, others still pass."""
    address = f"unix://{tmp_path}/api.sock"
    pytester.makepyfile(
        """
        def test_needs_a_branch(cowbranch):
            pass

        def test_needs_a_dsn(cowbranch_dsn):
            pass

        def test_plain():
            pass
        """
    )
    result = pytester.runpytest_subprocess(
        "--cowbranch-address",
        address,
        "--cowbranch-parent=bases/demo",
        "-o",
        "cowbranch_connect_timeout=0.2",
    )
    result.assert_outcomes(passed=1, errors=2)
    reason = f"daemon not reachable at {address} — is the cowbranchd service running?"
    result.stdout.fnmatch_lines(
        [
            f"cowbranchd unreachable: {reason}",
            "*= cowbranchd =*",
            f"daemon unreachable (2 tests needing a branch): {reason}*",
        ]
    )
    assert "Traceback" not in result.stdout.str()


def test_unreachable_daemon_can_skip_instead(pytester: pytest.Pytester, tmp_path: Path) -> None:
    """cowbranch_unreachable=skip skips the tests needing a branch instead of erroring."""
    pytester.makepyfile("def test_needs_a_branch(cowbranch):\n    pass\n")
    result = pytester.runpytest_subprocess(
        f"--cowbranch-address=unix://{tmp_path}/api.sock",
        "--cowbranch-parent=bases/demo",
        "-o",
        "cowbranch_connect_timeout=0.2",
        "-o",
        "cowbranch_unreachable=skip",
    )
    result.assert_outcomes(skipped=1)


def test_missing_parent_says_how_to_set_one(
    pytester: pytest.Pytester, daemon: DaemonHandle
) -> None:
    """A test without a parent from option, ini or marker fails, saying how to give one."""
    pytester.makepyfile("def test_needs_a_branch(cowbranch):\n    pass\n")
    result = pytester.runpytest_subprocess("--cowbranch-address", daemon.address)
    result.assert_outcomes(errors=1)
    result.stdout.fnmatch_lines(["*no parent to branch from: pass --cowbranch-parent=bases/NAME*"])


def test_bad_keep_failed_is_a_usage_error(pytester: pytest.Pytester) -> None:
    """A keep-failed value that is not a duration stops the run before any test."""
    pytester.makepyfile("def test_x():\n    pass\n")
    result = pytester.runpytest_subprocess("--cowbranch-keep-failed=forever")
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    result.stderr.fnmatch_lines(["*cowbranch_keep_failed*not a duration*"])
