"""pytest plugin of cowbranchd: a real, production-shaped PostgreSQL branch per
test, in milliseconds. Registered through the `pytest11` entry point.

Options (command line, else ini): `--cowbranch-address`, `--cowbranch-parent`,
`--cowbranch-keep-failed=DURATION`; ini only: `cowbranch_ttl`,
`cowbranch_unreachable`, `cowbranch_connect_timeout`, and for templates by
migration hash (templates.py) `cowbranch_migrate`, `cowbranch_migrate_files`,
`cowbranch_template_max_age`, `cowbranch_template_timeout`. Fixtures: `cowbranch`,
`cowbranch_dsn`, `cowbranch_session`, `cowbranch_factory`,
`cowbranch_session_factory`, `cowbranch_client`. Marker:
`@pytest.mark.cowbranch(parent=..., settings=..., labels=..., ttl=...)`.

Nothing happens (no import of grpc, no connection) until a test asks for one
of the fixtures. See docs/clients.md for the full reference.
"""

from __future__ import annotations

import contextlib
import itertools
import os
import time
import uuid
from collections.abc import Callable, Generator, Iterator, Mapping
from dataclasses import dataclass, field
from datetime import timedelta
from typing import TYPE_CHECKING, Any

import pytest

if TYPE_CHECKING:
    from cowbranchd.client import Branch, Client

    from .templates import Templates

__all__ = ["BranchFactory"]

_OPTIONS = {
    # name: (help, default)
    "address": ("cowbranchd address (default: $COWBRANCHD_ADDRESS, else the local socket)", ""),
    "parent": ("what test branches come from: bases/BASE, bases/BASE/versions/N, branches/ID", ""),
    "keep_failed": ("keep a failed test's branch alive this long (e.g. 2h) and show its DSN", ""),
}
_INI_ONLY = {
    "ttl": ("safety ttl of every test branch, so a killed run leaks nothing (0: none)", "1h"),
    "unreachable": (
        "daemon unreachable: 'error' the tests needing a branch, or 'skip' them",
        "error",
    ),
    "connect_timeout": ("seconds to keep retrying an unavailable daemon at the first use", "10"),
    "migrate": (
        "'package.module:function' migrating a template branch (called with its DSN): tests "
        "then branch from a template per hash of parent version and cowbranch_migrate_files",
        "",
    ),
    "template_max_age": ("delete templates unused for this long (0: never)", "7d"),
    "template_timeout": (
        "how long a template may stay 'building' before waiters rebuild it",
        "10m",
    ),
}
_BRANCHES = pytest.StashKey[list["Branch"]]()
_REPORTS = pytest.StashKey[dict[str, pytest.TestReport]]()
_UNREACHABLE = pytest.StashKey[str]()
_STATE = pytest.StashKey["_State"]()


def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup("cowbranchd", "cowbranchd: a PostgreSQL branch per test")
    for name, (help_text, default) in _OPTIONS.items():
        flag = "--cowbranch-" + name.replace("_", "-")
        group.addoption(
            flag,
            dest=f"cowbranch_{name}",
            default=None,
            metavar="VALUE",
            help=f"{help_text} [ini: cowbranch_{name}]",
        )
        parser.addini(f"cowbranch_{name}", help_text, default=default)
    for name, (help_text, default) in _INI_ONLY.items():
        parser.addini(f"cowbranch_{name}", help_text, default=default)
    parser.addini(
        "cowbranch_migrate_files",
        "globs (from the rootdir, ** recursive) of the files defining the migrations",
        type="linelist",
        default=[],
    )


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers",
        "cowbranch(parent=None, *, settings=None, labels=None, ttl=None): branch the test's "
        "cowbranch fixtures from `parent`, with extra postgres `settings` and `labels`",
    )
    config.stash[_STATE] = _State(config)
    # Check durations now, so a typo is one usage error, not an error per test.
    for name, default in (("ttl", "1h"), ("keep_failed", ""), ("template_max_age", "7d")):
        if _setting(config, name) != default:
            _duration_or_none(config, name)


def pytest_unconfigure(config: pytest.Config) -> None:
    state = config.stash.get(_STATE, None)
    if state is not None:
        state.close()


