"""Bases: golden, cleanly shut down PostgreSQL data directories in the pool,
with immutable numbered versions (storage snapshots `v<n>`).

Creating a base runs `initdb` or copies an existing data directory into a new
volume as the configured OS user, and snapshots it as version 1. Clones inherit
ownership and are never chowned, so no version is sealed while anything in it
belongs to another user or group: a branch's idmapped mount maps only the OS
user and its group, and a file it cannot map is one the branch can never write.
This module orchestrates; it does not speak gRPC and does not run branch
postmasters.
"""

from __future__ import annotations

import os
import pwd
import re
import shutil
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

import structlog

from cowbranchd import deadline, postgres
from cowbranchd.errors import (
    AlreadyExists,
    FailedPrecondition,
    InvalidArgument,
    NotFound,
)
from cowbranchd.model import (
    BaseRecord,
    Parent,
    State,
    now,
    validate_id,
    validate_labels,
    validate_role,
)
from cowbranchd.run import run
from cowbranchd.storage.base import Kind, SnapshotRef

from .imports import (
    INCOMING,
    OUTGOING,
    check_reachable,
    copy_in,
    read_source_version,
    remove_leftovers,
    tree_bytes,
    validate_data_directory,
)
from .inventory import BaseEntry, BranchEntry, Context
from .revert import Revert

__all__ = ["Bases", "InitdbSpec"]

log = structlog.get_logger("cowbranchd.bases")

@dataclass(frozen=True)
class InitdbSpec:
    database: str = ""
    pg_version: int = 0
    init_sql: str = ""


# How often DeleteBase(force) re-reads the branches that depend on the base.
_DEPENDENT_ROUNDS = 100


def version_snap(version: int) -> str:
    return f"v{version}"


