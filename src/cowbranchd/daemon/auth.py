"""Who is calling. grpcio tells a servicer nothing about a Unix-socket peer
(no uid), so identity comes from where and how a call arrives:

- a bearer token, on any listener: the admin token (`daemon.token_file`) or
  a tenant's (`tenants.tokens_dir/<tenant>`);
- without a token, the listener's own identity: the main socket is the
  admin unless an admin token is configured; `<tenants.socket_dir>/<t>/api.sock`
  is tenant `t` (its directory's group is the gate); TCP has none.

Each listener's interceptor resolves the caller and hands it to the
servicer through a context variable set around the call, in the worker
thread that runs it. Health checks need no identity.
"""

from __future__ import annotations

import contextvars
import hashlib
import hmac
import os
import stat
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import structlog

from cowbranchd.config import TENANT_NAME
from cowbranchd.errors import InvalidArgument, Unauthenticated
from cowbranchd.safefs import open_dir, read_regular

__all__ = ["ADMIN", "Caller", "IdentityInterceptor", "TokenBook", "current_caller", "read_token"]

log = structlog.get_logger("cowbranchd.auth")

MAX_TOKEN_BYTES = 4096
MIN_TOKEN_CHARS = 16
HEALTH_PREFIX = "/grpc.health.v1.Health/"


@dataclass(frozen=True)
class Caller:
    """An identity: the admin, or a tenant by name. Branches record their
    creator's name as their owner."""

    name: str
    admin: bool = False

    def owns(self, owner: str) -> bool:
        """Whether this caller may act on what `owner` owns (records made
        before owners existed have none: the admin's)."""
        return self.admin or owner == self.name


ADMIN = Caller("admin", admin=True)

_CALLER: contextvars.ContextVar[Caller | None] = contextvars.ContextVar("caller", default=None)


def current_caller() -> Caller:
    """The caller of the RPC this thread serves."""
    caller = _CALLER.get()
    if caller is None:  # every listener resolves one before a servicer runs
        raise Unauthenticated("no caller identity for this call")
    return caller


def _digest(token: bytes) -> bytes:
    return hashlib.sha256(token).digest()


class TokenBook:
    """Bearer tokens -> callers. Kept as SHA-256 digests and looked up by
    digest, so no comparison runs over the secret itself; the tenant
    directory is re-read whenever its mtime changes (replace a token file by
    rename, or touch the directory)."""

    def __init__(self, admin_token: str | None, tokens_dir: str) -> None:
        self._admin = _digest(admin_token.encode()) if admin_token else None
        self._dir = tokens_dir
        self._lock = threading.Lock()
        self._seen_mtime = -1
        self._tenants: dict[bytes, str] = {}
        if tokens_dir:
            self._reload(strict=True)

    @property
    def admin_required(self) -> bool:
        return self._admin is not None

    @property
    def has_tenants(self) -> bool:
        return bool(self._dir)

    def lookup(self, offered: bytes) -> Caller | None:
        digest = _digest(offered)
        if self._admin is not None and hmac.compare_digest(digest, self._admin):
            return ADMIN
        if self._dir:
            self._reload(strict=False)
        with self._lock:
            name = self._tenants.get(digest)
        return Caller(name) if name else None

    def _reload(self, *, strict: bool) -> None:
        """Read the tokens directory if it changed. At start-up (`strict`) an
        unusable directory stops the daemon; later the last good set stays."""
        try:
            mtime = os.stat(self._dir).st_mtime_ns
            with self._lock:
                if mtime == self._seen_mtime:
                    return
            tenants = read_tokens_dir(self._dir)
        except (OSError, InvalidArgument) as exc:
            problem = exc.problem if isinstance(exc, InvalidArgument) else exc.strerror
            if strict:
                raise InvalidArgument("tenants.tokens_dir", f"{self._dir}: {problem}") from exc
            log.warning("tokens_dir_unreadable", path=self._dir, error=problem)
            return
        with self._lock:
            self._tenants = {_digest(token.encode()): name for name, token in tenants.items()}
            self._seen_mtime = mtime
        log.info("tenant_tokens_loaded", tenants=sorted(tenants))


