"""The gRPC servicers: proto <-> model for each method, served through
`rpc` (gate, admission, deadline, log line, status codes). Nothing else:
every decision lives in bases.py and branches.py.
"""

from __future__ import annotations

import base64
import dataclasses
from datetime import UTC, datetime, timedelta

import grpc
from google.protobuf import duration_pb2

from cowbranchd import __version__, postgres
from cowbranchd.errors import CowbranchError, InvalidArgument, PermissionDenied
from cowbranchd.model import Selector, parse_name
from cowbranchd.v1 import (
    bases_pb2,
    bases_pb2_grpc,
    branches_pb2,
    branches_pb2_grpc,
    daemon_pb2,
    daemon_pb2_grpc,
    operations_pb2,
)

from .auth import ADMIN, Caller, current_caller
from .bases import Bases, InitdbSpec
from .branches import Branches, CreateSpec
from .diff import Differ
from .inventory import BaseEntry, BranchEntry
from .isolation import SHARED_UID_WARNING
from .leases import Leases
from .pipeline import Pipeline
from .rpc import Admission, Gate, duration, rpc, timestamp
from .service_ops import import_spec, operation_proto, provenance_proto

__all__ = ["BaseServicer", "BranchServicer", "DaemonServicer"]
MAX_PAGE_SIZE = 1000
DEFAULT_PAGE_SIZE = 100


