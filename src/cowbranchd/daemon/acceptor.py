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
own on another port (a BPF `sk_lookup` program, `_Steering`); postgres binds
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
import ctypes
import errno
import os
import platform
import selectors
import socket
import struct
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

import structlog

from cowbranchd.postgres import PortInUse
from cowbranchd.storage.kernel import libc

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
        self._steering: _Steering | None = None
        self._steered: list[_SteerKey] = []
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

    def _take_port(self, listeners: list[socket.socket], steering: _Steering) -> None:
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

    def _steer(self, listeners: list[socket.socket], steering: _Steering) -> None:
        """A side listener at each listener's address, and the port steered
        there. Caller holds `_lock`; `_unsteer` undoes it."""
        self._steering = steering
        for sock in listeners:
            address = str(sock.getsockname()[0])
            side = _listener(sock.family, address, 0)
            self._side.append(side)
            steer_key = _SteerKey(sock.family, address, self.port)
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
        self._steering = _Steering()

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


# --- Steering: a BPF sk_lookup program over a SOCKHASH, by syscall number ---

# bpf(2) by number (Python has no wrapper); unknown machines do not steer.
_BPF_SYSCALL = {"x86_64": 321, "aarch64": 280, "riscv64": 280}.get(platform.machine())
_MAP_CREATE, _MAP_UPDATE_ELEM, _MAP_DELETE_ELEM, _PROG_LOAD, _LINK_CREATE = 0, 2, 3, 5, 28
_BPF_COMMANDS = {
    _MAP_CREATE: "BPF_MAP_CREATE",
    _MAP_UPDATE_ELEM: "BPF_MAP_UPDATE_ELEM",
    _MAP_DELETE_ELEM: "BPF_MAP_DELETE_ELEM",
    _PROG_LOAD: "BPF_PROG_LOAD",
    _LINK_CREATE: "BPF_LINK_CREATE",
}
_MAP_TYPE_SOCKHASH = 18
_PROG_TYPE_SK_LOOKUP = 30
_ATTACH_SK_LOOKUP = 36
_STEER_ENTRIES = 1024
# struct bpf_sk_lookup (uapi/linux/bpf.h): offsets of the fields read.
_CTX_FAMILY, _CTX_PROTOCOL, _CTX_LOCAL_IP4, _CTX_LOCAL_IP6, _CTX_LOCAL_PORT = 8, 12, 40, 44, 60
_HELPER_MAP_LOOKUP_ELEM, _HELPER_SK_RELEASE, _HELPER_SK_ASSIGN = 1, 86, 124
# Instruction codes: class | size/mode | op | source.
_LDX_W, _ST_W, _STX_W = 0x61, 0x62, 0x63
_MOV_K, _MOV_X, _ADD_K = 0xB7, 0xBF, 0x07
_JA, _JEQ_K, _JNE_K = 0x05, 0x15, 0x55
_CALL, _EXIT, _LD_DW = 0x85, 0x95, 0x18
_PSEUDO_MAP_FD = 1
_R0, _R1, _R2, _R3, _R6, _R7, _R10 = 0, 1, 2, 3, 6, 7, 10


@dataclass(frozen=True)
class _SteerKey:
    """What is steered: new TCP connections to `address`:`port` (a wildcard
    address: to any address of `family` at that port)."""

    family: socket.AddressFamily
    address: str
    port: int

    def packed(self) -> bytes:
        """The map key: struct { u32 family, port; u8 address[16]; }, numbers
        in host order and the address in network order, as sk_lookup has them."""
        address = socket.inet_pton(self.family, self.address)
        return struct.pack("=II16s", self.family, self.port, address)


