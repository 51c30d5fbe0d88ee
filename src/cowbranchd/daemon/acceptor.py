"""The daemon's stand-in for the postmasters of suspended branches: it
listens on each one's TCP port while no postgres does, and on the first
connection gives the port back and hands the accepted clients to the
branch's wake callback, which starts postgres there and `relay`s them to it.

One selector thread serves every suspended branch (a listening socket costs
no process and a few KiB of kernel memory); each wake runs on a thread of its
own, so one slow start never delays another branch's.

It never reads or answers the PostgreSQL protocol: the bytes pass unchanged
to the branch's own postgres over TCP, so the branch's authentication (SCRAM
under its pg_hba) decides who gets in, exactly as for a direct connection.
Never over the branch's Unix socket: local connections are trusted there. A
listener only ever leads to the branch it was armed for.
"""

from __future__ import annotations

import contextlib
import errno
import selectors
import socket
import threading
from collections.abc import Callable
from dataclasses import dataclass

import structlog

from cowbranchd.postgres import PortInUse

__all__ = ["Acceptor", "WakeCallback", "relay"]

log = structlog.get_logger("cowbranchd.acceptor")

# Connections the kernel completes for a suspended branch before the daemon
# accepts them; a burst beyond it is refused until postgres listens.
BACKLOG = 128
RELAY_BUFFER = 64 * 1024
CONNECT_TIMEOUT_S = 5.0

WakeCallback = Callable[[list[socket.socket]], None]


@dataclass
class _Armed:
    port: int
    listeners: list[socket.socket]
    on_wake: WakeCallback


class Acceptor:
    """Listeners of suspended branches, by key (the branch id). Thread-safe."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._armed: dict[str, _Armed] = {}
        self._selector: selectors.BaseSelector | None = None
        self._wakeup: tuple[socket.socket, socket.socket] | None = None

    def arm(
        self,
        key: str,
        addresses: list[tuple[socket.AddressFamily, str]],
        port: int,
        on_wake: WakeCallback,
    ) -> None:
        """Listen on `port` at `addresses` for `key`; the first connection
        closes these listeners and calls `on_wake` (on a thread of its own)
        with every connection accepted by then. PortInUse if a bind fails."""
        listeners = _listen(addresses, port)
        with self._lock:
            selector = self._started()
            old = self._armed.pop(key, None)
            if old is not None:
                self._close(old)
            self._armed[key] = _Armed(port, listeners, on_wake)
            for sock in listeners:
                selector.register(sock, selectors.EVENT_READ, key)
        self._poke()

    def disarm(self, key: str) -> bool:
        """Stop listening for `key` (its port is free for postgres again).
        False if it was not armed. Idempotent."""
        with self._lock:
            armed = self._armed.pop(key, None)
            if armed is not None:
                self._close(armed)
        return armed is not None

    def is_armed(self, key: str) -> bool:
        with self._lock:
            return key in self._armed

    def armed_count(self) -> int:
        with self._lock:
            return len(self._armed)

    def _close(self, armed: _Armed) -> None:
        """Unregister and close `armed`'s listeners. Caller holds `_lock`."""
        for sock in armed.listeners:
            if self._selector is not None:
                with contextlib.suppress(KeyError, ValueError):
                    self._selector.unregister(sock)
            sock.close()

    def _started(self) -> selectors.BaseSelector:
        """The selector, its thread started on first use. Caller holds `_lock`."""
        if self._selector is None:
            self._selector = selectors.DefaultSelector()
            self._wakeup = socket.socketpair()
            self._wakeup[0].setblocking(False)
            self._selector.register(self._wakeup[0], selectors.EVENT_READ, None)
            threading.Thread(target=self._run, name="acceptor", daemon=True).start()
        return self._selector

    def _poke(self) -> None:
        """Wake the selector thread so it sees what changed."""
        if self._wakeup is not None:
            with contextlib.suppress(BlockingIOError):
                self._wakeup[1].send(b"\0")

    def _run(self) -> None:
        assert self._selector is not None and self._wakeup is not None
        while True:
            try:
                events = self._selector.select()
            except OSError:
                # A listener closed by disarm() while the selector watched it.
                continue
            for selector_key, _ in events:
                if selector_key.data is None:
                    with contextlib.suppress(BlockingIOError):
                        self._wakeup[0].recv(4096)
                    continue
                try:
                    self._accept(str(selector_key.data))
                except Exception:
                    log.exception("acceptor_failed", branch=selector_key.data)

    def _accept(self, key: str) -> None:
        """Take every connection waiting for `key`; if there is one, close its
        listeners and wake the branch (a readiness that yields nothing, a
        client gone before accept, keeps it armed)."""
        with self._lock:
            armed = self._armed.get(key)
            if armed is None:
                return
            clients: list[socket.socket] = []
            for sock in armed.listeners:
                while True:
                    try:
                        conn, _ = sock.accept()
                    except (BlockingIOError, InterruptedError):
                        break
                    except OSError as exc:
                        # ECONNABORTED and the like: that client is gone, not the listener.
                        log.debug("accept_failed", branch=key, error=str(exc))
                        break
                    conn.setblocking(True)
                    clients.append(conn)
            if not clients:
                return
            del self._armed[key]
            self._close(armed)
        threading.Thread(
            target=armed.on_wake, args=(clients,), name=f"wake-{key}", daemon=True
        ).start()


