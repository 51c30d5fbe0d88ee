"""`cowbranchctl doctor`: the host checks of `cowbranchd doctor`, from the
command operators already have at hand.

The checks read the daemon's config, storage and binaries, which the client
side never imports (tests/test_import_boundaries.py), so they run in a child
interpreter (`python -m cowbranchd.host doctor`) whose output and exit code
are passed through: 0 all OK, 1 a check failed.
"""

from __future__ import annotations

import argparse
import subprocess
import sys

__all__ = ["add_parser", "cmd_doctor"]


def add_parser(parser: argparse.ArgumentParser) -> None:
    """The doctor subcommand's own options."""
    parser.add_argument(
        "--config",
        metavar="FILE",
        help="the daemon's config file (default: /etc/cowbranchd/config.toml if it exists)",
    )
    parser.add_argument("--json", action="store_true", help="the same as --output json")


def cmd_doctor(client: object, args: argparse.Namespace, out: object) -> int:
    """`doctor`: check this host; needs no running daemon."""
    argv = [sys.executable, "-m", "cowbranchd.host", "doctor"]
    if args.config:
        argv.append(f"--config={args.config}")  # one argument, even if it starts with -
    if args.json or args.output == "json":
        argv.append("--json")
    sys.stdout.flush()
    return subprocess.run(argv, check=False).returncode