class _Steering:
    """Kernel steering: a new TCP connection to a `_SteerKey`'s address and
    port goes to the listening socket added for it, whatever else listens
    there; an established one is left alone.

    A BPF `sk_lookup` program (Linux 5.9+, CAP_BPF and CAP_NET_ADMIN) over a
    SOCKHASH map, loaded on first use and attached to the daemon's network
    namespace only while something is steered (a namespace runs at most 64
    such programs, and each daemon on the host has its own). Its descriptors
    close with the daemon, which detaches it. Thread-safe; its syscalls are
    quick, so they run under its lock."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._map: int | None = None
        self._prog: int | None = None
        self._link: int | None = None
        self._keys: set[_SteerKey] = set()
        self._warned = False

    def add(self, key: _SteerKey, listener: socket.socket) -> None:
        """Steer `key` to `listener`. OSError if the kernel cannot."""
        with self._lock:
            if self._map is None or self._prog is None:
                self._map, self._prog = self._load()
            packed = ctypes.create_string_buffer(key.packed())
            value = ctypes.create_string_buffer(struct.pack("=Q", listener.fileno()))
            _bpf(
                _MAP_UPDATE_ELEM,
                struct.pack("=I4xQQQ", self._map, _address(packed), _address(value), 0),
            )
            self._keys.add(key)
            if self._link is None:
                try:
                    self._link = self._attach(self._prog)
                except OSError:
                    self._delete(key)
                    raise

    def remove(self, key: _SteerKey) -> None:
        """Steer `key` no more; detach the program when nothing is. Idempotent."""
        with self._lock:
            if key not in self._keys:
                return
            self._delete(key)
            if not self._keys and self._link is not None:
                os.close(self._link)
                self._link = None

    def close(self) -> None:
        """End every steering and let go of the program and map. Idempotent."""
        with self._lock:
            self._keys.clear()
            for fd in (self._link, self._prog, self._map):
                if fd is not None:
                    os.close(fd)
            self._link = self._prog = self._map = None

    def unavailable(self, exc: OSError) -> None:
        """A steering failed: the wake goes on without (logged once)."""
        with self._lock:
            warned, self._warned = self._warned, True
        (log.debug if warned else log.warning)(
            "acceptor_cannot_steer",
            error=str(exc),
            effect="connections arriving while a suspended branch's postgres starts are refused",
        )

    def _delete(self, key: _SteerKey) -> None:
        """Caller holds `_lock`."""
        self._keys.discard(key)
        assert self._map is not None
        packed = ctypes.create_string_buffer(key.packed())
        # ENOENT: its listener closed first, which took it out.
        with contextlib.suppress(FileNotFoundError):
            _bpf(_MAP_DELETE_ELEM, struct.pack("=I4xQ", self._map, _address(packed)))

    @staticmethod
    def _load() -> tuple[int, int]:
        """The map and the program (descriptors, close-on-exec)."""
        map_fd = _bpf(
            _MAP_CREATE,
            struct.pack("=IIIII", _MAP_TYPE_SOCKHASH, 24, 8, _STEER_ENTRIES, 0),
        )
        try:
            insns = ctypes.create_string_buffer(_sk_lookup_program(map_fd))
            license_ = ctypes.create_string_buffer(b"Apache-2.0")  # no GPL-only helper used
            prog_fd = _bpf(
                _PROG_LOAD,
                struct.pack(
                    "=IIQQIIQII16sII",
                    _PROG_TYPE_SK_LOOKUP,
                    (len(insns) - 1) // 8,  # create_string_buffer adds a NUL
                    _address(insns),
                    _address(license_),
                    0,  # no verifier log
                    0,
                    0,
                    0,
                    0,
                    b"cowbranchd_wake",  # 15 characters at most
                    0,
                    _ATTACH_SK_LOOKUP,
                ),
            )
        except BaseException:
            os.close(map_fd)
            raise
        return map_fd, prog_fd

    @staticmethod
    def _attach(prog_fd: int) -> int:
        """Attach the program to our network namespace; the link's descriptor."""
        netns = os.open("/proc/self/ns/net", os.O_RDONLY | os.O_CLOEXEC)
        try:
            return _bpf(_LINK_CREATE, struct.pack("=IIII", prog_fd, netns, _ATTACH_SK_LOOKUP, 0))
        finally:
            os.close(netns)


