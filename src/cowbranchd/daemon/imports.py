"""Bringing data into the pool from outside it, safely: where an import may
come from (`daemon.import_roots`), reading it with the import user's rights,
and copying it without following a link (`postgres.copyin`, run as that
user). Also the on-disk helpers of a base's volume. No gRPC, no inventory.
"""

from __future__ import annotations

import contextlib
import os
import pwd
import shutil
import stat
import sys
from collections.abc import Sequence
from pathlib import Path

from cowbranchd.errors import CommandError, FailedPrecondition, InvalidArgument, PermissionDenied
from cowbranchd.postgres import copyin
from cowbranchd.run import run

__all__ = [
    "INCOMING",
    "OUTGOING",
    "check_reachable",
    "copy_in",
    "read_source_version",
    "remove_leftovers",
    "tree_bytes",
    "validate_data_directory",
]

# The system Python runs the copy as the import user: the daemon's own
# interpreter may live where that user cannot reach (a venv under /root).
SYSTEM_PYTHON = "/usr/bin/python3"
COPY_TIMEOUT_S = None  # an import takes as long as its size needs (and its deadline)
# Beside a base's pgdata while a new version's data is copied in.
INCOMING = ".pgdata.incoming"
OUTGOING = ".pgdata.outgoing"


def remove_leftovers(volume: Path) -> None:
    """What a crash in the middle of `_replace_pgdata` left: it must not end up
    in the next version's snapshot."""
    for name in (INCOMING, OUTGOING):
        if os.path.lexists(volume / name):
            shutil.rmtree(volume / name)
    if not os.path.lexists(volume / "pgdata"):
        raise FailedPrecondition(f"{volume} lost its pgdata/: restore it or delete the base")


def tree_bytes(root: Path) -> int:
    """Apparent size of the files under `root` (metadata only: no reads)."""
    total = 0
    for dirpath, _dirs, files in os.walk(root):
        for name in files:
            with contextlib.suppress(OSError):
                total += os.lstat(os.path.join(dirpath, name)).st_size
    return total


def check_reachable(path: Path, os_user: str) -> None:
    """FailedPrecondition naming the directory that keeps `os_user` (who runs
    every postgres) from reaching `path`, instead of initdb's bare EACCES."""
    user = pwd.getpwnam(os_user)
    groups = set(os.getgrouplist(user.pw_name, user.pw_gid))
    for directory in [*reversed(path.parents), path]:
        st = directory.stat()
        if st.st_uid == user.pw_uid:
            allowed = st.st_mode & stat.S_IXUSR
        elif st.st_gid in groups:
            allowed = st.st_mode & stat.S_IXGRP
        else:
            allowed = st.st_mode & stat.S_IXOTH
        if not allowed:
            raise FailedPrecondition(
                f"the {os_user!r} OS user cannot reach {path}: {directory} is mode "
                f"{stat.S_IMODE(st.st_mode):04o}; give it search (x) permission for that user"
            )


def validate_data_directory(
    field_name: str, value: str, import_roots: Sequence[str]
) -> Path:
    """An absolute, normalised, link-free path inside one of the operator's
    `daemon.import_roots`. Whether it holds a data directory is found out by
    the import user, not by root (see `copy_in`)."""
    if not value.startswith("/"):
        raise InvalidArgument(field_name, f"{value[:200]!r} is not an absolute path")
    if "\x00" in value or len(value) > 4096:
        raise InvalidArgument(field_name, "is not a usable path")
    if ".." in Path(value).parts or (os.path.normpath(value) != value.rstrip("/") and value != "/"):
        raise InvalidArgument(
            field_name, f"{value[:200]!r} must be normalised (no '..', '.' or '//')"
        )
    path = Path(value.rstrip("/") or "/")
    if not import_roots:
        raise FailedPrecondition(
            f"{field_name}: imports are disabled: the operator lists the directories "
            "they may come from in daemon.import_roots"
        )
    inside = [r for r in import_roots if path == Path(r) or Path(r) in path.parents]
    if not inside:
        raise PermissionDenied(
            f"{field_name}: {path} is outside daemon.import_roots ({', '.join(import_roots)})"
        )
    # No link anywhere on the way: root resolves nothing a caller planted.
    if os.path.realpath(path) != str(path):
        raise InvalidArgument(field_name, f"{path} goes through a symbolic link")
    return path


def read_source_version(source_dir: Path, os_user: str) -> int:
    """PG_VERSION of an import source, read as the import user: a directory
    that user cannot read is refused before anything is copied."""
    proc = run(
        ["head", "-c", "64", "--", str(source_dir / "PG_VERSION")],
        user=os_user,
        check=False,
        timeout=30,
    )
    if proc.returncode != 0:
        raise PermissionDenied(
            f"data_directory: {source_dir} cannot be read by the import user {os_user!r}: "
            f"{proc.stderr.strip()[:300]}"
        )
    text = proc.stdout.strip()
    if not text.isdigit():
        raise InvalidArgument(
            "data_directory", f"{source_dir}: unsupported PostgreSQL version {text[:20]!r}"
        )
    return int(text)


def copy_in(source_dir: Path, pgdata: Path, os_user: str) -> None:
    """Copy `source_dir` into the empty directory `pgdata` as `os_user` (see
    `cowbranchd.postgres.copyin`). The copy lands owned by that user: no chown afterwards."""
    code = Path(copyin.__file__).read_text(encoding="utf-8")
    python = SYSTEM_PYTHON if os.access(SYSTEM_PYTHON, os.X_OK) else sys.executable
    proc = run(
        [python, "-I", "-S", "-c", code, str(source_dir), str(pgdata)],
        user=os_user,
        check=False,
        timeout=COPY_TIMEOUT_S,
    )
    if proc.returncode == 3:
        raise FailedPrecondition(
            f"data_directory: {source_dir}/{proc.stderr.strip()[:500]}; nothing was imported"
        )
    if proc.returncode != 0:
        raise CommandError(["copy-in", str(source_dir), str(pgdata)], proc.returncode, proc.stderr)
