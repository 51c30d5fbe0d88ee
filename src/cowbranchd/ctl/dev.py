"""cowbranchctl for developers and QA: a branch per git branch (`checkout`,
`prune`), a branch's postgres log (`logs`) and psql on a branch (`psql`).

`checkout` finds the branch of (this repository, this user, this git branch)
by its labels, or creates it with a request id derived from the same three,
so running it twice, or twice at once, gives one branch:

- `git-repo`: the repository's directory name and a hash of its git common
  directory (so every work tree of one clone shares it, two clones do not);
- `git-user`: the login name of the user running cowbranchctl;
- `git-branch`: the branch name (characters a label cannot hold, such as
  `/`, become `_`).

Its id is `<user>-<git branch>` cut down to a valid id (a short hash of all
three is added when anything was cut or replaced, or when another repository
took the plain id first). `prune` deletes this repository's and this user's
checkout branches whose git branch is gone; with `--merged` also those merged
into the default branch (see `default_branch`). Git runs as a subprocess,
argument lists only; nothing here imports daemon code.
"""

from __future__ import annotations

import argparse
import contextlib
import getpass
import hashlib
import os
import re
import subprocess
import sys
import tempfile
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from cowbranchd.client import AlreadyExists, Branch, Client, FailedPrecondition, InvalidArgument

if TYPE_CHECKING:
    from .commands import Output

__all__ = [
    "LABEL_BRANCH",
    "LABEL_REPO",
    "LABEL_USER",
    "CheckoutKey",
    "add_parsers",
    "branch_id_for",
    "cmd_checkout",
    "cmd_logs",
    "cmd_prune",
    "cmd_psql",
    "default_branch",
    "label_value",
]

LABEL_REPO = "git-repo"
LABEL_USER = "git-user"
LABEL_BRANCH = "git-branch"
_ID_MAX = 63
_LABEL_MAX = 63
_HASH_LEN = 6


def add_parsers(add: Callable[[str, str], argparse.ArgumentParser]) -> None:
    """The subcommands of this module, made with build_parser's `add(name, help)`."""
    p = add("checkout", "get or create the branch of this git branch and user; print its DSN")
    p.add_argument(
        "--parent",
        metavar="PARENT",
        help="what a new branch comes from, e.g. bases/shop (default: git config cowbranch.parent)",
    )
    p.add_argument(
        "--env-file",
        metavar="PATH",
        help="write DATABASE_URL=<dsn> into this dotenv file (0600) instead of printing it",
    )
    p = add("prune", "delete this repository's checkout branches whose git branch is gone")
    p.add_argument(
        "--merged",
        action="store_true",
        help="also those whose git branch is merged into the default branch",
    )
    p.add_argument("--dry-run", action="store_true", help="only say what would be deleted")
    p = add("logs", "print a branch's postgres log (owner or admin)")
    p.add_argument("name", help="branch id or branches/ID")
    p.add_argument("-f", "--follow", action="store_true", help="keep printing new lines")
    p.add_argument(
        "-n", "--lines", type=int, metavar="LINES", help="only the last LINES lines (default all)"
    )
    p = add("psql", "run psql on a branch (arguments after NAME go to psql)")
    p.add_argument("name", help="branch id or branches/ID")
    p.add_argument("psql_args", nargs=argparse.REMAINDER, metavar="ARGS", help="psql's arguments")


# -- logs and psql -----------------------------------------------------------------


def cmd_logs(client: Client, args: argparse.Namespace, out: Output) -> int:
    """`logs NAME [-f] [-n LINES]`: the log's bytes as they are; with -f until Ctrl-C."""
    if args.lines is not None and args.lines < 0:
        raise InvalidArgument("--lines", "must not be negative")
    chunks = client.stream_branch_log(args.name, tail_lines=args.lines, follow=args.follow)
    sink = sys.stdout.buffer
    try:
        for data in chunks:
            sink.write(data)
            sink.flush()
    except KeyboardInterrupt:  # Ctrl-C ends a follow; that is success
        pass  # closing the client (ctl.main) cancels the stream at the daemon
    return 0


def cmd_psql(client: Client, args: argparse.Namespace, out: Output) -> int:
    """`psql NAME [ARGS...]`: exec psql on the branch's DSN. The password goes
    in PGPASSWORD, never on the command line (other users can read argv)."""
    branch = client.get_branch(args.name)
    argv = [
        "psql",
        "--host",
        branch.host,
        "--port",
        str(branch.port),
        "--username",
        branch.user,
        "--dbname",
        branch.database,
        *args.psql_args,
    ]
    env = {**os.environ, "PGPASSWORD": branch.password}
    sys.stdout.flush()
    sys.stderr.flush()
    client.close()
    os.execvpe("psql", argv, env)  # an argument list, no shell


# -- checkout and prune ------------------------------------------------------------


