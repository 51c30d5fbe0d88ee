"""Bringing production in: ImportBase and RefreshBase as long-running
operations. Import (pg_basebackup, pg_restore/psql, or a data directory) into
a staging directory beside the base's pgdata, run the transforms on a
private staging cluster, scrub what they changed, give the cluster the
base's password, swap it in and seal it as the next version. Only the sealed
result is ever branchable; the staging directory goes on any failure or
cancel. Each version records where it came from (provenance, in the base's
metadata: no secrets) and the recipe to make the next one (a root-only file:
it may hold the source's password and the masking SQL). No gRPC.
"""

from __future__ import annotations

import hashlib
import json
import os
import pwd
import shutil
from dataclasses import asdict, dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

import structlog

from cowbranchd import deadline, postgres
from cowbranchd.errors import (
    CowbranchError,
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    PermissionDenied,
)
from cowbranchd.model import BaseRecord, now, validate_id, validate_labels, validate_role
from cowbranchd.postgres import masking, sources
from cowbranchd.safefs import open_dir, read_regular, replace_file
from cowbranchd.storage.base import Kind

from .auth import ADMIN, Caller
from .bases import Bases
from .follow import Followers, is_followed
from .imports import copy_in, read_source_version, tree_bytes, validate_data_directory
from .inventory import BaseEntry, Context
from .operations import Operation, Operations
from .revert import Revert

__all__ = ["ImportSpec", "Pipeline"]

log = structlog.get_logger("cowbranchd.pipeline")

# Beside a base's pgdata while an import is staged; only ever one (the
# base's lock is held for the whole import).
STAGING = ".pgdata.import"
MAX_TRANSFORM_BYTES = 16 * 1024 * 1024
MAX_RECIPE_BYTES = 64 * 1024 * 1024
# Kind of source -> the request field that names it (for error messages).
KINDS = {
    "server": "from_server",
    "dump": "from_dump",
    "data_directory": "data_directory",
    "follow": "follow",
}


@dataclass(frozen=True)
class ImportSpec:
    """One import, as asked for (and as replayed by a refresh)."""

    base_id: str
    kind: str  # server | dump | data_directory | follow
    source: str  # a DSN (maybe with its password) or a path
    transforms: tuple[masking.SqlTransform, ...] = ()
    command: tuple[str, ...] = ()
    jobs: int = 0
    keep_raw: bool = False
    database: str = ""
    labels: dict[str, str] = field(default_factory=dict)
    branch_role: str = ""
    roles: tuple[str, ...] = ()

    def recipe(self) -> dict[str, Any]:
        data = asdict(self)
        data["transforms"] = [{"name": t.name, "sql": t.sql.decode()} for t in self.transforms]
        return data

    @classmethod
    def from_recipe(cls, data: dict[str, Any]) -> ImportSpec:
        transforms = tuple(
            masking.SqlTransform(t["name"], t["sql"].encode()) for t in data.get("transforms", ())
        )
        return cls(
            **{
                **data,
                "transforms": transforms,
                "command": tuple(data.get("command", ())),
                "roles": tuple(data.get("roles", ())),
                "keep_raw": False,
            }
        )

    def provenance(
        self, started: datetime, ended: datetime, size: int, major: int
    ) -> dict[str, Any]:
        """What the version records about itself: nothing secret."""
        return {
            "source_kind": self.kind,
            "source": _without_password(self.source) if self.kind == "server" else self.source,
            "transforms": [
                f"{t.name} sha256:{hashlib.sha256(t.sql).hexdigest()}" for t in self.transforms
            ],
            "transform_command": (
                "sha256:" + hashlib.sha256("\0".join(self.command).encode()).hexdigest()
                if self.command
                else ""
            ),
            "start_time": started.isoformat(),
            "end_time": ended.isoformat(),
            "bytes": size,
            "pg_version": major,
        }