class BranchServicer(branches_pb2_grpc.BranchServiceServicer):
    def __init__(
        self,
        branches: Branches,
        gate: Gate,
        admission: dict[str, Admission],
        differ: Differ,
        leases: Leases,
    ) -> None:
        self.branches = branches
        self.differ = differ
        self.leases = leases
        self.gate = gate
        self.admission = admission
        self.metrics = branches.ctx.metrics

    def to_proto(
        self, entry: BranchEntry, caller: Caller, *, with_usage: bool = True
    ) -> branches_pb2.Branch:
        record = entry.record
        conn = self.branches.connection(entry)
        if not caller.owns(record.owner):  # listed to another owner: no secrets
            conn = dataclasses.replace(
                conn,
                password="",
                dsn=postgres.dsn(conn.host, conn.port, conn.user, "", conn.database),
            )
        state = self.branches.state(entry)
        return branches_pb2.Branch(
            name=f"branches/{record.branch_id}",
            parent=record.parent,
            state=branches_pb2.Branch.State.Value(state.name),
            connection=branches_pb2.Connection(**dataclasses.asdict(conn)),
            labels=record.labels,
            create_time=timestamp(record.create_time),
            expire_time=timestamp(record.expire_time),
            protected=record.protected,
            written_bytes=self.branches.written_bytes(entry) if with_usage else 0,
            request_id=record.request_id,
            failure=record.failure,
            owner=record.owner or ADMIN.name,
            idle_suspend=_duration_proto(record.idle_suspend),
            frozen=bool(record.frozen),
        )

    @rpc
    def CreateBranch(
        self, request: branches_pb2.CreateBranchRequest, context: grpc.ServicerContext
    ) -> branches_pb2.Branch:
        if not request.parent:
            raise InvalidArgument("parent", "is required (bases/{base}, ... or branches/{branch})")
        spec = CreateSpec(
            parent=request.parent,
            branch_id=request.branch_id,
            request_id=request.request_id,
            labels=dict(request.labels),
            ttl=duration("ttl", request.ttl) if request.HasField("ttl") else None,
            postgres_settings=dict(request.postgres_settings),
            protected=request.protected,
            max_bytes=request.max_bytes,
            owner=current_caller(),
            role=request.role,
            idle_suspend=duration("idle_suspend", request.idle_suspend)
            if request.HasField("idle_suspend")
            else None,
            at=request.at.ToDatetime(tzinfo=UTC) if request.HasField("at") else None,
        )
        # Checked before anything is made; held before the answer, so no
        # moment exists where the branch is made but in no lease.
        lease = self.leases.find(request.lease, spec.owner) if request.lease else None
        entry = self.branches.create(spec)
        if lease is not None:
            try:
                self.leases.hold_entries(lease, [entry])
            except CowbranchError:
                # Held by no lease (that lease is full): not handed out either.
                self.branches.delete_entry(entry)
                raise
        if not context.is_active():  # cancelled, timed out or gone while we built it
            self.branches.mark_unclaimed(entry)
        return self.to_proto(entry, spec.owner, with_usage=False)

    @rpc
    def GetBranch(
        self, request: branches_pb2.GetBranchRequest, context: grpc.ServicerContext
    ) -> branches_pb2.Branch:
        caller = current_caller()
        name = parse_name("name", request.name, "branches")
        return self.to_proto(self.branches.get(name, caller), caller)

    @rpc
    def ListBranches(
        self, request: branches_pb2.ListBranchesRequest, context: grpc.ServicerContext
    ) -> branches_pb2.ListBranchesResponse:
        if not 0 <= request.page_size <= MAX_PAGE_SIZE:
            raise InvalidArgument("page_size", f"must be between 0 and {MAX_PAGE_SIZE}")
        size = request.page_size or DEFAULT_PAGE_SIZE
        after = _decode_token(request.page_token)
        selector = Selector.parse(request.label_selector)
        caller = current_caller()
        hide_others = self.branches.ctx.config.tenants.others == "hidden"
        entries = [
            e
            for e in self.branches.matching(selector)
            if e.branch_id > after and not (hide_others and not caller.owns(e.record.owner))
        ]
        page = entries[:size]
        token = _encode_token(page[-1].branch_id) if len(entries) > size else ""
        return branches_pb2.ListBranchesResponse(
            branches=[self.to_proto(e, caller) for e in page], next_page_token=token
        )

    @rpc
    def DeleteBranch(
        self, request: branches_pb2.DeleteBranchRequest, context: grpc.ServicerContext
    ) -> branches_pb2.DeleteBranchResponse:
        self.branches.delete(
            parse_name("name", request.name, "branches"),
            allow_missing=request.allow_missing,
            force=request.force,
            caller=current_caller(),
        )
        return branches_pb2.DeleteBranchResponse()

    @rpc
    def ResetBranch(
        self, request: branches_pb2.ResetBranchRequest, context: grpc.ServicerContext
    ) -> branches_pb2.Branch:
        caller = current_caller()
        if request.version < 0:
            raise InvalidArgument("version", "must be a positive version number (or 0)")
        entry = self.branches.reset(
            parse_name("name", request.name, "branches"), caller, version=request.version
        )
        return self.to_proto(entry, caller, with_usage=False)

    @rpc
    def UpdateBranch(
        self, request: branches_pb2.UpdateBranchRequest, context: grpc.ServicerContext
    ) -> branches_pb2.Branch:
        caller = current_caller()
        branch = request.branch
        paths = set(request.update_mask.paths)
        known = {"labels", "protected", "ttl", "expire_time", "idle_suspend"}
        if unknown := paths - known:
            raise InvalidArgument(
                "update_mask", f"unknown path(s) {sorted(unknown)}; known: {sorted(known)}"
            )
        if not paths:
            paths = {"labels", "protected"} | ({"ttl"} if request.HasField("ttl") else set())
            paths |= {"idle_suspend"} if branch.HasField("idle_suspend") else set()
        ttl: timedelta | None = None
        if "ttl" in paths:
            ttl = duration("ttl", request.ttl)
        elif "expire_time" in paths and branch.HasField("expire_time"):
            ttl = branch.expire_time.ToDatetime(UTC) - datetime.now(UTC)
            if ttl <= timedelta(0):
                raise InvalidArgument("branch.expire_time", "is in the past")
        entry = self.branches.update(
            parse_name("branch.name", branch.name, "branches"),
            labels=dict(branch.labels) if "labels" in paths else None,
            ttl=ttl,
            set_ttl=bool({"ttl", "expire_time"} & paths),
            protected=branch.protected if "protected" in paths else None,
            idle_suspend=duration("branch.idle_suspend", branch.idle_suspend)
            if "idle_suspend" in paths
            else None,
            set_idle_suspend="idle_suspend" in paths,
            caller=caller,
        )
        return self.to_proto(entry, caller)

    @rpc
    def FreezeBranch(
        self, request: branches_pb2.FreezeBranchRequest, context: grpc.ServicerContext
    ) -> branches_pb2.Branch:
        caller = current_caller()
        entry = self.branches.get(parse_name("name", request.name, "branches"), caller)
        return self.to_proto(self.branches.freeze(entry), caller, with_usage=False)

    @rpc
    def DiffBranch(
        self, request: branches_pb2.DiffBranchRequest, context: grpc.ServicerContext
    ) -> branches_pb2.BranchDiff:
        branch_id = parse_name("name", request.name, "branches")
        parent, schema_diff, tables = self.differ.diff(branch_id, current_caller())
        return branches_pb2.BranchDiff(
            name=f"branches/{branch_id}",
            parent=parent,
            schema_diff=schema_diff,
            tables=[branches_pb2.TableChanges(**dataclasses.asdict(t)) for t in tables],
        )


