"""The LeaseService servicer: one bidirectional stream per lease, proto <->
`Leases` (leases.py decides everything). Not served through `rpc`, which is
for calls with one request: the gate is checked when the stream opens, each
request's error is answered in its response (a bad name must not break the
lease, which would delete what it holds), and one log line is written when
the stream ends.
"""

from __future__ import annotations

import time
from collections.abc import Iterator

import grpc
import structlog

from cowbranchd.errors import CowbranchError
from cowbranchd.v1 import leases_pb2, leases_pb2_grpc

from .auth import current_caller
from .leases import Lease as HeldLease
from .leases import Leases
from .metrics import Metrics
from .rpc import Gate

__all__ = ["LeaseServicer"]

log = structlog.get_logger("cowbranchd.rpc")


class LeaseServicer(leases_pb2_grpc.LeaseServiceServicer):
    def __init__(self, leases: Leases, gate: Gate, metrics: Metrics) -> None:
        self.leases = leases
        self.gate = gate
        self.metrics = metrics

    def Lease(
        self, request_iterator: Iterator[leases_pb2.LeaseRequest], context: grpc.ServicerContext
    ) -> Iterator[leases_pb2.LeaseResponse]:
        started = time.perf_counter()
        lease: HeldLease | None = None
        clean = False
        code = "OK"
        try:
            self.gate.check()
            caller = current_caller()
            for request in request_iterator:
                if lease is None:
                    lease = self.leases.open(caller, request.holder, context.cancel)
                response = self._answer(lease, request)
                if request.close:
                    clean = True
                yield response
                if clean:
                    return
            code = "CANCELLED"  # the client stopped writing without a close
        except CowbranchError as exc:  # opening it failed: the stream's status
            code = exc.code.name
            context.abort(exc.code, exc.message)
        except grpc.RpcError:  # the client went away
            code = "CANCELLED"
        finally:
            if lease is not None and not clean:
                self.leases.broke(lease)
            seconds = time.perf_counter() - started
            self.metrics.rpc_done("Lease", code, seconds)
            log.info(
                "rpc",
                method="Lease",
                code=code,
                lease=lease.lease_id if lease else None,
                clean=clean,
                s=round(seconds, 3),
            )

    def _answer(
        self, lease: HeldLease, request: leases_pb2.LeaseRequest
    ) -> leases_pb2.LeaseResponse:
        response = leases_pb2.LeaseResponse(name=lease.name)
        try:
            if request.hold:
                self.leases.hold(lease, request.hold)
            if request.keep:
                self.leases.keep(lease, request.keep)
            if request.close:
                response.deleted.extend(self.leases.close(lease))
        except CowbranchError as exc:
            response.error_code = exc.code.value[0]
            response.error_message = exc.message
        response.held_count = self.leases.held_count(lease)
        return response