def read_tokens_dir(path: str) -> dict[str, str]:
    """tenant -> token from `path`: a root-owned directory no one else may
    write, holding one root-owned file per tenant that no one else may read.
    Files breaking those rules are skipped with a warning (a tenant whose
    token leaked to others must not keep working); links are never followed."""
    tokens: dict[str, str] = {}
    with open_dir(path) as dir_fd:
        st = os.fstat(dir_fd)
        if st.st_uid != 0 or st.st_mode & 0o022:
            raise InvalidArgument(
                "tenants.tokens_dir", f"{path} must be owned by root and writable by root only"
            )
        for name in sorted(os.listdir(dir_fd)):
            if name.startswith("."):
                continue
            shown = os.path.join(path, name)
            why = _unusable_token_file(dir_fd, name)
            if why:
                log.warning("tenant_token_skipped", path=shown, reason=why)
                continue
            data = read_regular(dir_fd, name, limit=MAX_TOKEN_BYTES, shown=shown) or b""
            token = data.decode("utf-8", "replace").strip()
            if len(token) < MIN_TOKEN_CHARS:
                log.warning(
                    "tenant_token_skipped",
                    path=shown,
                    reason=f"holds fewer than {MIN_TOKEN_CHARS} characters",
                )
                continue
            tokens[name] = token
    return tokens


def _unusable_token_file(dir_fd: int, name: str) -> str:
    if not TENANT_NAME.fullmatch(name) or name == "admin":
        return "the file name is not a tenant name (^[a-z][a-z0-9-]{0,62}$, not 'admin')"
    st = os.stat(name, dir_fd=dir_fd, follow_symlinks=False)
    if not stat.S_ISREG(st.st_mode):
        return "is not a regular file"
    if st.st_uid != 0 or st.st_mode & 0o077:
        return "must be owned by root and readable by root only (chmod 600)"
    return ""


class IdentityInterceptor(grpc.ServerInterceptor):  # type: ignore[type-arg]
    """Resolves the caller of every call arriving on one listener (see the
    module docstring) and runs the handler with it; UNAUTHENTICATED for an
    unknown token, or for no token where the listener has no identity."""

    def __init__(self, book: TokenBook, default: Caller | None) -> None:
        self._book = book
        self._default = default

        def deny(message: str) -> grpc.RpcMethodHandler:  # type: ignore[type-arg]
            def abort(request: object, context: grpc.ServicerContext) -> None:
                context.abort(grpc.StatusCode.UNAUTHENTICATED, message)

            return grpc.unary_unary_rpc_method_handler(abort)

        self._unknown = deny("unknown bearer token")
        self._missing = deny("this listener requires a bearer token (COWBRANCHD_TOKEN)")

    def intercept_service(self, continuation, handler_call_details):  # type: ignore[no-untyped-def]
        if handler_call_details.method.startswith(HEALTH_PREFIX):
            return continuation(handler_call_details)
        metadata = dict(handler_call_details.invocation_metadata or ())
        offered = metadata.get("authorization", "")
        if isinstance(offered, str):
            offered = offered.encode()
        if offered:
            token = offered.removeprefix(b"Bearer ")
            caller = self._book.lookup(token) if token != offered else None
            if caller is None:
                return self._unknown
        elif self._default is None:
            return self._missing
        else:
            caller = self._default
        handler = continuation(handler_call_details)
        return None if handler is None else _as_caller(handler, caller)


def _as_caller(handler: Any, caller: Caller) -> Any:
    """`handler` with each behaviour run under `caller` (streams too: the
    variable is set around the whole iteration, in the thread that runs it)."""

    def unary(behaviour: Callable[..., Any]) -> Callable[..., Any]:
        def run(request: Any, context: grpc.ServicerContext) -> Any:
            token = _CALLER.set(caller)
            try:
                return behaviour(request, context)
            finally:
                _CALLER.reset(token)

        return run

    def streaming(behaviour: Callable[..., Iterator[Any]]) -> Callable[..., Iterator[Any]]:
        def run(request: Any, context: grpc.ServicerContext) -> Iterator[Any]:
            token = _CALLER.set(caller)
            try:
                yield from behaviour(request, context)
            finally:
                _CALLER.reset(token)

        return run

    changes = {}
    for attr, wrap in (
        ("unary_unary", unary),
        ("stream_unary", unary),
        ("unary_stream", streaming),
        ("stream_stream", streaming),
    ):
        behaviour = getattr(handler, attr)
        if behaviour is not None:
            changes[attr] = wrap(behaviour)
    return handler._replace(**changes)


def read_token(path: str) -> str:
    """The bearer token in `path` (surrounding whitespace dropped); an
    unreadable or empty file is refused rather than served without a token."""
    try:
        token = Path(path).read_text().strip()
    except (OSError, UnicodeDecodeError) as exc:
        reason = exc.strerror if isinstance(exc, OSError) else "not UTF-8 text"
        raise InvalidArgument("daemon.token_file", f"cannot read {path}: {reason}") from exc
    if not token:
        raise InvalidArgument("daemon.token_file", f"{path} holds no token")
    return token
