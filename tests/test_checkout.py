"""Developer and QA branches: `cowbranchctl checkout` in a real git work tree
gives one branch per (repository, user, git branch), however often it runs;
`--env-file` writes its DSN for the app; `prune --merged` removes only the
branches of this repository whose git branch is gone or merged; `reset
--to-version N` moves a QA branch to another version of its base, on the
same port with the same password."""

from __future__ import annotations

import json
import os
import subprocess
import uuid
from pathlib import Path
from typing import Any

import psycopg
import pytest

from cowbranchd.client import Client
from cowbranchd.ctl import EXIT_FAILURE, EXIT_OK, main
from cowbranchd.ctl.dev import CheckoutKey, branch_id_for
from tests.fix_daemon import DaemonHandle
from tests.fix_postgres import ImportSource


def git(repo: Path, *argv: str) -> str:
    done = subprocess.run(
        ["git", "-C", str(repo), *argv], capture_output=True, text=True, check=True
    )
    return done.stdout.strip()


def make_repo(path: Path) -> Path:
    """A git repository on `main` with one commit."""
    path.mkdir()
    git(path, "init", "-q", "-b", "main")
    git(path, "config", "user.email", "dev@example.com")
    git(path, "config", "user.name", "Dev")
    commit(path, "readme")
    return path


def commit(repo: Path, name: str) -> None:
    (repo / name).write_text(name)
    git(repo, "add", name)
    git(repo, "commit", "-q", "-m", name)


def ctl_json(capsys: pytest.CaptureFixture[str], repo: Path, d: DaemonHandle, *argv: str) -> Any:
    """cowbranchctl `argv` -o json run inside `repo`; must succeed."""
    cwd = os.getcwd()
    os.chdir(repo)
    try:
        code = main(["--address", d.address, *argv, "-o", "json"])
    finally:
        os.chdir(cwd)
    captured = capsys.readouterr()
    assert code == EXIT_OK, captured.err
    return json.loads(captured.out)