def _setting(config: pytest.Config, name: str) -> str:
    given = config.getoption(f"cowbranch_{name}", None) if name in _OPTIONS else None
    return str(given if given is not None else config.getini(f"cowbranch_{name}")).strip()


@dataclass
class _State:
    """The plugin's per-process state: one client, one health verdict, one run id."""

    config: pytest.Config
    run_id: str = ""
    worker: str = "main"
    _client: Client | None = None
    _verdict: str | None = None
    _serial: Iterator[int] = field(default_factory=itertools.count)
    _templates: Templates | None = None

    def __post_init__(self) -> None:
        workerinput: dict[str, Any] | None = getattr(self.config, "workerinput", None)
        if workerinput is not None:  # an xdist worker: share the controller's run id
            self.worker = str(workerinput.get("workerid", "gw"))
            self.run_id = str(workerinput.get("testrunuid", ""))[:8]
        self.run_id = self.run_id or uuid.uuid4().hex[:8]

    def client(self) -> Client:
        """The client, after one health check per process; fails or skips the caller otherwise."""
        from cowbranchd.client import Client, CowbranchError, RetryPolicy  # noqa: PLC0415 - keep pytest start fast

        if self._verdict is None:
            try:
                wait = float(_setting(self.config, "connect_timeout") or 10)
                client = Client(
                    _setting(self.config, "address") or None, retry=RetryPolicy(max_elapsed=wait)
                )
                status = client.health()
            except (CowbranchError, ValueError) as exc:
                self._verdict = str(exc)
            else:
                self._client = client
                self._verdict = (
                    ""
                    if status == "SERVING"
                    else (f"cowbranchd at {client.address} is {status}, not SERVING")
                )
        if self._verdict:
            raise _Unreachable(self._verdict)
        assert self._client is not None
        return self._client

    def next_branch_id(self, hint: str) -> str:
        """A fresh branch id for this process of this run."""
        from .rules import branch_id_for  # noqa: PLC0415

        return branch_id_for(self.worker, self.run_id, next(self._serial), hint)

    def templates(self) -> Templates | None:
        """The templates of this process, when `cowbranch_migrate` is set."""
        migrate = _setting(self.config, "migrate")
        if not migrate:
            return None
        if self._templates is None:
            from .templates import Templates, load_migration  # noqa: PLC0415

            try:
                load_migration(migrate)  # a typo is one clear line, not a traceback per test
            except ValueError as exc:
                pytest.fail(str(exc), pytrace=False)
            self._templates = Templates(
                self.client(),
                migrate,
                self.config.rootpath,
                self.config.getini("cowbranch_migrate_files"),
                max_age=_duration_or_none(self.config, "template_max_age"),
                timeout=_duration_or_none(self.config, "template_timeout") or timedelta(minutes=10),
                holder=self.holder(),
            )
        return self._templates

    def holder(self) -> str:
        """How this process's lease is named in the daemon's log."""
        return f"pytest run {self.run_id} worker {self.worker} pid {os.getpid()}"

    def close(self) -> None:
        """Close the lease (what it still holds is deleted, kept branches stay), then the client."""
        if self._client is not None:
            self._client.close()


class _Unreachable(Exception):
    """The daemon cannot serve this process; its message is the reason."""


def _client_or_fail(config: pytest.Config, item: pytest.Item | None) -> Client:
    """The client, or the test fails (or skips, per cowbranch_unreachable) with one short line.

    The full reason, grpc's detail included, is printed once in the summary.
    """
    try:
        return config.stash[_STATE].client()
    except _Unreachable as exc:
        reason = str(exc)
    if item is not None:
        item.stash[_UNREACHABLE] = reason
    short = f"cowbranchd unreachable: {reason.split(' (', maxsplit=1)[0]}"
    if _setting(config, "unreachable") == "skip":
        pytest.skip(short)
    pytest.fail(short, pytrace=False)


