"""The daemon's stand-in for the postmasters of suspended branches: it
listens on each one's TCP port while no postgres does, and on the first
connection hands the port over to the branch's wake callback (a `Waking`),
which starts postgres there and has every connection that came meanwhile
relayed to it.

The hand-over leaves no moment in which a connection is refused. Postgres
cannot share the port (it sets SO_REUSEADDR but never SO_REUSEPORT, so its
bind fails while another socket listens there, and the kernel would spread
new connections over both listeners anyway, postgres's answering "the
database system is starting up"). So before the daemon closes its listener
it has the kernel steer the port's new connections to a side listener of its
own on another port (a BPF `sk_lookup` program, `Steering`); postgres binds
the port meanwhile without ever seeing a client; once postgres answers, the
steering ends (new connections reach postgres directly), and every
connection accepted or still queued on either listener is relayed. The side
listeners stay a moment longer (`STEER_GRACE_S`) for handshakes begun just
before that. Where the kernel cannot steer (no `sk_lookup`, before Linux
5.9; no CAP_BPF), the listener is closed as before and connections during
the restart are refused: logged once.

One selector thread serves every suspended branch (a listening socket costs
no process and a few KiB of kernel memory); each wake runs on a thread of its
own, so one slow start never delays another branch's.

It never reads or answers the PostgreSQL protocol: the bytes pass unchanged
to the branch's own postgres over TCP, so the branch's authentication (SCRAM
under its pg_hba) decides who gets in, exactly as for a direct connection.
Never over the branch's Unix socket: local connections are trusted there. A
listener, and a steering, only ever leads to the branch it was armed for, and
only for the addresses postgres listens on.
"""

from __future__ import annotations

import contextlib
import errno
import selectors
import socket
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

import structlog

from cowbranchd.postgres import PortInUse

from .steering import Steering, SteerKey

__all__ = ["Acceptor", "WakeCallback", "Waking", "relay"]

log = structlog.get_logger("cowbranchd.acceptor")

# Connections the kernel completes for a suspended branch (and, while it
# starts, for its side listener) before the daemon accepts them; beyond it a
# new connection's SYN is dropped and the client retries it a second later.
BACKLOG = 128
RELAY_BUFFER = 64 * 1024
CONNECT_TIMEOUT_S = 5.0
# How long a side listener outlives the steering: a handshake whose SYN was
# steered to it just before completes within one round trip.
STEER_GRACE_S = 1.0

_Address = tuple[socket.AddressFamily, str]