class Bases:
    def __init__(self, ctx: Context) -> None:
        self.ctx = ctx
        self._creating: set[str] = set()
        # (base, create time, latest version) -> what keeps its files from
        # being written by a branch's own uid ("" if nothing): one walk per
        # base version and daemon run (see `_check_branchable`).
        self._unwritable: dict[tuple[str, datetime, int | None], str] = {}

    # -- queries -------------------------------------------------------------

    def get(self, base_id: str) -> BaseEntry:
        with self.ctx.inventory.lock:
            entry = self.ctx.inventory.bases.get(base_id)
        if entry is None:
            raise NotFound(f"bases/{base_id} does not exist")
        return entry

    def all(self) -> list[BaseEntry]:
        with self.ctx.inventory.lock:
            return sorted(self.ctx.inventory.bases.values(), key=lambda e: e.record.base_id)

    def branch_counts(self, base_id: str) -> dict[int, int]:
        counts: dict[int, int] = {}
        with self.ctx.inventory.lock:
            for child in self.ctx.inventory.children_of(Kind.BASES, base_id):
                source = child.source
                if source is not None and source.snap.startswith("v"):
                    version = int(source.snap[1:])
                    counts[version] = counts.get(version, 0) + 1
        return counts

    def resolve(self, parent: Parent) -> tuple[BaseRecord, SnapshotRef]:
        """The base record and the version snapshot a branch of `parent` clones."""
        assert parent.base is not None
        entry = self.get(parent.base)
        record = entry.record
        if record.state is not State.READY:
            raise FailedPrecondition(f"bases/{parent.base} is {record.state.name}")
        version = parent.version if parent.version is not None else record.latest_version
        if version is None or version not in record.versions:
            raise NotFound(f"bases/{parent.base}/versions/{parent.version} does not exist")
        if self.ctx.uids is not None:
            self._check_branchable(entry)
        return record, SnapshotRef(Kind.BASES, record.base_id, version_snap(version))

    def _ownership_problem(self, pgdata: Path) -> str:
        """Empty if everything in `pgdata` belongs to os_user and its group,
        the only ids a branch's idmapped mount maps; else which entries do not."""
        os_user = self.ctx.config.postgres.os_user
        user = pwd.getpwnam(os_user)
        foreign = postgres.foreign_owned(pgdata, user.pw_uid, user.pw_gid)
        if not foreign:
            return ""
        return (
            f"files not owned by {os_user} and its group ({user.pw_uid}:{user.pw_gid}), which "
            f"a branch's postgres, running as its own uid, could read but never write (the "
            f"first CHECKPOINT would PANIC): {foreign}"
        )

    def _require_owned(self, pgdata: Path, what: str) -> None:
        """Before `pgdata` becomes a version: FailedPrecondition if anything in
        it belongs to another user or group."""
        problem = self._ownership_problem(pgdata)
        if problem:
            raise FailedPrecondition(f"{what} holds {problem}")

    def _check_branchable(self, entry: BaseEntry) -> None:
        """FailedPrecondition if the base's data holds files a branch's own uid
        could not write. Every version sealed by this code is checked when it
        is made (`_require_owned`); bases made by a cowbranchd whose
        single-user postgres kept root's group are not, and are found here,
        once per version and daemon run, on the data the latest version was
        sealed from (no snapshot has a path the storage interface shows)."""
        record = entry.record
        key = (record.base_id, record.create_time, record.latest_version)
        with self.ctx.inventory.lock:
            problem = self._unwritable.get(key)
        if problem is None:
            try:
                problem = self._ownership_problem(entry.path / "pgdata")
            except FileNotFoundError:
                return  # swapped by an import right now: checked at its seal
            with self.ctx.inventory.lock:
                self._unwritable[key] = problem
            if problem:
                log.error("base_not_branchable", base=record.base_id, error=problem)
        if problem:
            raise FailedPrecondition(
                f"bases/{record.base_id} cannot be branched: it holds {problem}. Bases made by "
                "cowbranchd before its children ran with their user's own group have such "
                "files; import the base again (CreateBaseVersion with data_directory, "
                "ImportBase, or DeleteBase and CreateBase)"
            )

    # -- create --------------------------------------------------------------

    def create(
        self,
        base_id: str,
        *,
        initdb: InitdbSpec | None = None,
        data_directory: str = "",
        labels: Mapping[str, str] | None = None,
        branch_role: str = "",
        roles: tuple[str, ...] = (),
    ) -> BaseRecord:
        validate_id("base_id", base_id)
        labels = validate_labels("labels", labels or {})
        validate_role("branch_role", branch_role)
        for role in roles:
            if not role:
                raise InvalidArgument("roles", "holds an empty role name")
            validate_role("roles", role)
        source_dir = self._source("data_directory", data_directory)
        if source_dir is None and initdb is None:
            initdb = InitdbSpec()
        if initdb is not None and initdb.database:
            validate_id("initdb.database", initdb.database.replace("_", "-"))
        pg_cfg = self.ctx.config.postgres
        if source_dir is not None:
            major = read_source_version(source_dir, pg_cfg.os_user)
        else:
            assert initdb is not None
            installed = postgres.installed_versions(pg_cfg.bin_dirs)
            major = initdb.pg_version or (max(installed) if installed else 0)
        binaries = postgres.find_binaries(major, pg_cfg.bin_dirs)
        if source_dir is not None:
            postgres.check_clean_shutdown(source_dir, binaries, os_user=pg_cfg.os_user)

        inv = self.ctx.inventory
        with inv.lock:
            if base_id in inv.bases or base_id in self._creating:
                raise AlreadyExists(f"bases/{base_id} already exists")
            self._creating.add(base_id)
        try:
            return self._build(
                base_id=base_id,
                major=major,
                binaries=binaries,
                initdb=initdb,
                source_dir=source_dir,
                labels=labels,
                roles=(branch_role, tuple(sorted(set(roles)))),
            )
        finally:
            with inv.lock:
                self._creating.discard(base_id)

    def _build(
        self,
        *,
        base_id: str,
        major: int,
        binaries: postgres.Binaries,
        initdb: InitdbSpec | None,
        source_dir: Path | None,
        labels: dict[str, str],
        roles: tuple[str, tuple[str, ...]],
    ) -> BaseRecord:
        pg_cfg = self.ctx.config.postgres
        driver = self.ctx.driver
        record = BaseRecord(
            base_id=base_id,
            state=State.CREATING,
            create_time=now(),
            pg_version=major,
            user="postgres",
            database=(initdb.database if initdb and initdb.database else "postgres"),
            labels=labels,
            branch_role=roles[0],
            roles=roles[1],
        )
        with Revert() as undo:
            path = driver.create_volume(Kind.BASES, base_id, record.to_meta())
            undo.add("destroy base volume", lambda: driver.destroy(Kind.BASES, base_id))
            os.chmod(path, 0o755)
            check_reachable(path, pg_cfg.os_user)
            pgdata = path / "pgdata"
            if source_dir is not None:
                record = record.evolve(user=self._copy_in(source_dir, pgdata, binaries, record))
            else:
                assert initdb is not None
                pgdata.mkdir(mode=0o700)
                postgres.initdb(
                    str(pgdata),
                    binaries,
                    os_user=pg_cfg.os_user,
                    superuser=record.user,
                    password=postgres.scram_verifier(self.ctx.base_password(record)),
                    database=initdb.database or None,
                    init_sql=initdb.init_sql or None,
                )
                self._require_owned(pgdata, f"bases/{base_id}")
            postgres.check_clean_shutdown(pgdata, binaries, os_user=pg_cfg.os_user)
            driver.snapshot(Kind.BASES, base_id, version_snap(1))
            record = record.evolve(
                state=State.READY, versions={1: now()}, size_bytes=tree_bytes(pgdata)
            )
            driver.set_meta(Kind.BASES, base_id, record.to_meta())
            undo.success()
        with self.ctx.inventory.lock:
            self.ctx.inventory.bases[base_id] = BaseEntry(record=record, path=path)
        log.info("base_created", base=base_id, pg_version=major, source=str(source_dir or "initdb"))
        return record

    def _source(self, field_name: str, data_directory: str) -> Path | None:
        if not data_directory:
            return None
        return validate_data_directory(
            field_name, data_directory, self.ctx.config.daemon.import_roots
        )

    def _copy_in(
        self, source_dir: Path, pgdata: Path, binaries: postgres.Binaries, record: BaseRecord
    ) -> str:
        """Copy a clean data directory in (source untouched, read as the import
        user), and make it answer with this base's credentials."""
        os_user = self.ctx.config.postgres.os_user
        user = pwd.getpwnam(os_user)
        pgdata.mkdir(mode=0o700)
        os.chown(pgdata, user.pw_uid, user.pw_gid)
        copy_in(source_dir, pgdata, os_user)
        postgres.write_hba(pgdata, os_user)
        postgres.prepare_clone(pgdata)
        superuser = self._set_password(pgdata, binaries, self.ctx.base_password(record))
        self._require_owned(pgdata, f"the copy of {source_dir}")
        return superuser

    def _set_password(self, pgdata: Path, binaries: postgres.Binaries, password: str) -> str:
        """Give the cluster's bootstrap superuser (whatever its name) the base's
        password, in single-user mode: no port, no socket, no pg_hba, and a
        clean shutdown at the end. Returns the superuser's name."""
        verifier = postgres.scram_verifier(password)
        if not re.fullmatch(r"[A-Za-z0-9+/=:$-]+", verifier) or "$$" in verifier:
            raise ValueError("a SCRAM verifier is base64 text with $ and : separators")
        script = (
            "DO $$ BEGIN EXECUTE format('ALTER ROLE %I PASSWORD %L', "
            f"(SELECT rolname FROM pg_authid WHERE oid = 10), '{verifier}'); END $$;\n"
            "SELECT rolname FROM pg_authid WHERE oid = 10;\n"
        )
        out = run(
            [binaries.postgres, "--single", "-D", str(pgdata), "-j", "template1"],
            input=script,
            user=self.ctx.config.postgres.os_user,
            cwd="/",
        ).stdout
        match = re.search(r'rolname = "([^"]+)"', out)
        if match is None:
            raise FailedPrecondition(f"could not find the superuser of {pgdata}: {out[-500:]}")
        return match.group(1)

    # -- versions ------------------------------------------------------------

    def create_version(self, base_id: str, data_directory: str = "") -> tuple[BaseRecord, int]:
        validate_id("parent", base_id)
        source_dir = self._source("data_directory", data_directory)
        entry = self.get(base_id)
        os_user = self.ctx.config.postgres.os_user
        with deadline.holding(entry.lock, f"bases/{base_id}"):
            record = entry.record
            binaries = postgres.find_binaries(record.pg_version, self.ctx.config.postgres.bin_dirs)
            pgdata = entry.path / "pgdata"
            remove_leftovers(entry.path)
            if source_dir is not None:
                major = read_source_version(source_dir, os_user)
                if major != record.pg_version:
                    raise FailedPrecondition(
                        f"{source_dir} is PostgreSQL {major}, "
                        f"bases/{base_id} is {record.pg_version}"
                    )
                postgres.check_clean_shutdown(source_dir, binaries, os_user=os_user)
                record = record.evolve(user=self._replace_pgdata(entry.path, source_dir, record))
            else:
                self._require_owned(pgdata, f"bases/{base_id}")
            postgres.check_clean_shutdown(pgdata, binaries, os_user=os_user)
            version = (record.latest_version or 0) + 1
            self.ctx.driver.snapshot(Kind.BASES, base_id, version_snap(version))
            record = record.evolve(
                versions={**record.versions, version: now()}, size_bytes=tree_bytes(pgdata)
            )
            self.ctx.driver.set_meta(Kind.BASES, base_id, record.to_meta())
            entry.record = record
        log.info("base_version_created", base=base_id, version=version)
        return record, version

    def _replace_pgdata(self, volume: Path, source_dir: Path, record: BaseRecord) -> str:
        """The base's pgdata replaced by a copy of `source_dir`, built beside it
        and swapped in by two renames only once complete: a failed copy leaves
        the base as it was."""
        binaries = postgres.find_binaries(record.pg_version, self.ctx.config.postgres.bin_dirs)
        incoming = volume / INCOMING
        try:
            user = self._copy_in(source_dir, incoming, binaries, record)
        except BaseException:
            shutil.rmtree(incoming, ignore_errors=True)
            raise
        os.rename(volume / "pgdata", volume / OUTGOING)
        os.rename(incoming, volume / "pgdata")
        shutil.rmtree(volume / OUTGOING, ignore_errors=True)  # never follows links
        return user

    # -- imports (pipeline.py) -----------------------------------------------------

    def begin(
        self, base_id: str, labels: Mapping[str, str], branch_role: str, roles: tuple[str, ...]
    ) -> BaseEntry:
        """An empty volume (CREATING: removed by reconcile if the daemon dies)
        for an import to fill; not in the inventory until `seal`."""
        validate_id("base_id", base_id)
        inv = self.ctx.inventory
        with inv.lock:
            if base_id in inv.bases or base_id in self._creating:
                raise AlreadyExists(f"bases/{base_id} already exists")
            self._creating.add(base_id)
        record = BaseRecord(
            base_id=base_id,
            state=State.CREATING,
            create_time=now(),
            pg_version=0,
            user="postgres",
            database="postgres",
            labels=dict(labels),
            branch_role=branch_role,
            roles=tuple(sorted(set(roles))),
        )
        try:
            path = self.ctx.driver.create_volume(Kind.BASES, base_id, record.to_meta())
            os.chmod(path, 0o755)
            check_reachable(path, self.ctx.config.postgres.os_user)
            pgdata = path / "pgdata"
            pgdata.mkdir(mode=0o700)
        except BaseException:
            with inv.lock:
                self._creating.discard(base_id)
            raise
        return BaseEntry(record=record, path=path)

    def abandon(self, base_id: str) -> None:
        """Undo `begin` after a failed or cancelled import of a new base."""
        try:
            self.ctx.driver.destroy(Kind.BASES, base_id)
        finally:
            with self.ctx.inventory.lock:
                self._creating.discard(base_id)

    def give_password(
        self, pgdata: Path, binaries: postgres.Binaries, record: BaseRecord
    ) -> str:
        """The imported cluster answers with this base's password (see
        `_set_password`); returns its superuser's name."""
        return self._set_password(pgdata, binaries, self.ctx.base_password(record))

    def swap_in(self, volume: Path, staging: Path) -> None:
        """`staging` becomes the base's pgdata by two renames; the old one goes.
        Refused (nothing renamed) if anything in it is not the os_user's."""
        self._require_owned(staging, "the import")
        os.rename(volume / "pgdata", volume / OUTGOING)
        os.rename(staging, volume / "pgdata")
        shutil.rmtree(volume / OUTGOING, ignore_errors=True)  # never follows links

    def seal(
        self,
        entry: BaseEntry,
        version: int,
        *,
        pg_version: int,
        user: str,
        database: str,
        size: int,
        provenance: dict[str, object],
    ) -> BaseRecord:
        """Snapshot the base's pgdata as `version`, record how it was made,
        and serve it (a new base joins the inventory READY)."""
        base_id = entry.record.base_id
        self.ctx.driver.snapshot(Kind.BASES, base_id, version_snap(version))
        record = entry.record.evolve(
            state=State.READY,
            pg_version=pg_version,
            user=user,
            database=database,
            size_bytes=size,
            versions={**entry.record.versions, version: now()},
            provenance={**entry.record.provenance, version: provenance},
        )
        self.ctx.driver.set_meta(Kind.BASES, base_id, record.to_meta())
        entry.record = record
        with self.ctx.inventory.lock:
            self.ctx.inventory.bases[base_id] = entry
            self._creating.discard(base_id)
        log.info("base_version_sealed", base=base_id, version=version, bytes=size)
        return record

    def prune_versions(self, base_id: str, keep: int) -> list[int]:
        """Remove the base's versions older than its newest `keep` that no
        branch depends on (and their raw imports); returns those removed."""
        entry = self.get(base_id)
        if keep <= 0 or len(entry.record.versions) <= keep:
            return []
        # Never waits: an import holds the lock for minutes, and this runs
        # in the reaper (and again after every import).
        if not entry.lock.acquire(blocking=False):
            return []
        try:
            record = entry.record
            old = sorted(record.versions)[:-keep]
            with self.ctx.inventory.lock:
                used = {
                    child.source.snap
                    for child in self.ctx.inventory.children_of(Kind.BASES, base_id)
                    if child.source is not None
                }
            removed = [n for n in old if version_snap(n) not in used]
            if not removed:
                return []
            for n in removed:
                for snap in (version_snap(n), f"raw{n}"):
                    self.ctx.driver.destroy_snapshot(SnapshotRef(Kind.BASES, base_id, snap))
            record = record.evolve(
                versions={n: t for n, t in record.versions.items() if n not in removed},
                provenance={n: p for n, p in record.provenance.items() if n not in removed},
            )
            self.ctx.driver.set_meta(Kind.BASES, base_id, record.to_meta())
            entry.record = record
        finally:
            entry.lock.release()
        log.info("base_versions_removed", base=base_id, versions=removed, kept=keep)
        return removed

    # -- delete --------------------------------------------------------------

    def delete(
        self,
        base_id: str,
        *,
        force: bool,
        allow_missing: bool,
        delete_branch: Callable[[BranchEntry], object],
        drop_warm: Callable[[str], None] = lambda base_id: None,
    ) -> None:
        validate_id("name", base_id)
        try:
            entry = self.get(base_id)
        except NotFound:
            if allow_missing:
                return
            raise
        dependents = self.ctx.inventory.descendants_of_base(base_id)
        if dependents and not force:
            names = ", ".join(f"branches/{d.branch_id}" for d in dependents[:5])
            more = f" and {len(dependents) - 5} more" if len(dependents) > 5 else ""
            raise FailedPrecondition(
                f"bases/{base_id} has {len(dependents)} branch(es): {names}{more}; "
                "delete them first or pass force"
            )
        ready = entry.record
        # DELETING first: no new branch, and no new warm clone, starts from it.
        entry.record = ready.evolve(state=State.DELETING)
        try:
            # Read again after DELETING, and until none is left: a create that
            # resolved the base just before would otherwise be orphaned.
            for _ in range(_DEPENDENT_ROUNDS):
                for dependent in dependents:
                    delete_branch(dependent)
                dependents = self.ctx.inventory.descendants_of_base(base_id)
                if not dependents:
                    break
                time.sleep(0.05)  # let creates in flight settle, then their branches go
            else:
                raise FailedPrecondition(
                    f"bases/{base_id}: branches kept appearing while it was deleted; try again"
                )
            drop_warm(base_id)
            with deadline.holding(entry.lock, f"bases/{base_id}"):
                # A followed base's standby runs on its pgdata (follow.py).
                standby = postgres.find_postmaster(str(entry.path / "pgdata"))
                if standby is not None:
                    postgres.stop(standby, fast_timeout=0)
                self.ctx.driver.destroy(Kind.BASES, base_id)
        except BaseException:
            entry.record = ready
            raise
        with self.ctx.inventory.lock:
            self.ctx.inventory.bases.pop(base_id, None)
        log.info("base_deleted", base=base_id, branches_deleted=len(dependents))
