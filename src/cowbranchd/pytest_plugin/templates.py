"""Templates by migration hash: the application's schema built once per
(parent version, migration files) and branched for every test.

The hash covers the caller's identity, the parent's version, the migration
callable's name and the content of `cowbranch_migrate_files`. The first
process to need hash H creates branch `tpl-<H[:12]>` (labelled
`cowbranchd.template=building`, held in its lease), calls the migration with
its DSN, freezes it (FreezeBranch: children clone one snapshot of it, from
warm clones when the daemon keeps them), then marks it `ready`, protects it
and lets it out of the lease.
Every other process (xdist workers, other runs on the runner) finds the id
taken (ALREADY_EXISTS), waits for `ready` and branches from it. A builder
that died loses its template within the daemon's lease grace, or, should
its daemon restart meanwhile, leaves it `building`: waiters delete it after
`cowbranch_template_timeout` and build again. Templates unused for
`cowbranch_template_max_age` (label `cowbranchd.template-used`, seconds since
the epoch) are deleted by the next process that uses templates.
"""

from __future__ import annotations

import contextlib
import glob
import hashlib
import importlib
import time
from collections.abc import Callable, Sequence
from datetime import timedelta
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from cowbranchd.client import Branch, Client

__all__ = ["TEMPLATE_LABEL", "USED_LABEL", "Templates", "load_migration", "migration_files"]

TEMPLATE_LABEL = "cowbranchd.template"
HASH_LABEL = "cowbranchd.template-hash"
USED_LABEL = "cowbranchd.template-used"
POLL_S = 0.2
MAX_LOST_BUILDS = 5


def load_migration(spec: str) -> Callable[[str], object]:
    """`pkg.mod:fn` -> the callable; ValueError naming what is wrong."""
    module_name, _, attr = spec.partition(":")
    if not module_name or not attr:
        raise ValueError(f"cowbranch_migrate: {spec!r} is not 'package.module:function'")
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise ValueError(f"cowbranch_migrate: cannot import {module_name!r}: {exc}") from exc
    fn = getattr(module, attr, None)
    if not callable(fn):
        raise ValueError(f"cowbranch_migrate: {module_name!r} has no function {attr!r}")
    return fn  # type: ignore[no-any-return]


def migration_files(root: Path, patterns: Sequence[str]) -> list[Path]:
    """The files the patterns (relative to `root`, `**` recursive) match, sorted."""
    found: set[Path] = set()
    for pattern in patterns:
        for name in glob.glob(pattern, root_dir=root, recursive=True):
            path = root / name
            if path.is_file():
                found.add(path)
    return sorted(found)


def template_hash(identity: Sequence[str], root: Path, files: Sequence[Path]) -> str:
    digest = hashlib.sha256()
    for part in identity:
        digest.update(part.encode() + b"\0")
    for path in files:
        digest.update(str(path.relative_to(root)).encode() + b"\0")
        digest.update(hashlib.sha256(path.read_bytes()).digest())
    return digest.hexdigest()