def _duration_or_none(config: pytest.Config, name: str) -> timedelta | None:
    from cowbranchd.client.types import parse_duration  # noqa: PLC0415

    text = _setting(config, name)
    if text.lower() in ("", "off", "no", "false", "0"):
        return None
    try:
        value = parse_duration(text, field=f"cowbranch_{name}")
    except Exception as exc:
        raise pytest.UsageError(str(exc)) from exc
    return value or None


class BranchFactory:
    """Makes branches for one test (or the session) and disposes of them at its end.

    Call it: `factory(parent=None, *, settings=None, labels=None, ttl=None,
    branch_id=None) -> Branch`. Defaults come from the nearest `cowbranch`
    marker, then `--cowbranch-parent`.
    """

    def __init__(self, request: pytest.FixtureRequest, item: pytest.Item | None) -> None:
        self._request = request
        self._item = item
        self._state = request.config.stash[_STATE]
        self.branches: list[Branch] = []

    def _marker(self) -> Any:
        from .rules import MarkerArgs, marker_args  # noqa: PLC0415

        mark = self._item.get_closest_marker("cowbranch") if self._item is not None else None
        try:
            return marker_args(mark.args, mark.kwargs) if mark else MarkerArgs()
        except TypeError as exc:
            pytest.fail(str(exc), pytrace=False)

    def __call__(
        self,
        parent: str | None = None,
        *,
        settings: Mapping[str, str] | None = None,
        labels: Mapping[str, str] | None = None,
        ttl: timedelta | str | None = None,
        branch_id: str | None = None,
    ) -> Branch:
        from .rules import ci_labels, run_labels  # noqa: PLC0415

        config = self._request.config
        client = _client_or_fail(self._request.config, self._item)
        mark = self._marker()
        parent = parent or mark.parent or _setting(config, "parent")
        if not parent:
            pytest.fail(
                "cowbranchd: no parent to branch from: pass --cowbranch-parent=bases/NAME, set "
                "cowbranch_parent in the ini file, or mark the test "
                "@pytest.mark.cowbranch(parent='bases/NAME')",
                pytrace=False,
            )
        templates = self._state.templates()
        if templates is not None:
            parent = templates.parent_for(parent)
        nodeid = self._item.nodeid if self._item is not None else None
        hint = self._item.name if self._item is not None else "session"
        all_labels = {
            **ci_labels(os.environ),
            **run_labels(self._state.run_id, self._state.worker, nodeid),
            **mark.labels,
            **(labels or {}),
        }
        branch = client.create_branch(
            parent,
            branch_id=branch_id or self._state.next_branch_id(hint),
            labels=all_labels,
            ttl=ttl or mark.ttl or _duration_or_none(config, "ttl"),
            postgres_settings={**mark.settings, **(settings or {})},
            # A test's branch lives for the test: never suspended under it.
            idle_suspend=0,
            # Held in the process's lease from the moment it exists: a killed
            # run's branches go within the daemon's lease grace instead of
            # lingering for their TTL.
            lease=client.lease(holder=self._state.holder()),
        )
        self.branches.append(branch)
        if self._item is not None:
            self._item.stash.setdefault(_BRANCHES, []).append(branch)
        return branch

    def dispose(self, failed: bool) -> None:
        """Delete the branches, or keep them for keep-failed's duration when `failed`."""
        from cowbranchd.errors import NotFound  # noqa: PLC0415

        keep = _duration_or_none(self._request.config, "keep_failed") if failed else None
        branches, self.branches = self.branches, []
        for branch in reversed(branches):
            client = self._state.client()
            if keep is None:
                client.delete_branch(branch.name, allow_missing=True, force=True)
                continue
            with contextlib.suppress(NotFound):  # the test deleted it itself
                client.update_branch(branch.name, ttl=keep)
            client.lease().keep(branch.name)  # the end of the run must not delete it


