"""TCP ports for branch postmasters: hand out each port of a range to one branch at a time.

A port is handed out only if no other branch holds it and a real bind on it
succeeds now (something outside the daemon may be squatting it). The next
search starts after the last port handed out, so a port just released (its
old connections possibly in TIME_WAIT) is the last to be handed out again.
The bind check can still race with another program: `postgres.start` raises
PortInUse then, and the caller asks for another port.

Thread-safe: one lock guards the in-memory state; binds happen outside it.
"""

from __future__ import annotations

import errno
import socket
import threading
from collections.abc import Collection

from .errors import ResourceExhausted

__all__ = ["PortAllocator", "UidAllocator", "bind_addresses", "port_free"]

_Address = tuple[socket.AddressFamily, str]


def _addresses(host: str) -> list[_Address]:
    """The (family, address) pairs postgres would bind for listen_addresses `host`."""
    found: list[_Address] = [(socket.AF_INET, "127.0.0.1")]
    for name in (h.strip() for h in host.split(",")):
        if name in ("", "127.0.0.1"):
            continue
        if name == "*":
            found += [(socket.AF_INET, "0.0.0.0"), (socket.AF_INET6, "::")]
            continue
        for family, _, _, _, sockaddr in socket.getaddrinfo(
            name, None, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
        ):
            if family in (socket.AF_INET, socket.AF_INET6):
                found.append((family, str(sockaddr[0])))
    return list(dict.fromkeys(found))


def _can_bind(addresses: list[_Address], port: int) -> bool:
    for family, address in addresses:
        with socket.socket(family, socket.SOCK_STREAM) as s:
            # SO_REUSEADDR as postgres sets it: a port whose last connections
            # linger in TIME_WAIT is free for postgres, so it is free here;
            # only a live listener (or a non-reusable bind) makes it busy.
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if family == socket.AF_INET6:
                s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
            try:
                s.bind((address, port))
            except OSError as exc:
                if exc.errno in (errno.EADDRNOTAVAIL, errno.EAFNOSUPPORT) and address in (
                    "::",
                    "::1",
                ):
                    continue  # IPv6 disabled on this host: postgres skips it too
                return False
    return True


def bind_addresses(listen_addresses: str) -> list[tuple[socket.AddressFamily, str]]:
    """The (family, address) pairs a port is held on for postgres with
    `listen_addresses` (loopback always): what the bind probe checks, and
    what the daemon listens on for a suspended branch."""
    return _addresses(listen_addresses)


def port_free(listen_addresses: str, port: int) -> bool:
    """Whether postgres could listen on `port` at `listen_addresses` now: the
    one bind probe, used before handing a port out and to tell why a start
    failed (language-independent, unlike postgres's log)."""
    return _can_bind(_addresses(listen_addresses), port)


class PortAllocator:
    """Ports `first`..`last` for postmasters listening on `host` (listen_addresses)."""

    def __init__(self, first: int, last: int, host: str) -> None:
        if not 1 <= first <= last <= 65535:
            raise ValueError(f"bad port range {first}-{last}")
        self.first = first
        self.last = last
        self.host = host
        self._addresses = _addresses(host)
        self._lock = threading.Lock()
        self._in_use: set[int] = set()
        self._next = first

    def __repr__(self) -> str:
        return f"PortAllocator({self.first}-{self.last}, host={self.host!r})"

    def _claim(self, skip: set[int]) -> int | None:
        """Under the lock: hand out the next port not in use or in `skip`, or None."""
        size = self.last - self.first + 1
        with self._lock:
            for i in range(size):
                port = self.first + (self._next - self.first + i) % size
                if port not in self._in_use and port not in skip:
                    self._in_use.add(port)
                    self._next = port + 1 if port < self.last else self.first
                    return port
        return None

    def allocate(self, exclude: Collection[int] = ()) -> int:
        """A port from the range that no branch holds and that binds now.

        Raises ResourceExhausted when there is none.
        """
        tried = set(exclude)
        while (port := self._claim(tried)) is not None:
            if _can_bind(self._addresses, port):
                return port
            tried.add(port)
            self.release(port)
        raise ResourceExhausted(f"no free port in {self.first}-{self.last}")

    def release(self, port: int) -> None:
        """Give `port` back; releasing a port not handed out is a no-op."""
        with self._lock:
            self._in_use.discard(port)

    def reserve(self, port: int) -> bool:
        """Mark `port` as held (an adopted branch's); False if it already was."""
        with self._lock:
            if port in self._in_use:
                return False
            self._in_use.add(port)
            return True

    def in_use(self) -> set[int]:
        """The ports currently held by branches."""
        with self._lock:
            return set(self._in_use)


class UidAllocator:
    """OS user ids for branch postmasters: each id of a range to one branch at a
    time (its gid is the same number). No /etc/passwd entry is needed: the
    id only has to be nobody else's, which the operator's range promises."""

    def __init__(self, first: int, last: int) -> None:
        self.first, self.last = first, last
        self._lock = threading.Lock()
        self._used: set[int] = set()
        self._next = first

    def allocate(self) -> int:
        with self._lock:
            size = self.last - self.first + 1
            for step in range(size):
                uid = self.first + (self._next - self.first + step) % size
                if uid not in self._used:
                    self._used.add(uid)
                    self._next = uid + 1
                    return uid
        raise ResourceExhausted(
            f"every branch uid in {self.first}-{self.last} is in use (postgres.branch_uids)"
        )

    def reserve(self, uid: int) -> None:
        with self._lock:
            self._used.add(uid)

    def release(self, uid: int) -> None:
        with self._lock:
            self._used.discard(uid)