class Templates:
    """One process's templates: parent -> `branches/tpl-...`, built or waited for once."""

    def __init__(
        self,
        client: Client,
        migrate: str,
        root: Path,
        patterns: Sequence[str],
        *,
        max_age: timedelta | None,
        timeout: timedelta,
        holder: str,
    ) -> None:
        self.client = client
        self.migrate = migrate
        self.root = root
        self.patterns = patterns
        self.max_age = max_age
        self.timeout = timeout.total_seconds()
        self.holder = holder
        self._parents: dict[str, str] = {}
        self._swept = False

    def parent_for(self, parent: str) -> str:
        """The template of `parent` for the current migrations, made ready if need be."""
        if parent.startswith("branches/tpl-"):
            return parent
        if parent not in self._parents:
            self._sweep()
            self._parents[parent] = self._ensure(parent)
        return self._parents[parent]

    def _version_of(self, parent: str) -> str:
        """What identifies the parent's data: its version, or a branch's creation."""
        if parent.startswith("branches/"):
            branch = self.client.get_branch(parent)
            return f"{branch.name}@{branch.create_time}"
        name = parent.removeprefix("bases/")
        if "/versions/" in name:
            return f"bases/{name}"
        base = self.client.get_base(name)
        return f"bases/{name}/versions/{max(v.version for v in base.versions)}"

    def _ensure(self, parent: str) -> str:
        from cowbranchd.errors import AlreadyExists, NotFound  # noqa: PLC0415

        version = self._version_of(parent)
        files = migration_files(self.root, self.patterns)
        caller = str(self.client.status()["caller"])
        digest = template_hash((caller, version, self.migrate), self.root, files)[:12]
        name = f"branches/tpl-{digest}"
        lost = 0  # builds refused as ALREADY_EXISTS with no such branch to be seen
        while True:
            try:
                template = self.client.get_branch(name)
            except NotFound:
                try:
                    self._build(name, version, digest)
                except NotFound:
                    continue  # its parent's build was removed meanwhile: look again
                except AlreadyExists as exc:
                    # Another process won: look again. Bounded, should the
                    # name stay refused while no branch by it can be seen.
                    lost += 1
                    if lost >= MAX_LOST_BUILDS:
                        raise AlreadyExists(
                            f"{name} cannot be built: {exc.message}; yet no such branch "
                            f"is listed after {MAX_LOST_BUILDS} tries (see the daemon's log)"
                        ) from exc
                    time.sleep(POLL_S)
                    continue
                return name
            if template.labels.get(TEMPLATE_LABEL) == "ready":
                self._touch(template)
                return name
            self._wait_while_building(template)

    def _wait_while_building(self, template: Branch) -> None:
        """Until the template is no longer the `building` one seen; past the
        timeout, delete that one (never a newer one by the same name)."""
        from cowbranchd.errors import NotFound  # noqa: PLC0415

        started = time.monotonic()
        while time.monotonic() - started < self.timeout:
            time.sleep(POLL_S)
            try:
                now = self.client.get_branch(template.name)
            except NotFound:
                return
            if now.create_time != template.create_time or now.labels.get(TEMPLATE_LABEL) != (
                "building"
            ):
                return
        self.client.delete_branch(template.name, allow_missing=True, force=True)

    def _build(self, name: str, version: str, digest: str) -> None:
        migrate = load_migration(self.migrate)
        branch_id = name.removeprefix("branches/")
        labels = {TEMPLATE_LABEL: "building", HASH_LABEL: digest, USED_LABEL: _now()}
        lease = self.client.lease(holder=self.holder)
        # Held from the moment it exists: a builder killed at any point loses
        # it within the daemon's lease grace.
        template = self.client.create_branch(
            version, branch_id=branch_id, labels=labels, lease=lease
        )
        try:
            migrate(template.dsn)
            # Children clone its frozen data: no checkpoint of it per test,
            # no recovery at their start, and warm clones of it.
            self.client.freeze_branch(template.name)
        except BaseException:
            self.client.delete_branch(template.name, allow_missing=True, force=True)
            raise
        self.client.update_branch(
            template.name, labels={**labels, TEMPLATE_LABEL: "ready"}, protected=True
        )
        lease.keep(template.name)

    def _touch(self, template: Branch) -> None:
        """Record this use, so an unused-template sweep spares it."""
        from cowbranchd.errors import NotFound  # noqa: PLC0415

        if self.max_age is None:
            return
        labels = dict(template.labels)
        if time.time() - float(labels.get(USED_LABEL, "0")) < 60:
            return
        labels[USED_LABEL] = _now()
        with contextlib.suppress(NotFound):
            self.client.update_branch(template.name, labels=labels)

    def _sweep(self) -> None:
        """Delete ready templates unused for longer than max_age (once per process)."""
        if self._swept or self.max_age is None:
            return
        self._swept = True
        oldest = time.time() - self.max_age.total_seconds()
        for template in self.client.list_branches(f"{TEMPLATE_LABEL}=ready"):
            if float(template.labels.get(USED_LABEL, "0")) < oldest:
                self.client.delete_branch(template.name, allow_missing=True, force=True)


def _now() -> str:
    return str(int(time.time()))
