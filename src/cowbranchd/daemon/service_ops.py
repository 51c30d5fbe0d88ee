"""The operations servicer, and the proto <-> model conversions of imports
and operations that BaseServicer shares. Served through `rpc` like every
other method; the work itself lives in pipeline.py and operations.py.
"""

from __future__ import annotations

from collections.abc import Mapping
from datetime import datetime, timedelta
from typing import Any

import grpc

from cowbranchd.errors import InvalidArgument
from cowbranchd.model import parse_name
from cowbranchd.postgres.masking import SqlTransform
from cowbranchd.v1 import bases_pb2, operations_pb2, operations_pb2_grpc

from .auth import current_caller
from .metrics import Metrics
from .operations import Operation, Operations
from .pipeline import ImportSpec
from .rpc import Gate, duration, rpc, timestamp

__all__ = ["OperationServicer", "import_spec", "operation_proto", "provenance_proto"]

DEFAULT_WAIT = timedelta(seconds=60)
MAX_WAIT = timedelta(minutes=10)


def import_spec(request: bases_pb2.ImportBaseRequest) -> ImportSpec:
    which = request.WhichOneof("source")
    if which is None:
        raise InvalidArgument(
            "source", "give one of from_server, from_dump, data_directory, follow"
        )
    kind = {"from_server": "server", "from_dump": "dump"}.get(which, which)
    return ImportSpec(
        base_id=request.base_id,
        kind=kind,
        source=getattr(request, which),
        transforms=tuple(SqlTransform(t.name, t.sql.encode()) for t in request.transforms),
        command=tuple(request.transform_command),
        jobs=request.jobs,
        keep_raw=request.keep_raw,
        database=request.database,
        labels=dict(request.labels),
        branch_role=request.branch_role,
        roles=tuple(request.roles),
    )


def operation_proto(op: Operation) -> operations_pb2.Operation:
    message = operations_pb2.Operation(
        name=f"operations/{op.op_id}",
        target=op.target,
        done=op.done,
        phase=op.phase,
        bytes_done=op.bytes_done,
        bytes_total=op.bytes_total,
        start_time=timestamp(op.start_time),
        end_time=timestamp(op.end_time),
        result=op.result,
        owner=op.owner,
    )
    if op.error is not None:
        message.error_code = op.error.code.value[0]
        message.error_message = op.error.message
    return message


def provenance_proto(facts: Mapping[str, Any]) -> bases_pb2.Provenance:
    """A version's provenance as recorded by pipeline.py (empty: not imported)."""
    message = bases_pb2.Provenance(
        source_kind=str(facts.get("source_kind", "")),
        source=str(facts.get("source", "")),
        transforms=[str(t) for t in facts.get("transforms") or ()],
        transform_command=str(facts.get("transform_command", "")),
        bytes=int(facts.get("bytes") or 0),
        pg_version=int(facts.get("pg_version") or 0),
    )
    for key in ("start_time", "end_time"):
        value = facts.get(key)
        when = timestamp(datetime.fromisoformat(value)) if isinstance(value, str) else None
        if when is not None:
            getattr(message, key).CopyFrom(when)
    return message


class OperationServicer(operations_pb2_grpc.OperationServiceServicer):
    def __init__(self, operations: Operations, gate: Gate, metrics: Metrics) -> None:
        self.operations = operations
        self.gate = gate
        self.metrics = metrics
        self.admission: dict[str, object] = {}

    @rpc
    def GetOperation(
        self, request: operations_pb2.GetOperationRequest, context: grpc.ServicerContext
    ) -> operations_pb2.Operation:
        op_id = parse_name("name", request.name, "operations")
        return operation_proto(self.operations.get(op_id, current_caller()))

    @rpc
    def ListOperations(
        self, request: operations_pb2.ListOperationsRequest, context: grpc.ServicerContext
    ) -> operations_pb2.ListOperationsResponse:
        return operations_pb2.ListOperationsResponse(
            operations=[operation_proto(op) for op in self.operations.visible(current_caller())]
        )

    @rpc
    def WaitOperation(
        self, request: operations_pb2.WaitOperationRequest, context: grpc.ServicerContext
    ) -> operations_pb2.Operation:
        op = self.operations.get(parse_name("name", request.name, "operations"), current_caller())
        wait = duration("timeout", request.timeout) if request.HasField("timeout") else None
        wait = min(wait or DEFAULT_WAIT, MAX_WAIT)
        remaining = context.time_remaining()
        seconds = wait.total_seconds()
        if remaining is not None:
            seconds = min(seconds, max(0.0, remaining - 0.5))
        op.finished.wait(seconds)
        return operation_proto(op)

    @rpc
    def CancelOperation(
        self, request: operations_pb2.CancelOperationRequest, context: grpc.ServicerContext
    ) -> operations_pb2.Operation:
        op_id = parse_name("name", request.name, "operations")
        return operation_proto(self.operations.cancel(op_id, current_caller()))