def test_checkout_twice_gives_the_same_branch(
    daemon: DaemonHandle, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """The first checkout of a git branch creates its branch, labelled with
    repository, user and git branch; the second finds the same one."""
    repo = make_repo(tmp_path / "shop")
    git(repo, "checkout", "-q", "-b", "feature/Login_Page")
    first = ctl_json(capsys, repo, daemon, "checkout", "--parent", "bases/demo")
    second = ctl_json(capsys, repo, daemon, "checkout", "--parent", "bases/demo")
    assert (first["created"], second["created"]) == (True, False)
    assert first["name"] == second["name"]
    assert first["connection"]["dsn"] == second["connection"]["dsn"]
    key = CheckoutKey.here(repo)
    assert first["branch_id"] == branch_id_for(key)
    assert first["branch_id"].startswith(f"{key.user}-feature-login-page-")  # hash: lossy name
    assert first["labels"] == {
        "git-repo": key.repo,
        "git-user": key.user,
        "git-branch": "feature_Login_Page",
    }
    assert key.repo.startswith("shop-")
    with psycopg.connect(first["connection"]["dsn"]) as conn:
        assert conn.execute("select count(*) from items").fetchone() == (3,)
    with Client(daemon.address) as client:
        client.delete_branch(first["name"])


def test_checkout_writes_the_dsn_to_a_private_env_file(
    daemon: DaemonHandle, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """`--env-file` sets DATABASE_URL in the file, keeps its other lines, and
    leaves it 0600; without --parent (and no git config) a new branch is a
    usage error."""
    repo = make_repo(tmp_path / "app")
    git(repo, "checkout", "-q", "-b", "env-test")
    env_file = repo / ".env"
    env_file.write_text("OTHER=1\nDATABASE_URL=postgresql://old\n")
    env_file.chmod(0o644)
    cwd = os.getcwd()
    os.chdir(repo)
    try:
        assert main(["--address", daemon.address, "checkout"]) == 2
        git(repo, "config", "cowbranch.parent", "bases/demo")
        assert main(["--address", daemon.address, "checkout", "--env-file", ".env"]) == EXIT_OK
    finally:
        os.chdir(cwd)
    out = capsys.readouterr().out
    with Client(daemon.address) as client:
        (branch,) = client.list_branches(CheckoutKey.here(repo).selector)
        branch = client.get_branch(branch.name)
        assert "DATABASE_URL written to .env" in out
        assert env_file.read_text() == f"OTHER=1\nDATABASE_URL={branch.dsn}\n"
        assert env_file.stat().st_mode & 0o777 == 0o600
        client.delete_branch(branch.name)


def test_checkout_outside_a_work_tree_fails(
    daemon: DaemonHandle, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Outside a git work tree, or on a detached HEAD, checkout says so and exits 1."""
    cwd = os.getcwd()
    repo = make_repo(tmp_path / "detached")
    git(repo, "checkout", "-q", "--detach")
    try:
        os.chdir(tmp_path)
        assert main(["--address", daemon.address, "checkout", "--parent", "bases/demo"]) == 1
        os.chdir(repo)
        assert main(["--address", daemon.address, "checkout", "--parent", "bases/demo"]) == 1
    finally:
        os.chdir(cwd)
    err = capsys.readouterr().err
    assert "not inside a git work tree" in err and "HEAD is detached" in err


def test_prune_merged_removes_only_merged_or_gone_branches_of_this_repo(
    daemon: DaemonHandle, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Of this repository's checkout branches, prune --merged deletes those
    whose git branch was merged into main or deleted; an unmerged branch,
    a fresh one with no commits yet, main itself and another clone's
    branches of the same names stay."""
    repo = make_repo(tmp_path / "one")
    other = tmp_path / "two"
    git(tmp_path, "clone", "-q", str(repo), str(other))
    names: dict[str, str] = {}

    def checkout(where: Path, git_branch: str, new: bool = True) -> str:
        git(where, "checkout", "-q", *(["-b"] if new else []), git_branch)
        made = ctl_json(capsys, where, daemon, "checkout", "--parent", "bases/demo")
        return str(made["name"])

    names["main"] = checkout(repo, "main", new=False)
    names["merged"] = checkout(repo, "merged")
    commit(repo, "merged-work")
    names["open"] = checkout(repo, "open")
    commit(repo, "open-work")
    names["gone"] = checkout(repo, "gone")
    other_merged = checkout(other, "merged")
    git(repo, "checkout", "-q", "main")
    git(repo, "merge", "-q", "--no-ff", "-m", "merge", "merged")
    git(repo, "branch", "-q", "-D", "gone")
    names["fresh"] = checkout(repo, "fresh")  # from main as it is now: no commits of its own
    git(repo, "checkout", "-q", "main")
    with Client(daemon.address) as client:
        try:
            dry = ctl_json(capsys, repo, daemon, "prune", "--merged", "--dry-run")
            assert sorted(dry["would_delete"]) == sorted([names["merged"], names["gone"]])
            assert dry["deleted"] == []
            gone_only = ctl_json(capsys, repo, daemon, "prune")
            assert gone_only["deleted"] == [names["gone"]]
            pruned = ctl_json(capsys, repo, daemon, "prune", "--merged")
            assert pruned["deleted"] == [names["merged"]]
            left = {b.name for b in client.list_branches()}
            assert {names["main"], names["open"], names["fresh"], other_merged} <= left
            assert not {names["merged"], names["gone"]} & left
        finally:
            for name in [*names.values(), other_merged]:
                client.delete_branch(name, allow_missing=True)


def test_reset_to_version_moves_a_branch_between_base_versions(
    daemon: DaemonHandle, import_source: ImportSource, capsys: pytest.CaptureFixture[str]
) -> None:
    """A QA branch of version 1 reset --to-version 2 sees version 2's data
    and names it as its parent; back to 1 it sees version 1's; port and
    password stay. A branch of a branch cannot move; a missing version is
    not found."""
    base_id = f"qa-{uuid.uuid4().hex[:8]}"
    sql = "CREATE TABLE t (v text); INSERT INTO t VALUES ('{}');"
    with Client(daemon.address) as client:
        client.create_base(base_id, data_directory=str(import_source(init_sql=sql.format("v1"))))
        client.create_base_version(
            base_id, data_directory=str(import_source(init_sql=sql.format("v2")))
        )
        qa = client.create_branch(f"bases/{base_id}/versions/1", branch_id=f"{base_id}-qa")
        child = client.create_branch(qa.name, branch_id=f"{base_id}-child")
        try:

            def seen(dsn: str) -> str:
                with psycopg.connect(dsn) as conn:
                    row = conn.execute("select v from t").fetchone()
                    assert row is not None
                    return str(row[0])

            assert seen(qa.dsn) == "v1"
            capsys.readouterr()  # what setting up the sources printed
            moved = ctl_json(capsys, Path.cwd(), daemon, "reset", qa.branch_id, "--to-version", "2")
            assert moved["parent"] == f"bases/{base_id}/versions/2"
            assert (moved["connection"]["port"], moved["connection"]["dsn"]) == (qa.port, qa.dsn)
            assert seen(qa.dsn) == "v2"
            assert client.get_branch(qa.name).parent == f"bases/{base_id}/versions/2"
            back = client.reset_branch(qa.name, version=1)
            assert (back.parent, seen(qa.dsn)) == (f"bases/{base_id}/versions/1", "v1")
            code = main(
                ["--address", daemon.address, "reset", child.branch_id, "--to-version", "2"]
            )
            assert code == EXIT_FAILURE
            assert "not from a base version" in capsys.readouterr().err
            code = main(["--address", daemon.address, "reset", qa.branch_id, "--to-version", "9"])
            assert code == 3
            assert seen(qa.dsn) == "v1"  # a refused move leaves the branch as it was
        finally:
            client.delete_branch(child.name, allow_missing=True)
            client.delete_branch(qa.name, allow_missing=True)
            client.delete_base(base_id, force=True)
