"""cowbranchctl: the operator's command line for cowbranchd.

    cowbranchctl create bases/shop --ttl 2h -l pr=123
    cowbranchctl list -l pr=123 --output json
    cowbranchctl delete --selector pr=123

This module only parses arguments and maps errors to exit codes; every
command is a call of `cowbranchd.client.Client` (see `commands`).

Exit codes: 0 ok · 1 failure (daemon error, unreachable, not serving) ·
2 usage (bad arguments, also INVALID_ARGUMENT from the daemon) · 3 not found.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from typing import TextIO

from cowbranchd.client import Client, CowbranchError, InvalidArgument, NotFound, RetryPolicy

from .commands import (
    COMMANDS,
    EXIT_FAILURE,
    EXIT_NOT_FOUND,
    EXIT_OK,
    EXIT_USAGE,
    OFFLINE,
    Output,
)
from .dev import add_parsers as add_dev_commands
from .doctor import add_parser as add_doctor_options
from .imports import add_import_arguments

__all__ = ["EXIT_FAILURE", "EXIT_NOT_FOUND", "EXIT_OK", "EXIT_USAGE", "build_parser", "main"]

PROG = "cowbranchctl"


def _common(defaults: bool) -> argparse.ArgumentParser:
    """The options every command takes, before or after the command name.

    Only the top-level copy carries defaults; subcommand copies default to
    "absent" so they never overwrite what was given before the command.
    """
    parser = argparse.ArgumentParser(add_help=False)
    suppress = argparse.SUPPRESS

    def default(value: object) -> object:
        return value if defaults else suppress

    group = parser.add_argument_group("connection and output")
    group.add_argument(
        "--address",
        default=default(None),
        help="daemon address: unix:///path/api.sock or host:port "
        "(default: $COWBRANCHD_ADDRESS, else unix:///run/cowbranchd/api.sock)",
    )
    group.add_argument(
        "--token", default=default(None), help="bearer token (default: $COWBRANCHD_TOKEN)"
    )
    group.add_argument(
        "--tls-root-cert",
        default=default(None),
        metavar="PEM",
        help="root certificate file: use TLS for a TCP address "
        "(default: $COWBRANCHD_TLS_ROOT_CERT)",
    )
    group.add_argument(
        "-o",
        "--output",
        choices=("table", "json"),
        default=default("table"),
        help="table for people (default), json for scripts",
    )
    group.add_argument(
        "--timeout",
        type=float,
        default=default(120.0),
        metavar="SECONDS",
        help="overall deadline of each call (default 120)",
    )
    group.add_argument(
        "--wait",
        type=float,
        default=default(5.0),
        metavar="SECONDS",
        help="keep retrying this long while the daemon is unavailable (default 5)",
    )
    return parser


def _labels_arg(parser: argparse.ArgumentParser, what: str) -> None:
    parser.add_argument(
        "-l", "--label", action="append", metavar="KEY=VALUE", help=f"{what} (repeatable)"
    )


def _selector_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "-l",
        "--label",
        action="append",
        metavar="TERM",
        help="selector term key=value, key!=value or key (repeatable, all must match)",
    )
    parser.add_argument("--selector", metavar="SELECTOR", help="full selector, e.g. pr=123,team")


def build_parser() -> argparse.ArgumentParser:
    """The whole command line, subcommands included."""
    common = _common(defaults=False)
    parser = argparse.ArgumentParser(
        prog=PROG,
        description="Create and manage copy-on-write PostgreSQL branches served by cowbranchd.",
        epilog="exit codes: 0 ok, 1 failure, 2 usage, 3 not found",
        parents=[_common(defaults=True)],
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def add(
        name: str, help_text: str, where: argparse._SubParsersAction[argparse.ArgumentParser] = sub
    ) -> argparse.ArgumentParser:
        return where.add_parser(name, help=help_text, description=help_text, parents=[common])

    p = add("create", "create a branch and print it once it answers queries")
    p.add_argument("parent", help="bases/BASE, bases/BASE/versions/N or branches/ID")
    p.add_argument("--id", metavar="BRANCH_ID", help="branch id (default: generated)")
    p.add_argument("--ttl", metavar="DURATION", help="expire after e.g. 30m, 2h, 1d")
    p.add_argument(
        "--idle-suspend",
        metavar="DURATION",
        help="stop its postgres after this long without a connection (e.g. 15m; 0: never; "
        "default: the daemon's daemon.idle_suspend)",
    )
    _labels_arg(p, "label")
    p.add_argument(
        "-s",
        "--setting",
        action="append",
        metavar="NAME=VALUE",
        help="postgres setting for this branch (repeatable)",
    )
    p.add_argument("--protected", action="store_true", help="refuse deletion without --force")
    p.add_argument("--request-id", metavar="ID", help="idempotency key (default: random)")
    p.add_argument("--role", metavar="ROLE", help="database role to hand out (the base allows it)")
    p.add_argument(
        "--at",
        metavar="TIME",
        help="a followed base as it was at this ISO 8601 time (e.g. 2026-11-21T23:00:00Z)",
    )
    p.add_argument("--dsn-only", action="store_true", help="print only the DSN")

    p = add("list", "list branches, optionally by label selector")
    _selector_args(p)

    p = add("diff", "what a branch changed: schema diff and rows per table since it was made")
    p.add_argument("name", help="branch id or branches/ID")

    p = add("show", "show one branch")
    p.add_argument("name", help="branch id or branches/ID")
    p.add_argument("--dsn-only", action="store_true", help="print only the DSN")

    p = add("delete", "delete branches by name, or in bulk by selector")
    p.add_argument("names", nargs="*", metavar="NAME", help="branch ids or branches/ID")
    _selector_args(p)
    p.add_argument("--force", action="store_true", help="delete protected branches too")
    p.add_argument("--allow-missing", action="store_true", help="a missing branch is not an error")

    p = add("reset", "throw away a branch's writes (same port and credentials)")
    p.add_argument("name", help="branch id or branches/ID")
    p.add_argument(
        "--to-version",
        type=int,
        metavar="N",
        help="move the branch to version N of its base instead (a branch of a base only)",
    )

    p = add("freeze", "make a branch a template: its children clone its data as it is now")
    p.add_argument("name", help="branch id or branches/ID")

    p = add("update", "change a branch's labels, ttl, protection or idle suspend")
    p.add_argument("name", help="branch id or branches/ID")
    _labels_arg(p, "add or change a label")
    p.add_argument("--remove-label", action="append", metavar="KEY", help="remove a label")
    expiry = p.add_mutually_exclusive_group()
    expiry.add_argument("--ttl", metavar="DURATION", help="expire that long from now")
    expiry.add_argument("--no-expiry", action="store_true", help="never expire")
    p.add_argument(
        "--idle-suspend",
        metavar="DURATION",
        help="stop its postgres after this long without a connection (0: never)",
    )
    protect = p.add_mutually_exclusive_group()
    protect.add_argument("--protect", dest="protected", action="store_const", const=True)
    protect.add_argument("--unprotect", dest="protected", action="store_const", const=False)

    add("status", "daemon health, bases, branches and space used")
    add("version", "print the version of cowbranchctl")
    add_doctor_options(add("doctor", "check that this host can run cowbranchd (no daemon needed)"))
    add_dev_commands(add)

    base = add("base", "manage bases (the golden data directories)")
    base_sub = base.add_subparsers(dest="base_command", required=True, metavar="COMMAND")
    p = add("create", "create a base by initdb, or from a data directory", base_sub)
    p.add_argument("base_id", help="^[a-z][a-z0-9-]{0,62}$")
    p.add_argument("--data-directory", metavar="PATH", help="copy this cleanly shut down PGDATA")
    p.add_argument("--database", help="initdb: database to create besides postgres")
    p.add_argument("--pg-version", type=int, metavar="N", help="initdb: major version")
    sql = p.add_mutually_exclusive_group()
    sql.add_argument("--init-sql", metavar="SQL", help="initdb: SQL run before version 1")
    sql.add_argument("--init-sql-file", metavar="FILE", help="initdb: file of SQL to run")
    p.add_argument(
        "--branch-role", metavar="ROLE", help="role branches hand out (default: the superuser)"
    )
    p.add_argument(
        "--role",
        action="append",
        metavar="ROLE",
        help="another role a branch may ask for (repeatable)",
    )
    _labels_arg(p, "label")
    add_import_arguments(p)
    add("list", "list bases", base_sub)
    p = add("show", "show a base and its versions", base_sub)
    p.add_argument("name", help="base id or bases/ID")
    p = add("delete", "delete bases", base_sub)
    p.add_argument("names", nargs="+", metavar="NAME", help="base ids or bases/ID")
    p.add_argument("--force", action="store_true", help="also delete branches of the base")
    p.add_argument("--allow-missing", action="store_true", help="a missing base is not an error")
    p = add("version", "snapshot a base's current data as its next version", base_sub)
    p.add_argument("name", help="base id or bases/ID")
    p.add_argument(
        "--data-directory",
        metavar="PATH",
        help="first replace the base's data with a copy of this cleanly shut down PGDATA",
    )
    add_import_arguments(p)
    p = add(
        "refresh", "replay the recipe of a base's newest import into its next version", base_sub
    )
    p.add_argument("name", help="base id or bases/ID")
    p.add_argument("--no-wait", action="store_true", help="print the operation and return")

    ops = add("operations", "long-running operations (imports, refreshes)")
    ops_sub = ops.add_subparsers(dest="operations_command", required=True, metavar="COMMAND")
    add("list", "your operations, newest first", ops_sub)
    p = add("show", "show one operation", ops_sub)
    p.add_argument("name", help="operation id or operations/ID")
    p = add("cancel", "cancel an operation (nothing of it is left)", ops_sub)
    p.add_argument("name", help="operation id or operations/ID")
    return parser


def _error(message: str, stream: TextIO) -> None:
    print(f"{PROG}: error: {message}", file=stream)


def main(argv: Sequence[str] | None = None) -> int:
    """Run cowbranchctl with `argv` (default: sys.argv[1:]) and return its exit code."""
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # argparse: --help is 0, bad usage 2
        return int(exc.code or 0)
    sub = getattr(args, f"{args.command}_command", None)
    command = args.command + (f" {sub}" if sub else "")
    out = Output(args.output, sys.stdout)
    try:
        if command in OFFLINE:
            return COMMANDS[command](None, args, out)
        retry = RetryPolicy(max_elapsed=max(args.wait, 0.0))
        with Client(
            args.address,
            token=args.token,
            tls_root_cert=args.tls_root_cert,
            timeout=args.timeout,
            retry=retry,
        ) as client:
            return COMMANDS[command](client, args, out)
    except NotFound as exc:
        _error(exc.message, sys.stderr)
        return EXIT_NOT_FOUND
    except InvalidArgument as exc:
        _error(exc.message, sys.stderr)
        return EXIT_USAGE
    except CowbranchError as exc:
        _error(exc.message, sys.stderr)
        return EXIT_FAILURE
    except OSError as exc:  # e.g. an unreadable --init-sql-file
        _error(str(exc), sys.stderr)
        return EXIT_FAILURE