def _duration_proto(value: timedelta | None) -> duration_pb2.Duration | None:
    if value is None:
        return None
    message = duration_pb2.Duration()
    message.FromTimedelta(value)
    return message


def _encode_token(after: str) -> str:
    return base64.urlsafe_b64encode(f"after:{after}".encode()).decode()


def _decode_token(token: str) -> str:
    if not token:
        return ""
    try:
        text = base64.urlsafe_b64decode(token.encode()).decode()
    except (ValueError, UnicodeDecodeError) as exc:
        raise InvalidArgument("page_token", "is not a token this server handed out") from exc
    if not text.startswith("after:"):
        raise InvalidArgument("page_token", "is not a token this server handed out")
    return text.removeprefix("after:")


class BaseServicer(bases_pb2_grpc.BaseServiceServicer):
    def __init__(
        self,
        bases: Bases,
        branches: Branches,
        pipeline: Pipeline,
        gate: Gate,
        admission: dict[str, Admission],
    ) -> None:
        self.bases = bases
        self.branches = branches
        self.pipeline = pipeline
        self.gate = gate
        self.admission = admission
        self.metrics = branches.ctx.metrics

    def to_proto(self, entry: BaseEntry) -> bases_pb2.Base:
        record = entry.record
        counts = self.bases.branch_counts(record.base_id)
        return bases_pb2.Base(
            name=f"bases/{record.base_id}",
            pg_version=record.pg_version,
            versions=[
                bases_pb2.BaseVersion(
                    name=f"bases/{record.base_id}/versions/{n}",
                    version=n,
                    create_time=timestamp(t),
                    branch_count=counts.get(n, 0),
                    provenance=provenance_proto(record.provenance.get(n, {})),
                )
                for n, t in sorted(record.versions.items())
            ],
            create_time=timestamp(record.create_time),
            labels=record.labels,
            size_bytes=record.size_bytes,
            user=record.user,
            database=record.database,
            branch_role=record.branch_role,
            roles=record.roles,
        )

    def _may_change_bases(self) -> None:
        caller = current_caller()
        if not (caller.admin or caller.name in self.bases.ctx.config.tenants.base_changes):
            raise PermissionDenied(
                f"{caller.name!r} may not create, version or delete bases: that is for admins "
                "and the tenants named in tenants.base_changes"
            )

    @rpc
    def CreateBase(
        self, request: bases_pb2.CreateBaseRequest, context: grpc.ServicerContext
    ) -> bases_pb2.Base:
        self._may_change_bases()
        which = request.WhichOneof("source")
        initdb = None
        if which == "initdb" or which is None:
            initdb = InitdbSpec(
                database=request.initdb.database,
                pg_version=request.initdb.pg_version,
                init_sql=request.initdb.init_sql,
            )
        elif not request.data_directory:
            raise InvalidArgument("data_directory", "must not be empty")
        self.bases.create(
            request.base_id,
            initdb=initdb,
            data_directory=request.data_directory if which == "data_directory" else "",
            labels=dict(request.labels),
            branch_role=request.branch_role,
            roles=tuple(request.roles),
        )
        return self.to_proto(self.bases.get(request.base_id))

    @rpc
    def GetBase(
        self, request: bases_pb2.GetBaseRequest, context: grpc.ServicerContext
    ) -> bases_pb2.Base:
        return self.to_proto(self.bases.get(parse_name("name", request.name, "bases")))

    @rpc
    def ListBases(
        self, request: bases_pb2.ListBasesRequest, context: grpc.ServicerContext
    ) -> bases_pb2.ListBasesResponse:
        return bases_pb2.ListBasesResponse(bases=[self.to_proto(e) for e in self.bases.all()])

    @rpc
    def DeleteBase(
        self, request: bases_pb2.DeleteBaseRequest, context: grpc.ServicerContext
    ) -> bases_pb2.DeleteBaseResponse:
        self._may_change_bases()
        self.bases.delete(
            parse_name("name", request.name, "bases"),
            force=request.force,
            allow_missing=request.allow_missing,
            delete_branch=self.branches.delete_entry,
            drop_warm=self.branches.warm.drop_base if self.branches.warm else lambda _: None,
        )
        return bases_pb2.DeleteBaseResponse()

    @rpc
    def ImportBase(
        self, request: bases_pb2.ImportBaseRequest, context: grpc.ServicerContext
    ) -> operations_pb2.Operation:
        self._may_change_bases()
        op = self.pipeline.start_import(import_spec(request), current_caller())
        return operation_proto(op)

    @rpc
    def RefreshBase(
        self, request: bases_pb2.RefreshBaseRequest, context: grpc.ServicerContext
    ) -> operations_pb2.Operation:
        self._may_change_bases()
        base_id = parse_name("name", request.name, "bases")
        return operation_proto(self.pipeline.start_refresh(base_id, current_caller()))

    @rpc
    def CreateBaseVersion(
        self, request: bases_pb2.CreateBaseVersionRequest, context: grpc.ServicerContext
    ) -> bases_pb2.BaseVersion:
        self._may_change_bases()
        base_id = parse_name("parent", request.parent, "bases")
        record, version = self.bases.create_version(base_id, request.data_directory)
        return bases_pb2.BaseVersion(
            name=f"bases/{base_id}/versions/{version}",
            version=version,
            create_time=timestamp(record.versions[version]),
            branch_count=0,
        )


