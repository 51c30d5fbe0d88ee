"""Every client operation described once, as data: which RPC, which request,
how the answer becomes a value, whether a retry is safe.

The sync `Client` and the `AsyncClient` only differ in how they send an `Op`,
so request building (request ids, update masks, durations, names) is written
once, here, and cannot drift between them.
"""

from __future__ import annotations

import uuid
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any, Generic, Literal, TypeVar

from google.protobuf import duration_pb2, field_mask_pb2
from grpc_health.v1 import health_pb2, health_pb2_grpc

from cowbranchd.errors import InvalidArgument
from cowbranchd.v1 import (
    bases_pb2,
    bases_pb2_grpc,
    branches_pb2,
    branches_pb2_grpc,
    daemon_pb2,
    daemon_pb2_grpc,
    logs_pb2,
    logs_pb2_grpc,
    operations_pb2,
    operations_pb2_grpc,
)

from .types import (
    Base,
    BaseVersion,
    Branch,
    BranchDiff,
    DurationLike,
    Operation,
    SelectorLike,
    base_name,
    branch_name,
    format_selector,
    parse_duration,
)

__all__ = [
    "HEALTH_SERVICE",
    "STUBS",
    "Op",
    "cancel_operation",
    "create_base",
    "create_base_version",
    "create_branch",
    "delete_base",
    "delete_branch",
    "diff_branch",
    "get_base",
    "get_branch",
    "get_operation",
    "health",
    "import_base",
    "list_bases",
    "list_branches_page",
    "list_operations",
    "refresh_base",
    "reset_branch",
    "status",
    "stream_branch_log",
    "update_branch",
    "wait_operation",
]

T = TypeVar("T")
Service = Literal["branches", "bases", "daemon", "health", "logs", "operations"]
HEALTH_SERVICE = "cowbranchd.v1.BranchService"
# The stub class of each service; it takes a sync or an asyncio channel alike.
STUBS: dict[Service, Callable[[Any], Any]] = {
    "branches": branches_pb2_grpc.BranchServiceStub,
    "bases": bases_pb2_grpc.BaseServiceStub,
    "daemon": daemon_pb2_grpc.DaemonServiceStub,
    "health": health_pb2_grpc.HealthStub,
    "operations": operations_pb2_grpc.OperationServiceStub,
    "logs": logs_pb2_grpc.LogServiceStub,
}


@dataclass(frozen=True)
class Op(Generic[T]):
    """One RPC to make: `service`.`method`(`request`), answer mapped by `convert`.

    `retry` is False for calls that are not safe to repeat. With
    `missing_ok_after_retry`, NOT_FOUND on a retried attempt means an earlier
    attempt already did the work (a delete whose answer was lost).
    """

    service: Service
    method: str
    request: Any
    convert: Callable[[Any], T]
    retry: bool = True
    missing_ok_after_retry: bool = False


def _none(_: object) -> None:
    return None


def _duration(value: DurationLike) -> duration_pb2.Duration:
    message = duration_pb2.Duration()
    message.FromTimedelta(parse_duration(value))
    return message


def create_branch(
    parent: str,
    *,
    branch_id: str = "",
    labels: Mapping[str, str] | None = None,
    ttl: DurationLike | None = None,
    postgres_settings: Mapping[str, str] | None = None,
    protected: bool = False,
    request_id: str | None = None,
    max_bytes: int = 0,
    role: str = "",
    idle_suspend: DurationLike | None = None,
    at: datetime | None = None,
    lease: str = "",
) -> Op[Branch]:
    """CreateBranch, always with a request id so a retry can never make two
    branches; with `lease` (`leases/{id}`), held in it from the moment it exists."""
    if not parent:
        raise InvalidArgument(
            "parent", "required: bases/{base}, bases/{base}/versions/{n} or branches/{id}"
        )
    request = branches_pb2.CreateBranchRequest(
        branch_id=branch_id,
        parent=parent,
        request_id=request_id or str(uuid.uuid4()),
        labels=dict(labels or {}),
        postgres_settings=dict(postgres_settings or {}),
        protected=protected,
        max_bytes=max_bytes,
        role=role,
        lease=lease,
    )
    if ttl is not None:
        request.ttl.CopyFrom(_duration(ttl))
    if idle_suspend is not None:
        request.idle_suspend.CopyFrom(_duration(idle_suspend))
    if at is not None:  # a followed base as it was then (aware, or UTC)
        request.at.FromDatetime(at if at.tzinfo is None else at.astimezone(UTC))
    return Op("branches", "CreateBranch", request, Branch.from_proto)


