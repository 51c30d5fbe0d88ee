"""`base create|version --from-server/--from-dump [--transform ...]`, `base
refresh` and `operations`: imports are long-running operations, followed
here with a progress line (phase, bytes, ETA) on stderr; Ctrl-C cancels the
operation and waits until the daemon has cleaned up.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, TextIO

from cowbranchd.client import Client
from cowbranchd.client.types import Operation
from cowbranchd.errors import InvalidArgument

from .render import format_bytes, key_values

if TYPE_CHECKING:
    from .commands import Output

__all__ = [
    "EXIT_CANCELLED",
    "add_import_arguments",
    "cmd_base_refresh",
    "cmd_import",
    "cmd_operation_cancel",
    "cmd_operation_show",
    "cmd_operations",
    "is_import",
]

EXIT_CANCELLED = 130
WAIT_S = 1.0
MAX_TRANSFORM_BYTES = 16 * 1024 * 1024


def add_import_arguments(parser: argparse.ArgumentParser) -> None:
    """The import flags `base create` and `base version` share."""
    source = parser.add_argument_group("import (a long-running operation)")
    source.add_argument("--from-server", metavar="DSN", help="pg_basebackup of a live server")
    source.add_argument(
        "--follow", metavar="DSN", help="a standby of a live server, for branches at a time"
    )
    source.add_argument(
        "--from-dump", metavar="PATH", help="pg_dump archive or SQL file on the daemon's host"
    )
    source.add_argument(
        "--transform",
        action="append",
        metavar="FILE",
        help="SQL file run before sealing, each in one transaction (repeatable, in order)",
    )
    source.add_argument(
        "--transform-cmd",
        metavar="ARG",
        nargs="+",
        help="command run after the SQL with the staging DSN in PG* variables (admins)",
    )
    source.add_argument("--jobs", type=int, default=0, metavar="N", help="pg_restore -j")
    source.add_argument(
        "--keep-raw",
        action="store_true",
        help="keep the unmasked import (admins only; never branchable)",
    )
    source.add_argument(
        "--no-wait", action="store_true", help="print the operation and return at once"
    )


def is_import(args: argparse.Namespace) -> bool:
    return bool(
        args.from_server
        or args.from_dump
        or getattr(args, "follow", None)
        or args.transform
        or args.transform_cmd
    )


def _transforms(paths: list[str] | None) -> list[tuple[str, str]]:
    """The transform files, read here with the caller's own rights."""
    loaded = []
    for path in paths or []:
        data = Path(path).read_bytes()
        if len(data) > MAX_TRANSFORM_BYTES:
            raise InvalidArgument("--transform", f"{path} is larger than 16 MiB")
        try:
            loaded.append((Path(path).name, data.decode()))
        except UnicodeDecodeError:
            raise InvalidArgument("--transform", f"{path} is not UTF-8 text") from None
    return loaded


def cmd_import(client: Client, args: argparse.Namespace, out: Output, base_id: str) -> int:
    """Start the import and follow it (unless --no-wait)."""
    op = client.import_base(
        base_id,
        from_server=args.from_server or "",
        follow=getattr(args, "follow", None) or "",
        from_dump=args.from_dump or "",
        data_directory=args.data_directory or "",
        transforms=_transforms(args.transform),
        transform_command=args.transform_cmd or (),
        jobs=args.jobs,
        keep_raw=args.keep_raw,
        database=getattr(args, "database", "") or "",
        branch_role=getattr(args, "branch_role", "") or "",
        roles=getattr(args, "role", None) or (),
    )
    return _follow(client, op, args, out)


def cmd_base_refresh(client: Client, args: argparse.Namespace, out: Output) -> int:
    """`base refresh NAME`: replay the newest import's recipe into the next version."""
    return _follow(client, client.refresh_base(args.name), args, out)


def cmd_operations(client: Client, args: argparse.Namespace, out: Output) -> int:
    """`operations`: the caller's operations, newest first."""
    ops = client.list_operations()
    text = "\n".join(_line(o) for o in ops) or "no operations"
    out.emit({"operations": [o.to_dict() for o in ops]}, text)
    return 0


