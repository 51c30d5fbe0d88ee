"""The LogService servicer: a branch's postgres log streamed to its owner or
an admin (branch_logs.py reads it). Proto <-> model only; nothing decided here
but who may read, which is `Branches.get`'s owner check.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator

import grpc

from cowbranchd.errors import InvalidArgument, ResourceExhausted
from cowbranchd.model import parse_name
from cowbranchd.v1 import logs_pb2, logs_pb2_grpc

from .auth import current_caller
from .branch_logs import read_log
from .branches import Branches
from .rpc import Gate, rpc_stream

__all__ = ["MAX_LOG_STREAMS", "LogServicer"]

# Each open stream holds one of the gRPC worker threads for as long as it is
# followed, so at most this many at once: the rest of the reads keep theirs.
MAX_LOG_STREAMS = 8


class LogServicer(logs_pb2_grpc.LogServiceServicer):
    """One instance serves every listener, so the stream bound is daemon-wide."""

    def __init__(self, branches: Branches, gate: Gate) -> None:
        self.branches = branches
        self.gate = gate
        self.metrics = branches.ctx.metrics
        self._streams = threading.BoundedSemaphore(MAX_LOG_STREAMS)

    @rpc_stream
    def StreamBranchLog(
        self, request: logs_pb2.StreamBranchLogRequest, context: grpc.ServicerContext
    ) -> Iterator[logs_pb2.LogChunk]:
        caller = current_caller()
        branch_id = parse_name("name", request.name, "branches")
        tail_lines = request.tail_lines if request.HasField("tail_lines") else None
        if tail_lines is not None and tail_lines < 0:
            raise InvalidArgument("tail_lines", "must not be negative")
        entry = self.branches.get(branch_id, caller)  # its owner or an admin, else denied
        if not self._streams.acquire(blocking=False):
            raise ResourceExhausted(
                f"{MAX_LOG_STREAMS} log streams are open already; retry when one has ended"
            )
        try:
            stopped = threading.Event()
            context.add_callback(stopped.set)  # the caller cancelled or went away
            inventory = self.branches.ctx.inventory

            def still_there() -> bool:
                # Draining ends the stream (UNAVAILABLE) instead of holding shutdown up;
                # a branch deleted, or deleted and made again under its id, ends it too.
                self.gate.check()
                with inventory.lock:
                    same = inventory.branches.get(branch_id) is entry
                return same and not entry.deleting and context.is_active()

            chunks = read_log(
                self.branches.ctx,
                entry,
                tail_lines=tail_lines,
                follow=request.follow,
                stopped=stopped,
                still_there=still_there,
            )
            for data in chunks:
                yield logs_pb2.LogChunk(data=data)
        finally:
            self._streams.release()