def get_branch(name: str) -> Op[Branch]:
    """GetBranch by id or `branches/{id}`."""
    request = branches_pb2.GetBranchRequest(name=branch_name(name))
    return Op("branches", "GetBranch", request, Branch.from_proto)


def list_branches_page(
    selector: SelectorLike, page_size: int, page_token: str
) -> Op[tuple[list[Branch], str]]:
    """One ListBranches page: its branches and the next page token ("" after the last)."""
    request = branches_pb2.ListBranchesRequest(
        label_selector=format_selector(selector), page_size=page_size, page_token=page_token
    )

    def convert(response: branches_pb2.ListBranchesResponse) -> tuple[list[Branch], str]:
        return [Branch.from_proto(b) for b in response.branches], response.next_page_token

    return Op("branches", "ListBranches", request, convert)


def delete_branch(name: str, *, allow_missing: bool = False, force: bool = False) -> Op[None]:
    """DeleteBranch; NOT_FOUND after a retry counts as done."""
    request = branches_pb2.DeleteBranchRequest(
        name=branch_name(name), allow_missing=allow_missing, force=force
    )
    return Op("branches", "DeleteBranch", request, _none, missing_ok_after_retry=True)


def reset_branch(name: str, version: int = 0) -> Op[Branch]:
    """ResetBranch: throw away the branch's writes (with `version`: move it
    to that version of its base)."""
    if version < 0:
        raise InvalidArgument("version", "must be a positive version number (or 0)")
    request = branches_pb2.ResetBranchRequest(name=branch_name(name), version=version)
    return Op("branches", "ResetBranch", request, Branch.from_proto)


def _chunk_data(chunk: logs_pb2.LogChunk) -> bytes:
    return chunk.data


def stream_branch_log(name: str, *, tail_lines: int | None, follow: bool) -> Op[bytes]:
    """StreamBranchLog (server streaming: `convert` maps each chunk). Not
    retried: a stream that breaks midway is the caller's to restart."""
    if tail_lines is not None and tail_lines < 0:
        raise InvalidArgument("tail_lines", "must not be negative")
    request = logs_pb2.StreamBranchLogRequest(name=branch_name(name), follow=follow)
    if tail_lines is not None:
        request.tail_lines = tail_lines
    return Op("logs", "StreamBranchLog", request, _chunk_data, retry=False)


def update_branch(
    name: str,
    *,
    labels: Mapping[str, str] | None = None,
    ttl: DurationLike | None = None,
    protected: bool | None = None,
    idle_suspend: DurationLike | None = None,
) -> Op[Branch]:
    """UpdateBranch of the fields given.

    `labels` replaces all labels; a zero `ttl` means never expire, a zero
    `idle_suspend` never suspend.
    """
    request = branches_pb2.UpdateBranchRequest(branch=branches_pb2.Branch(name=branch_name(name)))
    paths = []
    if labels is not None:
        request.branch.labels.update(labels)
        paths.append("labels")
    if protected is not None:
        request.branch.protected = protected
        paths.append("protected")
    if ttl is not None:
        request.ttl.CopyFrom(_duration(ttl))
        paths.append("ttl")
    if idle_suspend is not None:
        request.branch.idle_suspend.CopyFrom(_duration(idle_suspend))
        paths.append("idle_suspend")
    if not paths:
        raise InvalidArgument(
            "update_mask", "nothing to update: give labels, ttl, protected or idle_suspend"
        )
    request.update_mask.CopyFrom(field_mask_pb2.FieldMask(paths=paths))
    return Op("branches", "UpdateBranch", request, Branch.from_proto)