def _run_git(cwd: Path, argv: Sequence[str]) -> subprocess.CompletedProcess[str]:
    try:
        return subprocess.run(
            ["git", "-C", str(cwd), *argv], capture_output=True, text=True, check=False
        )
    except FileNotFoundError as exc:
        raise FailedPrecondition("git is not installed (checkout and prune need it)") from exc


def _git(cwd: Path, *argv: str, check: bool = True) -> str:
    """git's output; with `check`, FailedPrecondition when it fails, else ""."""
    done = _run_git(cwd, argv)
    if check and done.returncode != 0:
        raise FailedPrecondition(f"git {' '.join(argv)}: {done.stderr.strip() or done.returncode}")
    return done.stdout.strip() if done.returncode == 0 else ""


def _short_hash(*parts: str) -> str:
    return hashlib.sha256("\0".join(parts).encode()).hexdigest()[:_HASH_LEN]


def label_value(text: str) -> str:
    """`text` as a label value: characters outside [A-Za-z0-9_.-] become `_`;
    a value over 63 characters keeps its start and ends in a short hash."""
    value = re.sub(r"[^A-Za-z0-9_.-]", "_", text) or "_"
    if len(value) > _LABEL_MAX:
        value = value[: _LABEL_MAX - _HASH_LEN - 1] + "-" + _short_hash(text)
    return value


class CheckoutKey:
    """What a checkout branch stands for: a repository, a user, a git branch."""

    def __init__(self, repo: str, user: str, git_branch: str) -> None:
        self.repo = repo
        self.user = user
        self.git_branch = git_branch

    @classmethod
    def here(cls, cwd: Path) -> CheckoutKey:
        """The key of the git work tree at `cwd`; FailedPrecondition outside
        one or on a detached HEAD."""
        if _git(cwd, "rev-parse", "--is-inside-work-tree", check=False) != "true":
            raise FailedPrecondition(f"{cwd} is not inside a git work tree")
        branch = _git(cwd, "symbolic-ref", "--quiet", "--short", "HEAD", check=False)
        if not branch:
            raise FailedPrecondition("HEAD is detached: check out a git branch first")
        return cls(repo_label(cwd), getpass.getuser(), branch)

    @property
    def labels(self) -> dict[str, str]:
        return {
            LABEL_REPO: self.repo,
            LABEL_USER: label_value(self.user),
            LABEL_BRANCH: label_value(self.git_branch),
        }

    @property
    def selector(self) -> str:
        return ",".join(f"{k}={v}" for k, v in self.labels.items())

    @property
    def request_id(self) -> str:
        return f"checkout:{self.repo}:{_short_hash(self.user, self.git_branch)}"


def repo_label(cwd: Path) -> str:
    """`<directory name>-<hash of the git common directory>`: the same for
    every work tree of one clone, different for two clones."""
    common = Path(_git(cwd, "rev-parse", "--git-common-dir"))
    if not common.is_absolute():
        common = (cwd / common).resolve()
    top = Path(_git(cwd, "rev-parse", "--show-toplevel"))
    name = label_value(top.name)[: _LABEL_MAX - _HASH_LEN - 1]
    return f"{name}-{_short_hash(str(common))}"


def branch_id_for(key: CheckoutKey, *, hashed: bool = False) -> str:
    """`<user>-<git branch>` as a branch id (`^[a-z][a-z0-9-]{0,62}$`): lower
    case, other characters as `-`, at most 63 characters. A short hash of the
    whole key is added when anything was lost that way, or with `hashed`."""
    wanted = f"{key.user}-{key.git_branch}"
    text = re.sub(r"-+", "-", re.sub(r"[^a-z0-9-]", "-", wanted.lower())).strip("-")
    if not text or not text[0].isalpha():
        text = "b-" + text
    suffix = "-" + _short_hash(key.repo, key.user, key.git_branch)
    if hashed or text != wanted or len(text) > _ID_MAX:
        text = text[: _ID_MAX - len(suffix)].rstrip("-") + suffix
    return text


def _find(client: Client, key: CheckoutKey) -> Branch | None:
    for branch in client.list_branches(key.selector):
        return client.get_branch(branch.name)  # listed without secrets to others; get has them
    return None


def _parent(args: argparse.Namespace, cwd: Path) -> str:
    parent = args.parent or _git(cwd, "config", "--get", "cowbranch.parent", check=False)
    if not parent:
        raise InvalidArgument(
            "--parent",
            "a new branch needs one: --parent bases/NAME, or git config cowbranch.parent",
        )
    return str(parent)