class Waking:
    """The port of a suspended branch while its postgres starts, handed to
    the wake callback on a thread of its own: the daemon no longer listens
    on the port (postgres may bind it), yet nothing is refused there: new
    connections queue on side listeners until `relay`. Once the callback
    returns, whatever was not relayed is closed."""

    def __init__(self, key: str, port: int, clients: list[socket.socket]) -> None:
        self.key = key
        self.port = port
        self._lock = threading.Lock()
        self._clients = clients
        self._side: list[socket.socket] = []
        self._steering: Steering | None = None
        self._steered: list[SteerKey] = []
        self._stopped = False
        self._target: tuple[str, int] | None = None

    def relay(self, host: str, port: int) -> int:
        """Postgres answers on `host`:`port` now: end the steering (new
        connections reach it directly) and relay every connection taken so
        far; the ones still completing on the side listeners follow, relayed
        by the acceptor once the callback returns. How many were relayed."""
        with self._lock:
            self._unsteer()
            self._target = (host, port)
            clients = self._clients + [c for s in self._side for c in _take(s, self.key)]
            self._clients = []
        for client in clients:
            relay(client, host, port)
        return len(clients)

    def stop_steering(self) -> None:
        """Queue no more new connections to the port (it was disarmed: it may
        have another owner soon); those taken stay. Idempotent."""
        with self._lock:
            self._stopped = True
            self._unsteer()

    def _take_port(self, listeners: list[socket.socket], steering: Steering) -> None:
        """Steer the port to side listeners (if the kernel can), then take
        what `listeners` queued and close them: postgres may bind now."""
        with self._lock:
            try:
                if not self._stopped:
                    try:
                        self._steer(listeners, steering)
                    except OSError as exc:
                        self._unsteer()
                        for sock in self._side:
                            sock.close()
                        self._side = []
                        steering.unavailable(exc)
            finally:
                for sock in listeners:
                    self._clients += _take(sock, self.key)
                    sock.close()

    def _steer(self, listeners: list[socket.socket], steering: Steering) -> None:
        """A side listener at each listener's address, and the port steered
        there. Caller holds `_lock`; `_unsteer` undoes it."""
        self._steering = steering
        for sock in listeners:
            address = str(sock.getsockname()[0])
            side = _listener(sock.family, address, 0)
            self._side.append(side)
            steer_key = SteerKey(sock.family, address, self.port)
            steering.add(steer_key, side)
            self._steered.append(steer_key)

    def _unsteer(self) -> None:
        """Caller holds `_lock`."""
        while self._steered:
            assert self._steering is not None
            self._steering.remove(self._steered.pop())

    def _finish(self) -> None:
        """After the callback: if it relayed, relay what completes on the
        side listeners within STEER_GRACE_S; then close everything left."""
        with self._lock:
            self._unsteer()
            target, side, self._side = self._target, self._side, []
        try:
            if target is not None and side:
                self._linger(side, *target)
        finally:
            with self._lock:
                late = [c for sock in side for c in _take(sock, self.key)]
                for sock in side:
                    sock.close()
                if target is None:
                    late += self._clients
                self._clients = []
            for client in late:
                if target is not None:
                    relay(client, *target)
                else:  # not relayed: they see the connection close
                    with contextlib.suppress(OSError):
                        client.close()

    def _linger(self, side: list[socket.socket], host: str, port: int) -> None:
        """Relay the connections that complete on `side` within STEER_GRACE_S."""
        deadline = time.monotonic() + STEER_GRACE_S
        with selectors.DefaultSelector() as selector:
            for sock in side:
                selector.register(sock, selectors.EVENT_READ, sock)
            while (left := deadline - time.monotonic()) > 0:
                for ready, _ in selector.select(left):
                    for client in _take(ready.data, self.key):
                        relay(client, host, port)