def create_base(
    base_id: str,
    *,
    data_directory: str | None = None,
    database: str = "",
    pg_version: int = 0,
    init_sql: str = "",
    labels: Mapping[str, str] | None = None,
    branch_role: str = "",
    roles: Sequence[str] = (),
) -> Op[Base]:
    """CreateBase from `data_directory`, or from a fresh initdb when it is None.

    Not retried: the proto has no request id, so a repeat could not tell a lost
    answer from a duplicate (the daemon would answer ALREADY_EXISTS).
    """
    request = bases_pb2.CreateBaseRequest(
        base_id=base_id, labels=dict(labels or {}), branch_role=branch_role, roles=list(roles)
    )
    if data_directory is not None:
        if database or pg_version or init_sql:
            raise InvalidArgument(
                "source", "database, pg_version and init_sql are for initdb, not data_directory"
            )
        request.data_directory = data_directory
    else:
        request.initdb.CopyFrom(
            bases_pb2.InitdbSource(database=database, pg_version=pg_version, init_sql=init_sql)
        )
    return Op("bases", "CreateBase", request, Base.from_proto, retry=False)


def get_base(name: str) -> Op[Base]:
    """GetBase by id or `bases/{id}`."""
    return Op("bases", "GetBase", bases_pb2.GetBaseRequest(name=base_name(name)), Base.from_proto)


def list_bases() -> Op[list[Base]]:
    """ListBases (not paged)."""

    def convert(response: bases_pb2.ListBasesResponse) -> list[Base]:
        return [Base.from_proto(b) for b in response.bases]

    return Op("bases", "ListBases", bases_pb2.ListBasesRequest(), convert)


def delete_base(name: str, *, force: bool = False, allow_missing: bool = False) -> Op[None]:
    """DeleteBase; `force` also deletes the branches that depend on it."""
    request = bases_pb2.DeleteBaseRequest(
        name=base_name(name), force=force, allow_missing=allow_missing
    )
    return Op("bases", "DeleteBase", request, _none, missing_ok_after_retry=True)


def create_base_version(name: str, data_directory: str = "") -> Op[BaseVersion]:
    """CreateBaseVersion: snapshot the base (first refreshed from
    `data_directory`, if given) as its next version.

    Not retried: a repeat after a lost answer would make a second version.
    """
    request = bases_pb2.CreateBaseVersionRequest(
        parent=base_name(name), data_directory=data_directory
    )
    return Op("bases", "CreateBaseVersion", request, BaseVersion.from_proto, retry=False)


def health(service: str = HEALTH_SERVICE) -> Op[str]:
    """grpc.health.v1 Check: `SERVING`, `NOT_SERVING` or `SERVICE_UNKNOWN`."""

    def convert(response: health_pb2.HealthCheckResponse) -> str:
        return str(health_pb2.HealthCheckResponse.ServingStatus.Name(response.status))

    return Op("health", "Check", health_pb2.HealthCheckRequest(service=service), convert)


def status() -> Op[dict[str, Any]]:
    """DaemonService.GetStatus as a JSON-ready dict (version, driver, pool, capacity)."""

    def convert(response: daemon_pb2.DaemonStatus) -> dict[str, Any]:
        return {
            "version": response.version,
            "driver": response.driver,
            "pool": response.pool,
            "pool_used_bytes": response.pool_used_bytes,
            "pool_total_bytes": response.pool_total_bytes,
            "base_count": response.base_count,
            "branch_count": response.branch_count,
            "max_branches": response.max_branches,
            "port_range": [response.port_range_first, response.port_range_last],
            "start_time": response.start_time.ToDatetime(UTC).isoformat(),
            "warnings": list(response.warnings),
            "isolation": response.isolation,
            "caller": response.caller,
        }

    return Op("daemon", "GetStatus", daemon_pb2.GetStatusRequest(), convert)