class DaemonServicer(daemon_pb2_grpc.DaemonServiceServicer):
    def __init__(self, branches: Branches, gate: Gate, start_time: datetime) -> None:
        self.branches = branches
        self.gate = gate
        self.start_time = start_time
        self.metrics = branches.ctx.metrics

    @rpc
    def GetStatus(
        self, request: daemon_pb2.GetStatusRequest, context: grpc.ServicerContext
    ) -> daemon_pb2.DaemonStatus:
        ctx = self.branches.ctx
        usage = ctx.driver.pool_usage()
        with ctx.inventory.lock:
            base_count = len(ctx.inventory.bases)
            branch_count = len(ctx.inventory.branches)
            warnings = [
                f"bases/{name} is quarantined (kept, not served): {why}"
                for name, why in sorted(ctx.inventory.quarantined.items())
            ]
        if ctx.isolation == "shared":
            warnings.append(SHARED_UID_WARNING.format(why="see docs/security.md"))
        first, last = ctx.config.postgres.port_range
        return daemon_pb2.DaemonStatus(
            version=__version__,
            driver=ctx.driver.kind,
            pool=ctx.driver.location,
            pool_used_bytes=usage.used_bytes,
            pool_total_bytes=usage.total_bytes,
            base_count=base_count,
            branch_count=branch_count,
            max_branches=ctx.config.daemon.max_branches,
            port_range_first=first,
            port_range_last=last,
            start_time=timestamp(self.start_time),
            warnings=warnings,
            isolation=ctx.isolation,
            caller=current_caller().name,
        )
