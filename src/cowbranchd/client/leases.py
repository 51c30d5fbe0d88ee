"""The lease stream (LeaseService.Lease) as one request/answer pair at a time:
`AioLeaseStream` on an asyncio channel, `LeaseStream` on a sync one. They are
the pair `.ci/gen-sync-client` swaps (grpc's asyncio calls write and read,
its sync calls take an iterator of requests), so `AsyncLease` in aio.py is
written once for both clients.

A stream carries one exchange at a time (a lock around each), so a `Client`
shared by threads cannot mix up two answers. Dropping a stream without a
close request breaks the lease: the daemon then deletes what it holds after
its grace. Speaks gRPC only.
"""

from __future__ import annotations

import asyncio
import queue
import threading
from typing import Any

import grpc
import grpc.aio

from cowbranchd.errors import CowbranchError, Unavailable, error_for_code
from cowbranchd.v1 import leases_pb2, leases_pb2_grpc

__all__ = ["AioLeaseStream", "LeaseStream", "answer_error"]


def answer_error(response: leases_pb2.LeaseResponse) -> CowbranchError | None:
    """The error a lease answer carries, as a cowbranchd error (None when it succeeded)."""
    if not response.error_code:
        return None
    code = next(
        (c for c in grpc.StatusCode if c.value[0] == response.error_code), grpc.StatusCode.UNKNOWN
    )
    return error_for_code(code, response.error_message)


def _ended() -> Unavailable:
    return Unavailable("the daemon ended the lease stream; the lease is opened again on next use")


class AioLeaseStream:
    """One Lease stream on an asyncio channel."""

    def __init__(self, channel: grpc.aio.Channel, metadata: tuple[tuple[str, str], ...]) -> None:
        # grpc's type stubs describe the sync call only: typed here by hand.
        stub: Any = leases_pb2_grpc.LeaseServiceStub(channel)
        self._call: Any = stub.Lease(metadata=metadata)
        self._lock = asyncio.Lock()

    async def send(self, request: leases_pb2.LeaseRequest) -> leases_pb2.LeaseResponse:
        """Write `request` and read its answer; grpc.RpcError when the stream broke."""
        async with self._lock:
            await self._call.write(request)
            response = await self._call.read()
        if response is grpc.aio.EOF:  # type: ignore[attr-defined]
            raise _ended()
        assert isinstance(response, leases_pb2.LeaseResponse)
        return response

    async def close(self) -> None:
        """Drop the stream (after a close request, or to abandon it); again does nothing."""
        self._call.cancel()


class LeaseStream:
    """One Lease stream on a sync channel."""

    def __init__(self, channel: grpc.Channel, metadata: tuple[tuple[str, str], ...]) -> None:
        self._requests: queue.SimpleQueue[leases_pb2.LeaseRequest | None] = queue.SimpleQueue()
        stub: Any = leases_pb2_grpc.LeaseServiceStub(channel)
        self._responses: Any = stub.Lease(iter(self._requests.get, None), metadata=metadata)
        self._lock = threading.Lock()

    def send(self, request: leases_pb2.LeaseRequest) -> leases_pb2.LeaseResponse:
        """Write `request` and read its answer; grpc.RpcError when the stream broke."""
        with self._lock:
            self._requests.put(request)
            try:
                response = next(self._responses)
            except StopIteration:
                raise _ended() from None
        assert isinstance(response, leases_pb2.LeaseResponse)
        return response

    def close(self) -> None:
        """Drop the stream (after a close request, or to abandon it); again does nothing."""
        self._requests.put(None)
        self._responses.cancel()
