"""How the clients reach the daemon: address resolution, channels (Unix socket
or TCP, optional TLS and bearer token), the retry policy, and the one place a
gRPC status becomes a cowbranchd error.

Shared by the sync and the async client; it knows nothing about branches.
Only UNAVAILABLE is ever retried: every other status is an answer.
"""

from __future__ import annotations

import os
import random
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import grpc
import grpc.aio

from cowbranchd.errors import (
    CowbranchError,
    DeadlineExceeded,
    InvalidArgument,
    Unauthenticated,
    Unavailable,
    error_for_code,
)

__all__ = [
    "ADDRESS_ENV",
    "DEFAULT_ADDRESS",
    "TLS_ROOT_CERT_ENV",
    "TOKEN_ENV",
    "Endpoint",
    "RetryPolicy",
    "close_aio_channel",
    "close_channel",
    "deadline_error",
    "open_aio_channel",
    "open_channel",
    "refuse_plaintext_token",
    "resolve_endpoint",
    "translate",
]

DEFAULT_ADDRESS = "unix:///run/cowbranchd/api.sock"
ADDRESS_ENV = "COWBRANCHD_ADDRESS"
TOKEN_ENV = "COWBRANCHD_TOKEN"
TLS_ROOT_CERT_ENV = "COWBRANCHD_TLS_ROOT_CERT"

# Reconnect quickly after a daemon restart; grpc's default starts at 1 s.
_CHANNEL_OPTIONS: Sequence[tuple[str, int]] = (
    ("grpc.initial_reconnect_backoff_ms", 100),
    ("grpc.min_reconnect_backoff_ms", 100),
    ("grpc.max_reconnect_backoff_ms", 1000),
)
_HOST_PORT = re.compile(r"^(?:\[[0-9a-fA-F:.]+\]|[A-Za-z0-9_.-]+):(\d{1,5})$")
_UNREACHABLE_HINTS = (
    "failed to connect",
    "connection refused",
    "no such file",
    "connections to all backends failing",
    "socket closed",
    "connection reset",
    "dns resolution failed",
    "name resolution",
)


@dataclass(frozen=True)
class Endpoint:
    """Where and how to reach the daemon: `address` as shown to people, `target` for grpc."""

    address: str
    target: str
    token: str | None = None
    tls_root_cert: bytes | None = None

    @property
    def is_unix(self) -> bool:
        """True for a Unix socket address."""
        return self.target.startswith("unix:")

    def metadata(self) -> tuple[tuple[str, str], ...]:
        """Call metadata: the bearer token when one is set."""
        return (("authorization", f"Bearer {self.token}"),) if self.token else ()


def resolve_endpoint(
    address: str | None = None,
    *,
    token: str | None = None,
    tls_root_cert: str | os.PathLike[str] | bytes | None = None,
) -> Endpoint:
    """The endpoint from the arguments, else the environment, else the default socket.

    The environment: `COWBRANCHD_ADDRESS`, `COWBRANCHD_TOKEN`, `COWBRANCHD_TLS_ROOT_CERT`.

    Accepted addresses: `unix:///abs/path.sock`, `unix:relative.sock`, a bare
    absolute path, `host:port`, `[::1]:port`, and grpc's own `dns:`/`ipv4:`/`ipv6:` forms.
    """
    chosen = (address or os.environ.get(ADDRESS_ENV) or DEFAULT_ADDRESS).strip()
    token = token or os.environ.get(TOKEN_ENV) or None
    cert_source = tls_root_cert or os.environ.get(TLS_ROOT_CERT_ENV) or None
    cert: bytes | None
    if cert_source is None or isinstance(cert_source, bytes):
        cert = cert_source
    else:
        try:
            cert = Path(cert_source).read_bytes()
        except OSError as exc:
            raise InvalidArgument(
                "tls_root_cert", f"cannot read {os.fspath(cert_source)!r}: {exc.strerror}"
            ) from exc
    if chosen.startswith("/"):
        chosen = f"unix://{chosen}"
    if chosen.startswith("unix:"):
        if chosen.removeprefix("unix:").lstrip("/") == "":
            raise InvalidArgument("address", f"{chosen!r} names no socket path")
        if cert is not None:
            raise InvalidArgument("tls_root_cert", "TLS is only for TCP addresses")
        return Endpoint(chosen, chosen, token, None)
    if chosen.startswith(("dns:", "ipv4:", "ipv6:")) or (
        (m := _HOST_PORT.match(chosen)) and 0 < int(m.group(1)) < 65536
    ):
        return Endpoint(chosen, chosen, token, cert)
    raise InvalidArgument(
        "address",
        f"{chosen!r} is not unix:///path/to/api.sock or host:port",
    )


def refuse_plaintext_token(endpoint: Endpoint) -> None:
    """Raise before any connection when `endpoint` would send its token over
    TCP without TLS, where anyone on the path could read and replay it.

    A Unix socket is local and sits in a 0750 directory, so the token goes
    there (a daemon with `token_file` set asks for it on the socket too).
    """
    if endpoint.token and not endpoint.is_unix and endpoint.tls_root_cert is None:
        raise InvalidArgument(
            "token",
            f"refusing to send the token to {endpoint.address} over plaintext TCP; "
            f"give the daemon's TLS root certificate (tls_root_cert=..., --tls-root-cert or "
            f"{TLS_ROOT_CERT_ENV}), or use its Unix socket",
        )


