"""Secrets the daemon hands out, derived rather than stored.

One random 256-bit key lives in `<state_dir>/keys/daemon.key` (0600 in a 0700
directory, root's). Every password is an HMAC of what it belongs to under that
key, so no password is ever written to storage metadata (a ZFS user property
is readable by every local user; a btrfs sidecar is kept in every snapshot),
to argv, to a log or to an error. Losing the key changes every derived
password: it belongs with the pool in backups (docs/security.md).

This module may not log or return the key, and never formats a password into
a message.
"""

from __future__ import annotations

import base64
import contextlib
import errno
import hashlib
import hmac
import os
import stat
from datetime import datetime
from pathlib import Path

from cowbranchd.errors import FailedPrecondition

__all__ = ["SecretKeeper"]

_KEY_BYTES = 32
_PASSWORD_CHARS = 24  # base64url characters: 144 bits


class SecretKeeper:
    """Derives passwords from the daemon key at `path`, made on first use."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._key = _load_or_create(path)

    def __repr__(self) -> str:
        return f"SecretKeeper({str(self.path)!r})"  # never the key

    def derive(self, purpose: str, *parts: str) -> str:
        """A 144-bit url-safe password for `purpose` and the identifying `parts`
        (NUL-separated, so no two distinct inputs collide)."""
        message = "\0".join((purpose, *parts)).encode()
        digest = hmac.new(self._key, message, hashlib.sha256).digest()
        return base64.urlsafe_b64encode(digest).decode()[:_PASSWORD_CHARS]

    def branch_password(self, branch_id: str, create_time: datetime) -> str:
        """The password of branch `branch_id`: its own, the same after a reset
        or a restart, different for a branch re-created under the same id."""
        return self.derive("branch-password", branch_id, create_time.isoformat())

    def base_password(self, base_id: str, create_time: datetime) -> str:
        """The password of base `base_id`'s superuser. The creation time makes
        a base re-created under the same name a different secret."""
        return self.derive("base-password", base_id, create_time.isoformat())


def _load_or_create(path: Path) -> bytes:
    directory = path.parent
    directory.mkdir(mode=0o700, parents=True, exist_ok=True)
    os.chmod(directory, 0o700)
    with contextlib.suppress(FileExistsError):
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
        try:
            os.write(fd, os.urandom(_KEY_BYTES))
            os.fsync(fd)
        finally:
            os.close(fd)
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError as exc:
        why = "is a symbolic link" if exc.errno == errno.ELOOP else exc.strerror
        raise FailedPrecondition(f"daemon key {path}: {why}") from exc
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode) or st.st_uid != os.geteuid():
            raise FailedPrecondition(f"daemon key {path} must be a regular file owned by root")
        if st.st_mode & 0o077:
            raise FailedPrecondition(
                f"daemon key {path} is mode {stat.S_IMODE(st.st_mode):04o}: "
                "other users may have read it; remove it (every derived password changes) "
                "or chmod 600 it if you are sure nobody did"
            )
        key = os.read(fd, _KEY_BYTES + 1)
    finally:
        os.close(fd)
    if len(key) != _KEY_BYTES:
        raise FailedPrecondition(f"daemon key {path} is not {_KEY_BYTES} bytes long")
    return key
