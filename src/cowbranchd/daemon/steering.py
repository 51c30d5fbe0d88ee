"""Kernel steering of new TCP connections to a socket of the daemon's
choosing, for the acceptor's hand-over of a waking branch's port
(acceptor.py): a BPF `sk_lookup` program over a SOCKHASH map, loaded by
syscall number (the daemon ships no compiler or BPF library) and attached to
the daemon's network namespace only while something is steered.

It steers only the keys the acceptor adds (a branch's listen address and
port) to listeners the daemon itself opened; established connections and
every other port are left alone. Where the kernel cannot (before Linux 5.9,
no CAP_BPF / CAP_NET_ADMIN, an unknown machine), `add` raises OSError and
the caller goes on without.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import os
import platform
import socket
import struct
import sys
import threading
from dataclasses import dataclass

import structlog

from cowbranchd.storage.kernel import libc

__all__ = ["SteerKey", "Steering"]

log = structlog.get_logger("cowbranchd.acceptor")

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
class SteerKey:
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


class Steering:
    """Kernel steering: a new TCP connection to a `SteerKey`'s address and
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
        self._keys: set[SteerKey] = set()
        self._warned = False

    def add(self, key: SteerKey, listener: socket.socket) -> None:
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

    def remove(self, key: SteerKey) -> None:
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

    def _delete(self, key: SteerKey) -> None:
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