def _database(spec: ImportSpec, imported: sources.Imported, record: BaseRecord) -> str:
    """The database branches connect to: the base's own once it has versions,
    else the one asked for, else the import's only non-default database,
    else `postgres`. It must exist in what was imported."""
    if record.versions:
        database = record.database
    elif spec.database:
        database = spec.database
    else:
        own = [d for d in imported.databases if d != "postgres"]
        database = own[0] if len(own) == 1 else "postgres"
    if database not in imported.databases:
        raise FailedPrecondition(
            f"the import has no database {database!r} (it has: {', '.join(imported.databases)})"
        )
    return database


def _without_password(dsn: str) -> str:
    try:
        from psycopg.conninfo import conninfo_to_dict, make_conninfo  # noqa: PLC0415

        parts = conninfo_to_dict(dsn)
    except Exception:  # an unparsable DSN is shown as nothing rather than leaked
        return "(unparsable DSN)"
    parts.pop("password", None)
    return make_conninfo(**{k: str(v) for k, v in parts.items()})


class Pipeline:
    """ImportBase and RefreshBase: validate at once, run as an operation."""

    def __init__(self, ctx: Context, bases: Bases, operations: Operations) -> None:
        self.ctx = ctx
        self.bases = bases
        self.operations = operations
        self._recipes = ctx.config.daemon.state_dir / "recipes"
        self.follow = Followers(ctx, bases)

    # -- requests ----------------------------------------------------------------

    def start_import(self, spec: ImportSpec, caller: Caller) -> Operation:
        validate_id("base_id", spec.base_id)
        if spec.kind not in KINDS:
            raise InvalidArgument(
                "source", "give one of from_server, from_dump, data_directory, follow"
            )
        if not spec.source:
            raise InvalidArgument(KINDS[spec.kind], "must not be empty")
        if spec.kind in ("server", "follow") and not caller.admin:
            # pg_basebackup writes the files the server names, as the user
            # who owns every base: only a server the operator trusts.
            raise PermissionDenied(
                f"{KINDS[spec.kind]} is for admins: the source server decides what "
                "pg_basebackup writes on this host; tenants import from dumps"
            )
        if (spec.command or spec.keep_raw) and not caller.admin:
            raise PermissionDenied(
                "transform_command and keep_raw are for admins: a command runs on this host, "
                "and a raw copy keeps what masking removes"
            )
        if not 0 <= spec.jobs <= 64:
            raise InvalidArgument("jobs", "must be between 0 and 64")
        validate_labels("labels", spec.labels)
        validate_role("branch_role", spec.branch_role)
        for role in spec.roles:
            validate_role("roles", role)
        if spec.database:
            validate_id("database", spec.database.replace("_", "-"))
        total = 0
        for transform in spec.transforms:
            total += len(transform.sql)
            if not transform.name or "\0" in transform.name or len(transform.name) > 200:
                raise InvalidArgument("transforms.name", "must be 1-200 characters")
        if total > MAX_TRANSFORM_BYTES:
            raise InvalidArgument("transforms", f"hold more than {MAX_TRANSFORM_BYTES} bytes")
        if spec.kind == "follow" and (spec.transforms or spec.command or spec.keep_raw):
            raise InvalidArgument(
                "follow", "a followed base is a standby of the server: it takes no transform"
            )
        if spec.kind not in ("server", "follow"):
            roots = self.ctx.config.daemon.import_roots
            validate_data_directory(KINDS[spec.kind], spec.source, roots)
        return self.operations.start(
            f"bases/{spec.base_id}", caller, lambda op: self._run(op, spec)
        )

    def start_refresh(self, base_id: str, caller: Caller) -> Operation:
        validate_id("name", base_id)
        self.bases.get(base_id)
        spec = self._read_recipe(base_id)
        return self.operations.start(f"bases/{base_id}", caller, lambda op: self._run(op, spec))

    def tick(self) -> None:
        """The reaper's turn: start the refreshes the schedule says are due,
        and remove versions past imports.keep_versions that nothing uses."""
        imports = self.ctx.config.imports
        with self.ctx.inventory.lock:
            bases = {b: e.record for b, e in self.ctx.inventory.bases.items()}
        for base_id, interval in imports.refresh.items():
            record = bases.get(base_id)
            latest = record.latest_version if record is not None else None
            if record is None or latest is None or now() - record.versions[latest] < interval:
                continue
            if any(
                not o.done for o in self.operations.visible(ADMIN) if o.target == f"bases/{base_id}"
            ):
                continue
            try:
                self.start_refresh(base_id, ADMIN)
            except CowbranchError as exc:
                log.warning("scheduled_refresh_not_started", base=base_id, error=exc.message)
        try:
            self.follow.tick()
        except CowbranchError as exc:
            log.warning("follow_tick_failed", error=exc.message)
        if imports.keep_versions:
            for base_id in [b for b, r in bases.items() if not is_followed(r)]:
                try:
                    self.bases.prune_versions(base_id, imports.keep_versions)
                except CowbranchError as exc:
                    log.warning("prune_versions_failed", base=base_id, error=exc.message)

    # -- the work ------------------------------------------------------------------

    def _run(self, op: Operation, spec: ImportSpec) -> str:
        started = now()
        with self.ctx.inventory.lock:
            entry = self.ctx.inventory.bases.get(spec.base_id)
        if entry is None:
            entry = self.bases.begin(spec.base_id, spec.labels, spec.branch_role, spec.roles)
            new = True
        else:
            new = False
        if spec.kind == "follow":
            if not new:
                raise FailedPrecondition(
                    f"bases/{spec.base_id} exists: only a new base can follow a server"
                )
            try:
                with deadline.holding(entry.lock, f"bases/{spec.base_id}"):
                    version = self.follow.run(
                        op,
                        entry,
                        spec.source,
                        lambda imported: _database(spec, imported, entry.record),
                    )
            except BaseException:
                self.bases.abandon(spec.base_id)
                raise
            return f"bases/{spec.base_id}/versions/{version}"
        try:
            with deadline.holding(entry.lock, f"bases/{spec.base_id}"):
                version = self._stage_and_seal(op, spec, entry, started)
        except BaseException:
            if new:
                self.bases.abandon(spec.base_id)
            raise
        self._write_recipe(spec)
        keep = self.ctx.config.imports.keep_versions
        if keep:
            self.bases.prune_versions(spec.base_id, keep)
        return f"bases/{spec.base_id}/versions/{version}"

    def _stage_and_seal(
        self, op: Operation, spec: ImportSpec, entry: BaseEntry, started: datetime
    ) -> int:
        pg = self.ctx.config.postgres
        staging = entry.path / STAGING
        if os.path.lexists(staging):
            shutil.rmtree(staging)  # a crashed import's; never follows links
        record = entry.record
        with Revert() as undo:
            undo.add("remove staging", lambda: shutil.rmtree(staging, ignore_errors=True))
            imported = self._import(op, spec, record, staging)
            if record.pg_version and imported.major != record.pg_version:
                raise FailedPrecondition(
                    f"the source is PostgreSQL {imported.major}, "
                    f"bases/{spec.base_id} is {record.pg_version}"
                )
            op.check()
            binaries = postgres.find_binaries(imported.major, pg.bin_dirs)
            version = (record.latest_version or 0) + 1
            if spec.keep_raw:
                op.progress("keeping raw copy")
                self.ctx.driver.snapshot(Kind.BASES, spec.base_id, f"raw{version}")
            if spec.transforms or spec.command:
                self._transform(
                    op,
                    spec=spec,
                    staging=staging,
                    binaries=binaries,
                    imported=imported,
                    record=record,
                )
            op.progress("sealing")
            superuser = self.bases.give_password(staging, binaries, record)
            self.bases.swap_in(entry.path, staging)
            undo.success()
        size = tree_bytes(entry.path / "pgdata")
        provenance = spec.provenance(started, now(), size, imported.major)
        database = _database(spec, imported, record)
        self.bases.seal(
            entry,
            version,
            pg_version=imported.major,
            user=superuser,
            database=database,
            size=size,
            provenance=provenance,
        )
        return version

    def _import(
        self, op: Operation, spec: ImportSpec, record: BaseRecord, staging: Path
    ) -> sources.Imported:
        pg = self.ctx.config.postgres
        user = pwd.getpwnam(pg.os_user)
        staging.mkdir(mode=0o700)
        os.chown(staging, user.pw_uid, user.pw_gid)

        def progress(phase: str, done: int, total: int) -> None:
            op.phase, op.bytes_done, op.bytes_total = phase, done, total

        op.progress("copying")
        if spec.kind == "server":
            return sources.from_server(
                spec.source,
                str(staging),
                bin_dirs=pg.bin_dirs,
                os_user=pg.os_user,
                progress=progress,
                cancel=op.cancelled,
            )
        if spec.kind == "dump":
            password = postgres.scram_verifier(self.ctx.base_password(record))
            return sources.from_dump(
                spec.source,
                str(staging),
                bin_dirs=pg.bin_dirs,
                os_user=pg.os_user,
                superuser=record.user or "postgres",
                password=password,
                jobs=spec.jobs or os.cpu_count() or 1,
                database=spec.database or "postgres",
                roles=(spec.branch_role, *spec.roles) if spec.branch_role else spec.roles,
                progress=progress,
                cancel=op.cancelled,
            )
        source = Path(spec.source)
        major = read_source_version(source, pg.os_user)
        binaries = postgres.find_binaries(major, pg.bin_dirs)
        postgres.check_clean_shutdown(source, binaries, os_user=pg.os_user)
        staging.rmdir()
        copy_in(source, staging, pg.os_user)
        return sources.finish_import(
            str(staging), binaries, os_user=pg.os_user, cancel=op.cancelled
        )

    def _transform(
        self,
        op: Operation,
        *,
        spec: ImportSpec,
        staging: Path,
        binaries: postgres.Binaries,
        imported: sources.Imported,
        record: BaseRecord,
    ) -> None:
        pg = self.ctx.config.postgres
        database = _database(spec, imported, record)
        with masking.staging(
            str(staging), binaries, os_user=pg.os_user, superuser=imported.superuser
        ) as stage:
            op.progress("transforming")
            masking.run_sql_transforms(
                stage, spec.transforms, database=database, cancel=op.cancelled
            )
            if spec.command:
                masking.run_transform_command(
                    stage, spec.command, database=database, cancel=op.cancelled
                )
            op.progress("scrubbing")
            masking.scrub(stage)
        masking.scrub_files(str(staging), binaries, os_user=pg.os_user)

    # -- recipes ---------------------------------------------------------------------

    def _write_recipe(self, spec: ImportSpec) -> None:
        """Root-only: it may hold a DSN's password and the masking SQL."""
        self._recipes.mkdir(mode=0o700, parents=True, exist_ok=True)
        os.chmod(self._recipes, 0o700)
        data = json.dumps(spec.recipe(), sort_keys=True).encode()
        with open_dir(self._recipes) as fd:
            replace_file(fd, f"{spec.base_id}.json", data, uid=0, gid=0, mode=0o600)

    def _read_recipe(self, base_id: str) -> ImportSpec:
        shown = str(self._recipes / f"{base_id}.json")
        try:
            with open_dir(self._recipes) as fd:
                data = read_regular(fd, f"{base_id}.json", limit=MAX_RECIPE_BYTES, shown=shown)
        except FileNotFoundError:
            data = None
        if data is None:
            raise NotFound(f"bases/{base_id} has no recipe to replay: it was never imported")
        return ImportSpec.from_recipe(json.loads(data))