WakeCallback = Callable[[Waking], None]


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
        self._waking: dict[str, Waking] = {}
        self._selector: selectors.BaseSelector | None = None
        self._wakeup: tuple[socket.socket, socket.socket] | None = None
        self._thread: threading.Thread | None = None
        self._wake_threads: set[threading.Thread] = set()
        self._closing = False
        self._steering = Steering()

    def arm(
        self,
        key: str,
        addresses: list[_Address],
        port: int,
        on_wake: WakeCallback,
    ) -> None:
        """Listen on `port` at `addresses` for `key`; the first connection
        calls `on_wake` (on a thread of its own) with a `Waking`: the port
        handed over, every connection to it kept for relaying. PortInUse if
        a bind fails."""
        listeners = _listen(addresses, port)
        with self._lock:
            if self._closing:
                for sock in listeners:
                    sock.close()
                raise RuntimeError("the acceptor is closed")
            selector = self._started()
            old = self._armed.pop(key, None)
            if old is not None:
                self._close(old)
            self._armed[key] = _Armed(port, listeners, on_wake)
            for sock in listeners:
                selector.register(sock, selectors.EVENT_READ, key)
        self._poke()

    def disarm(self, key: str) -> bool:
        """Stop listening for `key` (its port is free for postgres again),
        and end the steering of a wake in progress (the connections it took
        stay with it). False if it was not armed. Idempotent."""
        with self._lock:
            armed = self._armed.pop(key, None)
            if armed is not None:
                self._close(armed)
            waking = self._waking.get(key)
        if waking is not None:
            waking.stop_steering()
        return armed is not None

    def close(self) -> None:
        """Stop listening for every branch, end the selector thread, and wait
        for the wakes under way (they finish as usual). Idempotent."""
        with self._lock:
            for armed in self._armed.values():
                self._close(armed)
            self._armed.clear()
            self._closing = True
            threads = [self._thread] if self._thread is not None else []
        self._poke()
        for thread in threads:
            thread.join()
        with self._lock:
            threads = list(self._wake_threads)
        for thread in threads:
            thread.join()
        self._steering.close()

    def is_armed(self, key: str) -> bool:
        with self._lock:
            return key in self._armed

    def armed_count(self) -> int:
        with self._lock:
            return len(self._armed)

    def _close(self, armed: _Armed) -> None:
        """Unregister and close `armed`'s listeners. Caller holds `_lock`."""
        self._unregister(armed)
        for sock in armed.listeners:
            sock.close()

    def _unregister(self, armed: _Armed) -> None:
        """Caller holds `_lock`."""
        for sock in armed.listeners:
            if self._selector is not None:
                with contextlib.suppress(KeyError, ValueError):
                    self._selector.unregister(sock)

    def _started(self) -> selectors.BaseSelector:
        """The selector, its thread started on first use. Caller holds `_lock`."""
        if self._selector is None:
            self._selector = selectors.DefaultSelector()
            self._wakeup = socket.socketpair()
            self._wakeup[0].setblocking(False)
            self._selector.register(self._wakeup[0], selectors.EVENT_READ, None)
            self._thread = threading.Thread(target=self._run, name="acceptor", daemon=True)
            self._thread.start()
        return self._selector

    def _poke(self) -> None:
        """Wake the selector thread so it sees what changed."""
        if self._wakeup is not None:
            with contextlib.suppress(BlockingIOError):
                self._wakeup[1].send(b"\0")

    def _run(self) -> None:
        assert self._selector is not None and self._wakeup is not None
        while True:
            with self._lock:
                if self._closing:
                    self._selector.close()
                    self._selector = None
                    for sock in self._wakeup:
                        sock.close()
                    self._wakeup = None
                    return
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
        """Take every connection waiting for `key`; if there is one, stop
        watching its listeners and wake the branch (a readiness that yields
        nothing, a client gone before accept, keeps it armed)."""
        with self._lock:
            armed = self._armed.get(key)
            if armed is None:
                return
            clients = [c for sock in armed.listeners for c in _take(sock, key)]
            if not clients:
                return
            del self._armed[key]
            self._unregister(armed)
            waking = Waking(key, armed.port, clients)
            self._waking[key] = waking
            thread = threading.Thread(
                target=self._hand_over, args=(waking, armed), name=f"wake-{key}", daemon=True
            )
            self._wake_threads.add(thread)
        thread.start()

    def _hand_over(self, waking: Waking, armed: _Armed) -> None:
        """The wake thread: hand the port over, run the callback, tidy up."""
        try:
            waking._take_port(armed.listeners, self._steering)
            armed.on_wake(waking)
        except Exception:
            log.exception("wake_failed", branch=waking.key)
        finally:
            waking._finish()
            with self._lock:
                if self._waking.get(waking.key) is waking:
                    del self._waking[waking.key]
                self._wake_threads.discard(threading.current_thread())


def _take(sock: socket.socket, key: str) -> list[socket.socket]:
    """Every connection queued on the non-blocking listener `sock` (as
    blocking sockets)."""
    clients: list[socket.socket] = []
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
    return clients


def _listener(family: socket.AddressFamily, address: str, port: int) -> socket.socket:
    """A non-blocking listener bound as postgres binds: a port whose old
    connections linger in TIME_WAIT is free, and IPv6 stays apart from IPv4.
    SO_REUSEADDR also lets postgres bind its port beside the connections a
    side listener accepted for it (they inherit the option; local port: its)."""
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if family == socket.AF_INET6:
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
        sock.bind((address, port))
        sock.listen(BACKLOG)
        sock.setblocking(False)
    except BaseException:
        sock.close()
        raise
    return sock


def _listen(addresses: list[_Address], port: int) -> list[socket.socket]:
    listeners: list[socket.socket] = []
    try:
        for family, address in addresses:
            try:
                listeners.append(_listener(family, address, port))
            except OSError as exc:
                if family == socket.AF_INET6 and exc.errno in (
                    errno.EADDRNOTAVAIL,
                    errno.EAFNOSUPPORT,
                ):
                    continue  # IPv6 disabled on this host: postgres skips it too
                raise PortInUse(f"cannot listen on {address} port {port}: {exc}") from exc
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
