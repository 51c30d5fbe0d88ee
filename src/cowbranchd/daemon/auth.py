"""Who may call: the bearer token on every call but health checks, compared in
constant time; the token file read once, refused when unreadable or empty."""

from __future__ import annotations

import hmac
from pathlib import Path

import grpc

from cowbranchd.errors import InvalidArgument

__all__ = ["TokenInterceptor", "read_token"]


class TokenInterceptor(grpc.ServerInterceptor):  # type: ignore[type-arg]
    """With `daemon.token_file` set, requires `authorization: Bearer <token>`
    on every call but health checks (the interceptor cannot tell the Unix
    socket from TCP, so local clients send it too: COWBRANCHD_TOKEN)."""

    def __init__(self, token: str) -> None:
        self._expected = f"Bearer {token}".encode()

        def deny(request: object, context: grpc.ServicerContext) -> None:
            context.abort(grpc.StatusCode.UNAUTHENTICATED, "missing or wrong bearer token")

        self._deny = grpc.unary_unary_rpc_method_handler(deny)

    def intercept_service(self, continuation, handler_call_details):  # type: ignore[no-untyped-def]
        metadata = dict(handler_call_details.invocation_metadata or ())
        offered = metadata.get("authorization", "")
        if isinstance(offered, str):
            offered = offered.encode()
        # Constant time, so response timing does not reveal how much of a
        # guessed token was right (on bytes: compare_digest refuses non-ASCII str).
        if hmac.compare_digest(offered, self._expected):
            return continuation(handler_call_details)
        # Health checks stay open for load balancers and probes.
        if handler_call_details.method.startswith("/grpc.health.v1.Health/"):
            return continuation(handler_call_details)
        return self._deny


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
