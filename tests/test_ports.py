"""cowbranchd.ports: the port allocator, against real sockets."""

from __future__ import annotations

import contextlib
import socket
import threading
from collections.abc import Iterator

import pytest

from cowbranchd.errors import ResourceExhausted
from cowbranchd.ports import PortAllocator


def _free_run(n: int) -> int:
    """The first of `n` consecutive ports that bind on 127.0.0.1 now (below the ephemeral range)."""
    for first in range(21000, 32000, n):
        with contextlib.ExitStack() as stack:
            try:
                for port in range(first, first + n):
                    s = stack.enter_context(socket.socket())
                    s.bind(("127.0.0.1", port))
            except OSError:
                continue
            return first
    raise AssertionError("no run of free ports")


@pytest.fixture
def squat() -> Iterator[list[socket.socket]]:
    """Sockets a test binds to squat ports; closed afterwards."""
    sockets: list[socket.socket] = []
    yield sockets
    for s in sockets:
        s.close()


def _bind(squat: list[socket.socket], port: int, *, listen: bool = False) -> None:
    s = socket.socket()
    squat.append(s)
    s.bind(("127.0.0.1", port))
    if listen:
        s.listen()


def test_allocate_hands_out_ports_of_the_range_once() -> None:
    """Each allocation is a different port from the range, recorded as in use."""
    first = _free_run(3)
    ports = PortAllocator(first, first + 2, "127.0.0.1")
    got = {ports.allocate() for _ in range(3)}
    assert got == {first, first + 1, first + 2}
    assert ports.in_use() == got


def test_exhausted_range_is_resource_exhausted() -> None:
    """With every port handed out, allocate raises ResourceExhausted naming the range."""
    first = _free_run(2)
    ports = PortAllocator(first, first + 1, "127.0.0.1")
    ports.allocate()
    ports.allocate()
    with pytest.raises(ResourceExhausted, match=f"^no free port in {first}-{first + 1}$"):
        ports.allocate()


def test_squatted_ports_are_skipped(squat: list[socket.socket]) -> None:
    """Ports something else has bound or listens on are never handed out."""
    first = _free_run(4)
    _bind(squat, first)
    _bind(squat, first + 2, listen=True)
    ports = PortAllocator(first, first + 3, "127.0.0.1")
    assert [ports.allocate(), ports.allocate()] == [first + 1, first + 3]
    with pytest.raises(ResourceExhausted):
        ports.allocate()
    assert ports.in_use() == {first + 1, first + 3}


def test_wildcard_host_checks_the_wildcard_bind(squat: list[socket.socket]) -> None:
    """For listen_addresses '*', a port bound on 0.0.0.0 by someone else is skipped."""
    first = _free_run(2)
    s = socket.socket()
    squat.append(s)
    s.bind(("0.0.0.0", first))
    ports = PortAllocator(first, first + 1, "*")
    assert ports.allocate() == first + 1


def test_released_port_is_not_reused_at_once() -> None:
    """A released port goes to the back of the queue (its connections may be in TIME_WAIT)."""
    first = _free_run(3)
    ports = PortAllocator(first, first + 2, "127.0.0.1")
    a = ports.allocate()
    ports.release(a)
    assert [ports.allocate(), ports.allocate(), ports.allocate()] == [first + 1, first + 2, a]


def test_release_is_idempotent() -> None:
    """Releasing a port twice, or one never handed out, is harmless."""
    first = _free_run(1)
    ports = PortAllocator(first, first, "127.0.0.1")
    port = ports.allocate()
    ports.release(port)
    ports.release(port)
    ports.release(1)
    assert ports.in_use() == set()


def test_reserve_marks_an_adopted_port() -> None:
    """reserve() keeps an adopted branch's port from being handed out, once."""
    first = _free_run(2)
    ports = PortAllocator(first, first + 1, "127.0.0.1")
    assert ports.reserve(first) is True
    assert ports.reserve(first) is False
    assert ports.allocate() == first + 1
    assert ports.in_use() == {first, first + 1}


def test_exclude_skips_the_given_ports() -> None:
    """allocate(exclude=...) never returns an excluded port (e.g. the one that just failed)."""
    first = _free_run(2)
    ports = PortAllocator(first, first + 1, "127.0.0.1")
    assert ports.allocate(exclude=(first,)) == first + 1
    with pytest.raises(ResourceExhausted):
        ports.allocate(exclude=(first,))


def test_concurrent_allocations_are_distinct() -> None:
    """Threads allocating at once never get the same port."""
    first = _free_run(40)
    ports = PortAllocator(first, first + 39, "127.0.0.1")
    got: list[int] = []
    lock = threading.Lock()

    def grab() -> None:
        for _ in range(5):
            port = ports.allocate()
            with lock:
                got.append(port)

    threads = [threading.Thread(target=grab) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(got) == list(range(first, first + 40))


@pytest.mark.parametrize(("first", "last"), [(0, 10), (10, 5), (65535, 65536)])
def test_bad_range_is_a_programming_error(first: int, last: int) -> None:
    """An empty or out-of-bounds range is rejected at construction (config validates it)."""
    with pytest.raises(ValueError, match="bad port range"):
        PortAllocator(first, last, "127.0.0.1")