def _test_failed(item: pytest.Item) -> bool:
    reports = item.stash.get(_REPORTS, {})
    return any(rep.failed for rep in reports.values())


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(
    item: pytest.Item, call: pytest.CallInfo[None]
) -> Generator[None, pytest.TestReport, pytest.TestReport]:
    rep = yield
    item.stash.setdefault(_REPORTS, {})[rep.when] = rep
    reason = item.stash.get(_UNREACHABLE, None)
    if reason and rep.when == "setup":
        rep.user_properties.append(("cowbranch_unreachable", reason))
    branches = item.stash.get(_BRANCHES, [])
    keep = _duration_or_none(item.config, "keep_failed")
    if rep.failed and rep.when in ("setup", "call") and branches and keep is not None:
        from cowbranchd.client.types import format_duration  # noqa: PLC0415

        lines = [f"{b.name} kept for {format_duration(keep)}: {b.dsn}" for b in branches]
        rep.sections.append(("cowbranchd: branches kept for debugging", "\n".join(lines)))
        rep.user_properties.extend(("cowbranch_kept", line) for line in lines)
    return rep


def pytest_terminal_summary(terminalreporter: Any) -> None:
    """One section for the whole run: the unreachable reason once, and the kept branches."""
    reasons: dict[str, int] = {}
    kept: list[str] = []
    for status in ("error", "failed", "skipped"):
        for rep in terminalreporter.stats.get(status, []):
            for key, value in getattr(rep, "user_properties", ()):
                if key == "cowbranch_unreachable":
                    reasons[value] = reasons.get(value, 0) + 1
                elif key == "cowbranch_kept":
                    kept.append(f"{rep.nodeid}: {value}")
    if not reasons and not kept:
        return
    terminalreporter.section("cowbranchd")
    for reason, count in reasons.items():
        terminalreporter.line(f"daemon unreachable ({count} tests needing a branch): {reason}")
    if kept:
        terminalreporter.line("branches of failed tests kept for debugging:")
        for line in sorted(kept):
            terminalreporter.line(f"  {line}")


def _session_refresher(factory: BranchFactory, ttl: timedelta | None) -> Callable[[], None]:
    # Session branches live as long as the run: push their ttl forward now and then,
    # so a long run never loses its branch and a killed run still leaks for one ttl at most.
    last = [time.monotonic()]

    def refresh() -> None:
        if ttl is None or time.monotonic() - last[0] < ttl.total_seconds() / 3:
            return
        last[0] = time.monotonic()
        client = factory._state.client()
        for branch in factory.branches:
            client.update_branch(branch.name, ttl=ttl)

    return refresh


_REFRESHERS = pytest.StashKey[list[Callable[[], None]]]()


def pytest_runtest_setup(item: pytest.Item) -> None:
    for refresh in item.config.stash.get(_REFRESHERS, []):
        refresh()


@pytest.fixture(scope="session")
def cowbranch_client(request: pytest.FixtureRequest) -> Client:
    """The session's `cowbranchd.client.Client` (health-checked once)."""
    return _client_or_fail(request.config, request.node if request.scope == "function" else None)


@pytest.fixture
def cowbranch_factory(request: pytest.FixtureRequest) -> Iterator[BranchFactory]:
    """Make branches for this test; deleted at its end (kept if it failed, with keep-failed)."""
    factory = BranchFactory(request, request.node)
    yield factory
    factory.dispose(failed=_test_failed(request.node))


@pytest.fixture(scope="session")
def cowbranch_session_factory(request: pytest.FixtureRequest) -> Iterator[BranchFactory]:
    """Make branches that live for the whole session (for session- or module-scoped fixtures)."""
    factory = BranchFactory(request, None)
    ttl = _duration_or_none(request.config, "ttl")
    request.config.stash.setdefault(_REFRESHERS, []).append(_session_refresher(factory, ttl))
    yield factory
    factory.dispose(failed=request.session.testsfailed > 0)


@pytest.fixture
def cowbranch(cowbranch_factory: BranchFactory) -> Branch:
    """A fresh branch for this test, from the marker's parent or --cowbranch-parent."""
    return cowbranch_factory()


@pytest.fixture
def cowbranch_dsn(cowbranch: Branch) -> str:
    """The libpq DSN of this test's branch."""
    return cowbranch.dsn


@pytest.fixture(scope="session")
def cowbranch_session(cowbranch_session_factory: BranchFactory) -> Branch:
    """One branch shared by the whole session (per xdist worker), from --cowbranch-parent."""
    return cowbranch_session_factory()