def cmd_checkout(client: Client, args: argparse.Namespace, out: Output) -> int:
    """`checkout [--parent P] [--env-file PATH]`: the branch of this git
    branch and user, made on first use; its DSN printed or written."""
    cwd = Path.cwd()
    key = CheckoutKey.here(cwd)
    branch = _find(client, key)
    created = branch is None
    if branch is None:
        parent = _parent(args, cwd)
        try:
            branch = client.create_branch(
                parent, branch_id=branch_id_for(key), labels=key.labels, request_id=key.request_id
            )
        except AlreadyExists:  # that id is another repository's (or user's) branch
            branch = client.create_branch(
                parent,
                branch_id=branch_id_for(key, hashed=True),
                labels=key.labels,
                request_id=key.request_id,
            )
    if args.env_file:
        write_env_file(Path(args.env_file), "DATABASE_URL", branch.dsn)
    document = {**branch.to_dict(), "created": created, "env_file": args.env_file or None}
    if out.json:
        out.emit(document, "")
    elif args.env_file:
        verb = "created" if created else "using"
        print(f"{verb} {branch.name}; DATABASE_URL written to {args.env_file}", file=out.stream)
    else:
        print(branch.dsn, file=out.stream)
    return 0


def write_env_file(path: Path, name: str, value: str) -> None:
    """Set `name=value` in the dotenv file at `path`, keeping its other lines;
    the file is replaced atomically and left 0600 (it holds a password)."""
    lines: list[str] = []
    with contextlib.suppress(FileNotFoundError):
        lines = path.read_text(encoding="utf-8").splitlines()
    entry = f"{name}={value}"
    kept = [line for line in lines if not re.match(rf"\s*(export\s+)?{name}\s*=", line)]
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent or Path("."))
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            os.fchmod(handle.fileno(), 0o600)
            handle.write("\n".join([*kept, entry]) + "\n")
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def default_branch(cwd: Path) -> str:
    """The branch others merge into: origin's HEAD (`refs/remotes/origin/HEAD`)
    when it is set, else `git config init.defaultBranch` when that branch
    exists here, else `main`, else `master`. FailedPrecondition if none is."""
    remote = _git(
        cwd, "symbolic-ref", "--quiet", "--short", "refs/remotes/origin/HEAD", check=False
    )
    if remote:
        return remote
    configured = _git(cwd, "config", "--get", "init.defaultBranch", check=False)
    for name in (configured, "main", "master"):
        exists = _run_git(cwd, ["rev-parse", "--verify", "--quiet", f"refs/heads/{name}"])
        if name and exists.returncode == 0:
            return name
    raise FailedPrecondition(
        "no default branch: neither origin/HEAD, init.defaultBranch, main nor master exists"
    )


def _merged_into(cwd: Path, target: str, names: Sequence[str]) -> set[str]:
    """Of local branches `names`, those with no commit of their own left
    beside `target`: their tip is an ancestor of target's and is not target's
    tip itself (a branch just made from it, with nothing on it yet, is kept)."""
    tip = _git(cwd, "rev-parse", "--verify", target)
    merged = set()
    for name in names:
        head = _git(cwd, "rev-parse", "--verify", f"refs/heads/{name}")
        if head == tip:
            continue
        if _run_git(cwd, ["merge-base", "--is-ancestor", head, tip]).returncode == 0:
            merged.add(name)
    return merged


def cmd_prune(client: Client, args: argparse.Namespace, out: Output) -> int:
    """`prune [--merged] [--dry-run]`: delete this repository's and this
    user's checkout branches whose git branch is gone (or merged)."""
    cwd = Path.cwd()
    key = CheckoutKey.here(cwd)
    local = _git(cwd, "for-each-ref", "--format=%(refname:short)", "refs/heads/").splitlines()
    present = {label_value(name) for name in local}
    keep_always = {label_value(key.git_branch)}
    merged: set[str] = set()
    if args.merged:
        target = default_branch(cwd)
        keep_always.add(label_value(target.removeprefix("origin/")))
        merged = {label_value(n) for n in _merged_into(cwd, target, local)}
    mine = f"{LABEL_REPO}={key.repo},{LABEL_USER}={label_value(key.user)}"
    doomed = []
    for branch in client.list_branches(mine):
        git_branch = branch.labels.get(LABEL_BRANCH, "")
        if not git_branch or git_branch in keep_always:
            continue
        if git_branch not in present or git_branch in merged:
            doomed.append(branch.name)
    deleted, kept = [], []
    for name in doomed:
        if args.dry_run:
            continue
        try:
            client.delete_branch(name, allow_missing=True)
        except FailedPrecondition:  # protected: the user said to keep it
            kept.append(name)
        else:
            deleted.append(name)
    if args.dry_run:
        text = "\n".join(f"would delete {n}" for n in doomed) or "nothing to prune"
        out.emit({"deleted": [], "would_delete": doomed, "kept": []}, text)
        return 0
    lines = [f"deleted {n}" for n in deleted] + [f"kept {n} (protected)" for n in kept]
    out.emit(
        {"deleted": deleted, "would_delete": [], "kept": kept},
        "\n".join(lines) or "nothing to prune",
    )
    return 0
