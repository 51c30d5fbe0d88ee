"""What each cowbranchctl subcommand does, on top of `cowbranchd.client.Client`.

Each handler takes the client, the parsed arguments and an `Output`, prints
either a table or the documented JSON document, and returns an exit code.
Errors are left to `ctl.main`, which maps them to exit codes in one place.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any, TextIO

from cowbranchd import __version__
from cowbranchd.client import Base, Branch, Client, NotFound, format_selector, parse_duration
from cowbranchd.errors import InvalidArgument

from .dev import cmd_checkout, cmd_logs, cmd_prune, cmd_psql
from .doctor import cmd_doctor
from .imports import (
    cmd_base_refresh,
    cmd_import,
    cmd_operation_cancel,
    cmd_operation_show,
    cmd_operations,
    is_import,
)
from .render import (
    BASE_HEADERS,
    BRANCH_HEADERS,
    base_details,
    base_rows,
    branch_details,
    branch_rows,
    format_bytes,
    key_values,
    table,
    to_json,
)

__all__ = [
    "COMMANDS",
    "EXIT_FAILURE",
    "EXIT_NOT_FOUND",
    "EXIT_OK",
    "EXIT_USAGE",
    "OFFLINE",
    "Output",
]

EXIT_OK = 0
EXIT_FAILURE = 1
EXIT_USAGE = 2
EXIT_NOT_FOUND = 3


@dataclass
class Output:
    """Where and how to print: `json` or `table`, at a fixed `now` for ages."""

    mode: str
    stream: TextIO
    now: datetime = field(default_factory=lambda: datetime.now(UTC))

    @property
    def json(self) -> bool:
        """True when scripts asked for JSON."""
        return self.mode == "json"

    def emit(self, document: Any, text: str) -> None:
        """Print `document` as JSON or `text` for people."""
        print(to_json(document) if self.json else text, file=self.stream)


def pairs(items: Sequence[str] | None, flag: str) -> dict[str, str]:
    """`key=value` arguments as a mapping; InvalidArgument naming `flag` otherwise."""
    result: dict[str, str] = {}
    for item in items or ():
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise InvalidArgument(flag, f"{item!r} is not key=value")
        result[key.strip()] = value.strip()
    return result


def selector_of(args: argparse.Namespace) -> str:
    """The label selector of `-l` terms and `--selector`, joined."""
    terms = [*(getattr(args, "label", None) or ())]
    if getattr(args, "selector", None):
        terms.append(args.selector)
    return format_selector(",".join(terms))


def _show_branch(out: Output, branch: Branch, dsn_only: bool = False) -> None:
    if dsn_only:
        print(branch.dsn, file=out.stream)
        return
    out.emit(branch.to_dict(), key_values(branch_details(branch, out.now)))


def _show_branches(out: Output, branches: list[Branch]) -> None:
    out.emit(
        [b.to_dict() for b in branches],
        table(BRANCH_HEADERS, branch_rows(branches, out.now)) if branches else "no branches",
    )


def _show_base(out: Output, base: Base) -> None:
    out.emit(base.to_dict(), base_details(base, out.now))


# -- branches ---------------------------------------------------------------------


def cmd_create(client: Client, args: argparse.Namespace, out: Output) -> int:
    """`create PARENT`: a new branch, printed once it answers queries."""
    branch = client.create_branch(
        args.parent,
        branch_id=args.id or "",
        labels=pairs(args.label, "--label"),
        ttl=args.ttl,
        postgres_settings=pairs(args.setting, "--setting"),
        protected=args.protected,
        request_id=args.request_id,
        role=args.role or "",
        idle_suspend=_duration("--idle-suspend", args.idle_suspend),
        at=_timestamp("--at", args.at) if args.at else None,
    )
    _show_branch(out, branch, args.dsn_only)
    return EXIT_OK


def cmd_diff(client: Client, args: argparse.Namespace, out: Output) -> int:
    """`diff BRANCH`: its schema against its parent's (a unified diff) and
    rows inserted/updated/deleted per table since it was made."""
    diff = client.diff_branch(args.name)
    rows = [
        [f"{t['database']}.{t['schema']}.{t['table']}", *(str(t[k]) for k in _CHANGES)]
        for t in diff.tables
    ]
    changes = (
        table(("TABLE", "INSERTED", "UPDATED", "DELETED"), rows) if rows else "no rows changed"
    )
    schema = diff.schema_diff.rstrip("\n") or f"schema: same as {diff.parent}"
    out.emit(diff.to_dict(), f"{schema}\n\n{changes}")
    return EXIT_OK


_CHANGES = ("inserted", "updated", "deleted")


def _duration(option: str, text: str | None) -> timedelta | None:
    """A duration as `--ttl` takes it (`90s`, `30m`, `1h30m`; `0`: off), or
    None when the option was not given; a bad one names `option`."""
    return None if text is None else parse_duration(text, field=option)


def _timestamp(option: str, text: str) -> datetime:
    """An ISO 8601 time; without a zone, UTC."""
    try:
        when = datetime.fromisoformat(text.replace("Z", "+00:00"))
    except ValueError:
        raise InvalidArgument(option, f"{text!r} is not a time like 2026-11-21T23:00:00Z") from None
    return when if when.tzinfo is not None else when.replace(tzinfo=UTC)


def cmd_list(client: Client, args: argparse.Namespace, out: Output) -> int:
    """`list`: branches matching the selector."""
    _show_branches(out, list(client.list_branches(selector_of(args))))
    return EXIT_OK


def cmd_show(client: Client, args: argparse.Namespace, out: Output) -> int:
    """`show NAME`: one branch in full."""
    _show_branch(out, client.get_branch(args.name), args.dsn_only)
    return EXIT_OK


def cmd_delete(client: Client, args: argparse.Namespace, out: Output) -> int:
    """`delete NAME...` or `delete --selector S`: every branch named or matched.

    Goes on past a missing branch and exits 3 at the end, so one typo does not
    leave the rest alive.
    """
    selector = selector_of(args)
    if args.names and selector:
        raise InvalidArgument("--selector", "give branch names or a selector, not both")
    if not args.names and not selector:
        raise InvalidArgument("names", "give branch names, or --selector/-l to delete in bulk")
    names = list(args.names) or [b.name for b in client.list_branches(selector)]
    deleted: list[str] = []
    missing: list[str] = []
    for name in names:
        try:
            client.delete_branch(name, allow_missing=args.allow_missing, force=args.force)
        except NotFound:
            missing.append(name)
        else:
            deleted.append(name if name.startswith("branches/") else f"branches/{name}")
    lines = [f"deleted {n}" for n in deleted] + [f"not found: {n}" for n in missing]
    out.emit(
        {"deleted": deleted, "missing": missing},
        "\n".join(lines) or f"no branches match {selector!r}",
    )
    return EXIT_NOT_FOUND if missing else EXIT_OK


def cmd_reset(client: Client, args: argparse.Namespace, out: Output) -> int:
    """`reset NAME [--to-version N]`: throw away a branch's writes (or move
    it to another version of its base)."""
    if args.to_version is not None and args.to_version < 1:
        raise InvalidArgument("--to-version", "must be a version number (1 or more)")
    _show_branch(out, client.reset_branch(args.name, version=args.to_version or 0))
    return EXIT_OK


def cmd_freeze(client: Client, args: argparse.Namespace, out: Output) -> int:
    """`freeze NAME`: make the branch a template (left SUSPENDED; children
    clone its frozen data, warm where the daemon keeps warm branches)."""
    _show_branch(out, client.freeze_branch(args.name))
    return EXIT_OK


def cmd_update(client: Client, args: argparse.Namespace, out: Output) -> int:
    """`update NAME`: merge labels in or out, set ttl or idle suspend, protect
    or unprotect."""
    labels = None
    if args.label or args.remove_label:
        current = dict(client.get_branch(args.name).labels)
        current.update(pairs(args.label, "--label"))
        for key in args.remove_label or ():
            current.pop(key, None)
        labels = current
    ttl = "0s" if args.no_expiry else args.ttl
    branch = client.update_branch(
        args.name,
        labels=labels,
        ttl=ttl,
        protected=args.protected,
        idle_suspend=_duration("--idle-suspend", args.idle_suspend),
    )
    _show_branch(out, branch)
    return EXIT_OK


# -- bases ------------------------------------------------------------------------


def cmd_base_create(client: Client, args: argparse.Namespace, out: Output) -> int:
    """`base create BASE_ID`: from --data-directory, or initdb; or an import
    (--from-server, --from-dump, --transform)."""
    if is_import(args):
        return cmd_import(client, args, out, args.base_id)
    init_sql = args.init_sql or ""
    if args.init_sql_file:
        with open(args.init_sql_file, encoding="utf-8") as handle:
            init_sql = handle.read()
    base = client.create_base(
        args.base_id,
        data_directory=args.data_directory,
        database=args.database or "",
        pg_version=args.pg_version or 0,
        init_sql=init_sql,
        labels=pairs(args.label, "--label"),
        branch_role=args.branch_role or "",
        roles=args.role or (),
    )
    _show_base(out, base)
    return EXIT_OK


def cmd_base_list(client: Client, args: argparse.Namespace, out: Output) -> int:
    """`base list`: every base."""
    bases = client.list_bases()
    out.emit(
        [b.to_dict() for b in bases],
        table(BASE_HEADERS, base_rows(bases, out.now)) if bases else "no bases",
    )
    return EXIT_OK


def cmd_base_show(client: Client, args: argparse.Namespace, out: Output) -> int:
    """`base show NAME`: one base and its versions."""
    _show_base(out, client.get_base(args.name))
    return EXIT_OK


def cmd_base_delete(client: Client, args: argparse.Namespace, out: Output) -> int:
    """`base delete NAME...`: delete bases (with --force their branches too)."""
    deleted: list[str] = []
    missing: list[str] = []
    for name in args.names:
        full = name if name.startswith("bases/") else f"bases/{name}"
        try:
            client.delete_base(name, force=args.force, allow_missing=args.allow_missing)
        except NotFound:
            missing.append(full)
        else:
            deleted.append(full)
    lines = [f"deleted {n}" for n in deleted] + [f"not found: {n}" for n in missing]
    out.emit({"deleted": deleted, "missing": missing}, "\n".join(lines))
    return EXIT_NOT_FOUND if missing else EXIT_OK


def cmd_base_version(client: Client, args: argparse.Namespace, out: Output) -> int:
    """`base version NAME [--data-directory PATH]`: the base's next version
    (an import with --from-server, --from-dump or --transform)."""
    if is_import(args):
        return cmd_import(client, args, out, args.name.removeprefix("bases/"))
    version = client.create_base_version(args.name, data_directory=args.data_directory or "")
    out.emit(version.to_dict(), f"created {version.name}")
    return EXIT_OK


# -- daemon -----------------------------------------------------------------------


def cmd_status(client: Client, args: argparse.Namespace, out: Output) -> int:
    """`status`: daemon health, branch counts by state, space used; exit 1 unless SERVING."""
    daemon = client.health("")
    service = client.health()
    serving = service == "SERVING"
    branches = list(client.list_branches()) if serving else []
    bases = client.list_bases() if serving else []
    daemon_status = client.status() if serving else {}
    by_state: dict[str, int] = {}
    for b in branches:
        by_state[b.state] = by_state.get(b.state, 0) + 1
    base_bytes = sum(b.size_bytes for b in bases)
    written_bytes = sum(b.written_bytes for b in branches)
    document = {
        "address": client.address,
        "health": {"daemon": daemon, "branch_service": service},
        "bases": len(bases),
        "branches": len(branches),
        "branches_by_state": dict(sorted(by_state.items())),
        "base_bytes": base_bytes,
        "written_bytes": written_bytes,
        "daemon": daemon_status,
    }
    states = ", ".join(f"{n} {s.lower()}" for s, n in sorted(by_state.items()))
    text = key_values(
        [
            ("address", client.address),
            ("health", daemon if daemon == service else f"{daemon} (branch service {service})"),
            ("bases", f"{len(bases)} ({format_bytes(base_bytes)})"),
            ("branches", f"{len(branches)}" + (f" ({states})" if states else "")),
            ("written", format_bytes(written_bytes)),
            *_daemon_rows(daemon_status),
        ]
    )
    out.emit(document, text)
    return EXIT_OK if daemon == service == "SERVING" else EXIT_FAILURE


def _daemon_rows(status: dict[str, Any]) -> list[tuple[str, str]]:
    if not status:
        return []
    used, total = status["pool_used_bytes"], status["pool_total_bytes"]
    percent = f" ({100 * used // total}%)" if total else ""
    return [
        ("daemon", f"cowbranchd {status['version']}, up since {status['start_time']}"),
        ("pool", f"{status['driver']} {status['pool']}"),
        ("isolation", status.get("isolation") or "unknown"),
        ("caller", status.get("caller") or "unknown"),
        ("pool used", f"{format_bytes(used)} of {format_bytes(total)}{percent}"),
        (
            "capacity",
            f"{status['branch_count']} of {status['max_branches']} branch slots, "
            f"ports {status['port_range'][0]}-{status['port_range'][1]}",
        ),
        *(("warning", warning) for warning in status.get("warnings", [])),
    ]


def cmd_version(client: Client | None, args: argparse.Namespace, out: Output) -> int:
    """`version`: the version of cowbranchctl (and the client library)."""
    out.emit({"client_version": __version__}, f"cowbranchctl {__version__}")
    return EXIT_OK


Handler = Callable[[Any, argparse.Namespace, Output], int]
COMMANDS: dict[str, Handler] = {
    "create": cmd_create,
    "list": cmd_list,
    "diff": cmd_diff,
    "show": cmd_show,
    "delete": cmd_delete,
    "reset": cmd_reset,
    "freeze": cmd_freeze,
    "update": cmd_update,
    "status": cmd_status,
    "version": cmd_version,
    "doctor": cmd_doctor,
    "checkout": cmd_checkout,
    "prune": cmd_prune,
    "logs": cmd_logs,
    "psql": cmd_psql,
    "base create": cmd_base_create,
    "base list": cmd_base_list,
    "base show": cmd_base_show,
    "base delete": cmd_base_delete,
    "base version": cmd_base_version,
    "base refresh": cmd_base_refresh,
    "operations list": cmd_operations,
    "operations show": cmd_operation_show,
    "operations cancel": cmd_operation_cancel,
}
# Commands that never talk to the daemon.
OFFLINE = frozenset({"doctor", "version"})