def _listen(addresses: list[tuple[socket.AddressFamily, str]], port: int) -> list[socket.socket]:
    listeners: list[socket.socket] = []
    try:
        for family, address in addresses:
            sock = socket.socket(family, socket.SOCK_STREAM)
            # As postgres binds: a port whose old connections linger in
            # TIME_WAIT is free, and IPv6 stays apart from IPv4.
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if family == socket.AF_INET6:
                sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
            try:
                sock.bind((address, port))
            except OSError as exc:
                sock.close()
                if family == socket.AF_INET6 and exc.errno in (
                    errno.EADDRNOTAVAIL,
                    errno.EAFNOSUPPORT,
                ):
                    continue  # IPv6 disabled on this host: postgres skips it too
                raise PortInUse(f"cannot listen on {address} port {port}: {exc}") from exc
            listeners.append(sock)
            sock.listen(BACKLOG)
            sock.setblocking(False)
    except BaseException:
        for sock in listeners:
            sock.close()
        raise
    return listeners


def relay(client: socket.socket, host: str, port: int) -> None:
    """Join `client` to a new TCP connection to `host`:`port` (the branch's
    postgres) until either side closes; returns at once (two threads copy).
    Bytes pass unchanged, so postgres authenticates the client itself."""
    try:
        upstream = socket.create_connection((host, port), timeout=CONNECT_TIMEOUT_S)
    except OSError as exc:
        log.warning("relay_connect_failed", port=port, error=str(exc))
        client.close()
        return
    upstream.settimeout(None)
    for sock in (client, upstream):
        # Both ends of a query round trip are small writes: no Nagle delay here.
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    pair = _Pair(client, upstream)
    for src, dst in ((client, upstream), (upstream, client)):
        threading.Thread(
            target=pair.pump, args=(src, dst), name=f"relay-{port}", daemon=True
        ).start()


class _Pair:
    """Two sockets joined both ways; the second direction to end closes both."""

    def __init__(self, a: socket.socket, b: socket.socket) -> None:
        self._socks = (a, b)
        self._lock = threading.Lock()
        self._running = 2

    def pump(self, src: socket.socket, dst: socket.socket) -> None:
        buf = bytearray(RELAY_BUFFER)
        view = memoryview(buf)
        try:
            while n := src.recv_into(buf):
                dst.sendall(view[:n])
            with contextlib.suppress(OSError):
                dst.shutdown(socket.SHUT_WR)  # pass the EOF on
        except OSError:
            # One side broke: end the other direction too.
            for sock in self._socks:
                with contextlib.suppress(OSError):
                    sock.shutdown(socket.SHUT_RDWR)
        finally:
            with self._lock:
                self._running -= 1
                last = self._running == 0
            if last:
                for sock in self._socks:
                    sock.close()