def open_channel(endpoint: Endpoint) -> grpc.Channel:
    """A sync channel to `endpoint` (TLS when it has a root certificate).

    Raises InvalidArgument for a token over plaintext TCP (see `refuse_plaintext_token`).
    """
    refuse_plaintext_token(endpoint)
    if endpoint.tls_root_cert is not None:
        creds = grpc.ssl_channel_credentials(root_certificates=endpoint.tls_root_cert)
        return grpc.secure_channel(endpoint.target, creds, options=_CHANNEL_OPTIONS)
    return grpc.insecure_channel(endpoint.target, options=_CHANNEL_OPTIONS)


def open_aio_channel(endpoint: Endpoint) -> grpc.aio.Channel:
    """An asyncio channel to `endpoint` (TLS when it has a root certificate).

    Raises InvalidArgument for a token over plaintext TCP (see `refuse_plaintext_token`).
    """
    refuse_plaintext_token(endpoint)
    if endpoint.tls_root_cert is not None:
        creds = grpc.ssl_channel_credentials(root_certificates=endpoint.tls_root_cert)
        return grpc.aio.secure_channel(endpoint.target, creds, options=_CHANNEL_OPTIONS)
    return grpc.aio.insecure_channel(endpoint.target, options=_CHANNEL_OPTIONS)


def close_channel(channel: grpc.Channel) -> None:
    """Close a sync channel; in-flight calls are cancelled."""
    channel.close()


async def close_aio_channel(channel: grpc.aio.Channel) -> None:
    """Close an asyncio channel at once (no grace period), like `close_channel`."""
    await channel.close(None)


@dataclass(frozen=True)
class RetryPolicy:
    """How UNAVAILABLE is retried: exponential backoff with jitter, for `max_elapsed` seconds.

    A call also never outlives its own timeout. `RetryPolicy(max_elapsed=0)`
    turns retries off.
    """

    initial_backoff: float = 0.05
    max_backoff: float = 2.0
    multiplier: float = 2.0
    max_elapsed: float = 15.0

    def delay(self, attempt: int, rng: random.Random | None = None) -> float:
        """Seconds before retry number `attempt + 1`: half fixed, half random (equal jitter)."""
        cap = min(self.max_backoff, self.initial_backoff * self.multiplier**attempt)
        return cap / 2 + (rng or random).uniform(0, cap / 2)

    def next_delay(self, attempt: int, elapsed: float, remaining: float) -> float | None:
        """The wait before the next attempt, or None when retrying must stop."""
        wait = self.delay(attempt)
        if elapsed + wait > self.max_elapsed or wait >= remaining:
            return None
        return wait


def _status(exc: BaseException) -> tuple[grpc.StatusCode, str]:
    if isinstance(exc, grpc.aio.AioRpcError):
        return exc.code(), exc.details() or ""
    if isinstance(exc, grpc.Call):
        return exc.code(), exc.details() or ""
    return grpc.StatusCode.UNKNOWN, str(exc)


def status_code(exc: BaseException) -> grpc.StatusCode:
    """The status code carried by a grpc error (UNKNOWN for anything else)."""
    return _status(exc)[0]


def translate(exc: BaseException, endpoint: Endpoint) -> CowbranchError:
    """The cowbranchd error for a failed call, with a message that says what to do."""
    code, details = _status(exc)
    where = endpoint.address
    if code == grpc.StatusCode.UNAVAILABLE:
        lowered = details.lower()
        if "permission denied" in lowered:
            return Unavailable(
                f"permission denied connecting to {where}: is your user in the group that "
                f"owns the cowbranchd runtime directory? ({details})"
            )
        if any(hint in lowered for hint in _UNREACHABLE_HINTS):
            hint = (
                "is the cowbranchd service running?"
                if endpoint.is_unix
                else "is cowbranchd listening there, and is the address right?"
            )
            return Unavailable(
                f"daemon not reachable at {where} — {hint} "
                f"(COWBRANCHD_ADDRESS selects another address; {details})"
            )
        return Unavailable(
            f"daemon at {where} is unavailable (starting up or draining): {details}; "
            "try again in a moment"
        )
    if code == grpc.StatusCode.UNAUTHENTICATED:
        return Unauthenticated(
            f"{details or 'not authenticated'} — pass a token (token=..., --token or "
            f"{TOKEN_ENV}) that the daemon at {where} accepts"
        )
    if code == grpc.StatusCode.DEADLINE_EXCEEDED:
        return DeadlineExceeded(f"no answer from the daemon at {where} in time ({details})")
    return error_for_code(code, details)


def deadline_error(endpoint: Endpoint, timeout: float) -> DeadlineExceeded:
    """The error when a call's overall deadline ran out between retries."""
    return DeadlineExceeded(
        f"no answer from the daemon at {endpoint.address} within {timeout:g}s (retries included)"
    )
