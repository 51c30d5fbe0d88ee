"""Templates by migration hash in the pytest plugin: two xdist workers and a
second pytest process started at the same moment build one template; tests
on it see the migrated schema, each in a branch of its own; a changed
migration file builds a new template. Real daemon, postgres and pytest runs."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from cowbranchd.client import Client
from cowbranchd.pytest_plugin.templates import migration_files, template_hash
from tests.fix_daemon import DaemonFactory, DaemonHandle

pytest_plugins = ["pytester"]

MIGRATE = """
import pathlib, time, psycopg

HERE = pathlib.Path(__file__).parent

def migrate(dsn):
    with open(HERE / "builds.log", "a") as log:
        log.write("build\\n")
    time.sleep(1)  # long enough for the other processes to arrive meanwhile
    with psycopg.connect(dsn, autocommit=True) as conn:
        for path in sorted((HERE / "migrations").glob("*.sql")):
            conn.execute(path.read_text())
"""

TESTS = """
import pytest

@pytest.mark.parametrize("n", range(4))
def test_sees_the_migrated_schema(cowbranch, n):
    assert cowbranch.parent.startswith("branches/tpl-")
    with cowbranch.connect() as conn:
        conn.execute("insert into accounts (id, email) values (%s, 'a@example.com')", (n,))
        assert conn.execute("select count(*) from accounts").fetchone() == (1,)
        assert conn.execute("select count(*) from items").fetchone() == (3,)
"""


@pytest.fixture(scope="module")
def template_daemon(daemon_factory: DaemonFactory) -> Iterator[DaemonHandle]:
    """A daemon of its own: the templates these runs leave are protected."""
    d = daemon_factory()
    yield d
    d.cleanup()


def _ready_templates(d: DaemonHandle) -> list[str]:
    with Client(d.address) as client:
        return sorted(b.name for b in client.list_branches("cowbranchd.template=ready"))


def _run(project: Path, d: DaemonHandle, *extra: str) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        [
            sys.executable,
            "-m",
            "pytest",
            "-p",
            "no:cacheprovider",
            f"--cowbranch-address={d.address}",
            f"--cowbranch-parent=bases/{d.base}",
            *extra,
        ],
        cwd=project,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )


def _finish(run: subprocess.Popen[bytes]) -> str:
    try:
        out, _ = run.communicate(timeout=300)
    finally:
        if run.poll() is None:
            run.kill()
            run.wait(timeout=30)
    text = out.decode()
    assert run.returncode == 0, text
    return text


def test_concurrent_runs_build_one_template_and_a_change_builds_another(
    pytester: pytest.Pytester, template_daemon: DaemonHandle
) -> None:
    """xdist -n 2 and a plain run at once: one build; every test sees the schema; a new
    migration file: a second template, built once."""
    project = pytester.path
    (project / "pytest.ini").write_text(
        "[pytest]\npythonpath = .\ncowbranch_migrate = appmig:migrate\n"
        "cowbranch_migrate_files =\n    migrations/*.sql\n"
    )
    (project / "appmig.py").write_text(MIGRATE)
    (project / "migrations").mkdir()
    (project / "migrations" / "001.sql").write_text(
        "create table accounts (id int primary key, email text not null);"
    )
    (project / "test_app.py").write_text(TESTS)

    runs = [_run(project, template_daemon, "-n", "2"), _run(project, template_daemon)]
    for run in runs:
        assert "4 passed" in _finish(run)
    builds = project / "builds.log"
    assert builds.read_text().splitlines() == ["build"]
    [first] = _ready_templates(template_daemon)

    (project / "migrations" / "002.sql").write_text("alter table accounts add column note text;")
    assert "4 passed" in _finish(_run(project, template_daemon, "-n", "2"))
    assert builds.read_text().splitlines() == ["build", "build"]
    templates = _ready_templates(template_daemon)
    assert len(templates) == 2 and first in templates
    [second] = [t for t in templates if t != first]
    with Client(template_daemon.address) as client:
        template = client.get_branch(second)
        assert template.protected
        with template.connect() as conn:
            columns = conn.execute(
                "select column_name from information_schema.columns "
                "where table_name = 'accounts' order by ordinal_position"
            ).fetchall()
        assert columns == [("id",), ("email",), ("note",)]
        # No test branch is left; the templates stay for the next runs.
        left = [b.name for b in client.list_branches() if b.name not in templates]
        assert left == []


def test_the_hash_covers_file_names_and_contents(tmp_path: Path) -> None:
    """Same files, same hash; a changed byte or a renamed file, another hash."""
    (tmp_path / "m").mkdir()
    (tmp_path / "m" / "001.sql").write_text("create table a ();")
    identity = ("admin", "bases/demo/versions/1", "app:migrate")

    def digest() -> str:
        return template_hash(identity, tmp_path, migration_files(tmp_path, ["m/**"]))

    first = digest()
    assert digest() == first
    (tmp_path / "m" / "001.sql").write_text("create table b ();")
    changed = digest()
    assert changed != first
    (tmp_path / "m" / "001.sql").rename(tmp_path / "m" / "002.sql")
    assert digest() not in (first, changed)
    assert template_hash(("admin", "bases/demo/versions/2", "app:migrate"), tmp_path, []) != (
        template_hash(identity, tmp_path, [])
    )