def cmd_operation_show(client: Client, args: argparse.Namespace, out: Output) -> int:
    op = client.get_operation(args.name)
    _emit(out, op.to_dict(), key_values(_details(op)))
    return 0


def cmd_operation_cancel(client: Client, args: argparse.Namespace, out: Output) -> int:
    op = client.cancel_operation(args.name)
    _emit(out, op.to_dict(), f"cancel requested for {op.name}")
    return 0


def _follow(client: Client, op: Operation, args: argparse.Namespace, out: Output) -> int:
    """Wait for `op` with a progress line; Ctrl-C cancels it and waits for
    the daemon to clean up. Exit 0 done, 1 failed, 130 cancelled."""
    if getattr(args, "no_wait", False):
        _emit(out, op.to_dict(), f"started {op.name} on {op.target}")
        return 0
    progress = Progress(sys.stderr)
    try:
        while not op.done:
            progress.show(op)
            op = client.wait_operation(op.name, wait_s=WAIT_S)
    except KeyboardInterrupt:
        progress.end()
        print(f"cancelling {op.name} ...", file=sys.stderr, flush=True)
        op = client.cancel_operation(op.name)
        while not op.done:
            op = client.wait_operation(op.name, wait_s=10)
        _emit(out, op.to_dict(), f"{op.name}: {op.error_message or 'cancelled'}")
        return EXIT_CANCELLED
    progress.end()
    if op.failed:
        _emit(out, op.to_dict(), f"{op.name} failed: {op.error_message}")
        return EXIT_CANCELLED if op.error_code == 1 else 1
    _emit(out, op.to_dict(), f"created {op.result}")
    return 0


class Progress:
    """One rewritten line: phase, bytes done of total, percent and ETA (on a
    terminal; elsewhere a line per phase change)."""

    def __init__(self, stream: TextIO) -> None:
        self.stream = stream
        self.tty = stream.isatty()
        self.started = time.monotonic()
        self.phase = ""
        self.width = 0

    def show(self, op: Operation) -> None:
        text = self.text(op)
        if self.tty:
            self.stream.write("\r" + text.ljust(self.width))
            self.width = len(text)
        elif op.phase != self.phase:
            self.stream.write(text + "\n")
        self.phase = op.phase
        self.stream.flush()

    def text(self, op: Operation) -> str:
        if not op.bytes_total:
            done = f" {format_bytes(op.bytes_done)}" if op.bytes_done else ""
            return f"{op.phase}{done}"
        share = min(1.0, op.bytes_done / op.bytes_total)
        elapsed = time.monotonic() - self.started
        eta = ""
        if 0 < share < 1:
            left = int(elapsed / share * (1 - share))
            eta = f" ETA {left // 60}:{left % 60:02d}"
        bar = "#" * int(share * 20)
        return (
            f"{op.phase} [{bar:<20}] {format_bytes(op.bytes_done)} / "
            f"{format_bytes(op.bytes_total)} {share:.0%}{eta}"
        )

    def end(self) -> None:
        if self.tty and self.width:
            self.stream.write("\n")
            self.stream.flush()


def _details(op: Operation) -> list[tuple[str, str]]:
    pairs = [
        ("name", op.name),
        ("target", op.target),
        ("owner", op.owner),
        ("phase", op.phase),
        ("done", "yes" if op.done else "no"),
        ("bytes", f"{format_bytes(op.bytes_done)} / {format_bytes(op.bytes_total)}"),
    ]
    if op.result:
        pairs.append(("result", op.result))
    if op.error_message:
        pairs.append(("error", op.error_message))
    return pairs


def _line(op: Operation) -> str:
    state = "done" if op.done and not op.failed else ("failed" if op.failed else op.phase)
    return f"{op.name}  {op.target}  {state}  {op.result or op.error_message[:80]}"


def _emit(out: Output, document: dict[str, object], text: str) -> None:
    out.emit(document, text)