def _sk_lookup_program(map_fd: int) -> bytes:
    """The steering program, hand-assembled (the daemon ships no compiler)
    from this C:"""
    # int steer(struct bpf_sk_lookup *ctx) {
    #     struct { u32 family, port; u32 address[4]; } key = {
    #         ctx->family, ctx->local_port, <ctx->local_ip4 or ctx->local_ip6>};
    #     if (ctx->protocol != IPPROTO_TCP) return SK_PASS;
    #     struct bpf_sock *sk = bpf_map_lookup_elem(&steered, &key);
    #     if (!sk) {  // a listener on the wildcard address
    #         memset(key.address, 0, 16);
    #         sk = bpf_map_lookup_elem(&steered, &key);
    #     }
    #     if (sk) {
    #         bpf_sk_assign(ctx, sk, 0);  // fails only if another program chose
    #         bpf_sk_release(sk);
    #     }
    #     return SK_PASS;  // unsteered: the usual listener lookup
    # }
    code: list[bytes | tuple[int, int, int, str]] = []  # (op, dst, imm, label): a jump
    labels: dict[str, int] = {}

    def op(code_: int, dst: int = 0, src: int = 0, off: int = 0, imm: int = 0) -> None:
        code.append(_insn(code_, dst, src, off, imm))

    def jump(code_: int, dst: int, imm: int, label: str) -> None:
        code.append((code_, dst, imm, label))

    def lookup() -> None:  # r0 = bpf_map_lookup_elem(map, r10 - 24)
        op(_LD_DW, _R1, _PSEUDO_MAP_FD, imm=map_fd)
        op(0)  # the upper half of the 64-bit immediate
        op(_MOV_X, _R2, _R10)
        op(_ADD_K, _R2, imm=-24)
        op(_CALL, imm=_HELPER_MAP_LOOKUP_ELEM)

    op(_MOV_X, _R6, _R1)
    op(_LDX_W, _R2, _R6, _CTX_PROTOCOL)
    jump(_JNE_K, _R2, socket.IPPROTO_TCP, "pass")
    op(_LDX_W, _R2, _R6, _CTX_FAMILY)
    op(_STX_W, _R10, _R2, -24)
    op(_LDX_W, _R3, _R6, _CTX_LOCAL_PORT)
    op(_STX_W, _R10, _R3, -20)
    jump(_JEQ_K, _R2, socket.AF_INET6, "ipv6")
    op(_LDX_W, _R3, _R6, _CTX_LOCAL_IP4)
    op(_STX_W, _R10, _R3, -16)
    for offset in (-12, -8, -4):
        op(_ST_W, _R10, off=offset, imm=0)
    jump(_JA, 0, 0, "lookup")
    labels["ipv6"] = len(code)
    for word in range(4):
        op(_LDX_W, _R3, _R6, _CTX_LOCAL_IP6 + 4 * word)
        op(_STX_W, _R10, _R3, -16 + 4 * word)
    labels["lookup"] = len(code)
    lookup()
    jump(_JNE_K, _R0, 0, "found")
    for word in range(4):
        op(_ST_W, _R10, off=-16 + 4 * word, imm=0)
    lookup()
    jump(_JEQ_K, _R0, 0, "pass")
    labels["found"] = len(code)
    op(_MOV_X, _R7, _R0)
    op(_MOV_X, _R1, _R6)
    op(_MOV_X, _R2, _R7)
    op(_MOV_K, _R3, imm=0)
    op(_CALL, imm=_HELPER_SK_ASSIGN)
    op(_MOV_X, _R1, _R7)
    op(_CALL, imm=_HELPER_SK_RELEASE)
    labels["pass"] = len(code)
    op(_MOV_K, _R0, imm=1)  # SK_PASS
    op(_EXIT)
    return b"".join(
        i if isinstance(i, bytes) else _insn(i[0], i[1], 0, labels[i[3]] - n - 1, i[2])
        for n, i in enumerate(code)
    )


def _insn(code: int, dst: int, src: int, off: int, imm: int) -> bytes:
    """struct bpf_insn { u8 code; u8 dst_reg:4, src_reg:4; s16 off; s32 imm; }"""
    regs = dst | src << 4 if sys.byteorder == "little" else dst << 4 | src
    return struct.pack("=BBhi", code, regs, off, imm)


def _address(buffer: ctypes.Array[ctypes.c_char]) -> int:
    return ctypes.addressof(buffer)


def _bpf(cmd: int, attr: bytes) -> int:
    """bpf(cmd, attr): its result (a descriptor, or 0), or OSError."""
    if _BPF_SYSCALL is None:
        raise OSError(errno.ENOSYS, f"no bpf syscall number known for {platform.machine()}")
    buffer = ctypes.create_string_buffer(attr, len(attr))
    size = ctypes.c_uint(len(attr))
    result = int(libc.syscall(ctypes.c_long(_BPF_SYSCALL), ctypes.c_int(cmd), buffer, size))
    if result < 0:
        err = ctypes.get_errno()
        raise OSError(err, f"bpf({_BPF_COMMANDS[cmd]}): {os.strerror(err)}")
    return result