def import_base(
    base_id: str,
    *,
    from_server: str = "",
    from_dump: str = "",
    data_directory: str = "",
    transforms: Sequence[tuple[str, str]] = (),
    transform_command: Sequence[str] = (),
    jobs: int = 0,
    keep_raw: bool = False,
    database: str = "",
    labels: Mapping[str, str] | None = None,
    branch_role: str = "",
    roles: Sequence[str] = (),
    follow: str = "",
) -> Op[Operation]:
    """ImportBase: exactly one source; `transforms` are (name, sql) pairs.
    Not retried: a repeat would start a second import."""
    sources = {
        "from_server": from_server,
        "from_dump": from_dump,
        "data_directory": data_directory,
        "follow": follow,
    }
    given = [k for k, v in sources.items() if v]
    if len(given) != 1:
        raise InvalidArgument(
            "source", "give exactly one of from_server, from_dump, data_directory, follow"
        )
    request = bases_pb2.ImportBaseRequest(
        base_id=base_id,
        transforms=[bases_pb2.Transform(name=n, sql=q) for n, q in transforms],
        transform_command=list(transform_command),
        jobs=jobs,
        keep_raw=keep_raw,
        database=database,
        labels=dict(labels or {}),
        branch_role=branch_role,
        roles=list(roles),
        **{given[0]: sources[given[0]]},
    )
    return Op("bases", "ImportBase", request, Operation.from_proto, retry=False)


def refresh_base(name: str) -> Op[Operation]:
    """RefreshBase: replay the recipe of the base's newest import."""
    request = bases_pb2.RefreshBaseRequest(name=base_name(name))
    return Op("bases", "RefreshBase", request, Operation.from_proto, retry=False)


def _operation_name(name: str) -> str:
    return name if name.startswith("operations/") else f"operations/{name}"


def get_operation(name: str) -> Op[Operation]:
    request = operations_pb2.GetOperationRequest(name=_operation_name(name))
    return Op("operations", "GetOperation", request, Operation.from_proto)


def wait_operation(name: str, timeout_s: float = 60.0) -> Op[Operation]:
    """WaitOperation: returns when done or after `timeout_s` (at most 600)."""
    request = operations_pb2.WaitOperationRequest(name=_operation_name(name))
    request.timeout.FromTimedelta(timedelta(seconds=timeout_s))
    return Op("operations", "WaitOperation", request, Operation.from_proto)


def cancel_operation(name: str) -> Op[Operation]:
    request = operations_pb2.CancelOperationRequest(name=_operation_name(name))
    return Op("operations", "CancelOperation", request, Operation.from_proto)


def list_operations() -> Op[list[Operation]]:
    """The caller's operations, newest first."""

    def convert(response: operations_pb2.ListOperationsResponse) -> list[Operation]:
        return [Operation.from_proto(o) for o in response.operations]

    request = operations_pb2.ListOperationsRequest()
    return Op("operations", "ListOperations", request, convert)


def freeze_branch(name: str) -> Op[Branch]:
    """FreezeBranch: make the branch a template its children clone."""
    request = branches_pb2.FreezeBranchRequest(name=branch_name(name))
    return Op("branches", "FreezeBranch", request, Branch.from_proto)


def diff_branch(name: str) -> Op[BranchDiff]:
    """DiffBranch: the branch's schema and row changes since it was made."""
    request = branches_pb2.DiffBranchRequest(name=branch_name(name))
    return Op("branches", "DiffBranch", request, BranchDiff.from_proto)
