"""The `cowbranchd` command: `cowbranchd install|uninstall|doctor ...` run the
host tools; anything else (`cowbranchd [--config FILE] [--stop-branches]
[--version]`) runs the daemon, exactly as `python -m cowbranchd.daemon` does.

Exit codes: 0 ok · 1 failure (doctor found a problem, a step failed) · 2 usage.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

import structlog

from cowbranchd.errors import InvalidArgument

__all__ = ["SUBCOMMANDS", "build_parser", "main"]

SUBCOMMANDS = ("doctor", "install", "uninstall")


def _path(what: str) -> Callable[[str], Path]:
    """An argparse type: a plain absolute path (files.check_path), named `what`."""
    from .files import check_path  # noqa: PLC0415

    def convert(text: str) -> Path:
        try:
            return check_path(what, text)
        except InvalidArgument as exc:
            raise argparse.ArgumentTypeError(exc.message) from exc

    return convert


def build_parser() -> argparse.ArgumentParser:
    """The host subcommands (the daemon's own options are daemon.server's)."""
    parser = argparse.ArgumentParser(
        prog="cowbranchd",
        description="Host tools of cowbranchd. Without a subcommand, cowbranchd runs the "
        "daemon: cowbranchd [--config FILE] [--stop-branches] [--version].",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    p = sub.add_parser("doctor", help="check that this host can run cowbranchd, and say why not")
    p.add_argument(
        "--config",
        type=_path("--config"),
        help="config file (default: /etc/cowbranchd/config.toml if it exists, else defaults)",
    )
    p.add_argument("--json", action="store_true", help="print JSON for scripts")

    layout = argparse.ArgumentParser(add_help=False)
    layout.add_argument(
        "--prefix",
        type=_path("--prefix"),
        default=Path("/opt/cowbranchd"),
        help="where the daemon's venv and install record go (default /opt/cowbranchd)",
    )
    layout.add_argument(
        "--config",
        type=_path("--config"),
        default=Path("/etc/cowbranchd/config.toml"),
        help="the config file (default /etc/cowbranchd/config.toml)",
    )
    layout.add_argument(
        "--root",
        type=_path("--root"),
        default=Path("/"),
        help="write under this directory instead of / (images, tests); starts nothing",
    )
    layout.add_argument("--dry-run", action="store_true", help="print every step, change nothing")

    p = sub.add_parser(
        "install",
        parents=[layout],
        help="install the daemon as a systemd service (as root)",
        description="Run doctor, put the daemon in its own venv, write the config (if absent) "
        "and the systemd unit, make the socket group, enable and start the service.",
    )
    p.add_argument(
        "--pool",
        default="loop",
        help="btrfs:/DIR (a directory on btrfs), zfs:POOL/DATASET, or loop[:SIZE] "
        "(a loop-file btrfs pool under the state directory; the default)",
    )
    p.add_argument(
        "--socket-group",
        default="cowbranchd",
        help="group whose members may use the API socket (default cowbranchd)",
    )
    p.add_argument("--port-range", default="", help="postgres.port_range, e.g. 55000-55999")
    p.add_argument(
        "--use-current-venv",
        action="store_true",
        help="run the daemon from the venv this command runs from instead of PREFIX/venv",
    )
    p.add_argument(
        "--from",
        dest="source",
        type=_path("--from"),
        help="the wheel or checkout to pip install into PREFIX/venv "
        "(default: where this cowbranchd was installed from)",
    )
    p.add_argument("--skip-doctor", action="store_true", help="install even if doctor fails")

    p = sub.add_parser(
        "uninstall",
        parents=[layout],
        help="stop and remove the service; keep config and data unless --purge",
    )
    p.add_argument(
        "--purge",
        action="store_true",
        help="also remove the config and the state directory (bases, branches, logs)",
    )
    return parser


def _host(argv: list[str]) -> int:
    from . import install as installer  # noqa: PLC0415
    from .doctor import config_path_of, print_report, run_checks  # noqa: PLC0415
    from .files import check_group, parse_pool  # noqa: PLC0415

    try:
        args = build_parser().parse_args(argv)
    except SystemExit as exc:
        return int(exc.code or 0)
    # The steps print what they do; of the library's logs only warnings and
    # errors matter here (on stderr, never mixed into --json).
    structlog.configure(
        wrapper_class=structlog.make_filtering_bound_logger(logging.WARNING),
        logger_factory=structlog.PrintLoggerFactory(sys.stderr),
    )
    if args.command == "doctor":
        path = config_path_of(args.config)
        return print_report(run_checks(path), path, sys.stdout, as_json=args.json)
    if os.geteuid() != 0 and not args.dry_run:
        print(f"cowbranchd {args.command}: must run as root (or with --dry-run)", file=sys.stderr)
        return 2
    if not args.root.is_dir():
        print(f"cowbranchd: --root {args.root} is not a directory", file=sys.stderr)
        return 2
    layout = installer.Layout(root=args.root, prefix=args.prefix, config=args.config)
    if args.command == "uninstall":
        return installer.run_safely(
            lambda: installer.uninstall(layout, sys.stdout, purge=args.purge, dry_run=args.dry_run),
            sys.stdout,
        )
    try:
        pool = parse_pool(args.pool)
        group = check_group(args.socket_group)
    except InvalidArgument as exc:
        print(f"cowbranchd install: {exc.message}", file=sys.stderr)
        return 2
    if args.source is not None and not args.source.exists():
        print(f"cowbranchd install: --from {args.source} does not exist", file=sys.stderr)
        return 2
    return installer.run_safely(
        lambda: installer.install(
            layout,
            sys.stdout,
            pool=pool,
            socket_group=group,
            port_range=args.port_range,
            use_current_venv=args.use_current_venv,
            source=str(args.source or ""),
            dry_run=args.dry_run,
            skip_doctor=args.skip_doctor,
        ),
        sys.stdout,
    )


def main(argv: Sequence[str] | None = None) -> int:
    """`cowbranchd`: a host subcommand, or the daemon."""
    args = list(sys.argv[1:] if argv is None else argv)
    if args and args[0] in SUBCOMMANDS:
        return _host(args)
    if args[:1] in (["-h"], ["--help"]):
        print(
            "cowbranchd runs the daemon (options below). Host tools, as root:\n"
            "  cowbranchd install [--pool btrfs:/DIR|zfs:POOL/DATASET|loop] [--dry-run] ...\n"
            "  cowbranchd uninstall [--purge] [--dry-run]\n"
            "  cowbranchd doctor [--config FILE] [--json]\n"
            "(cowbranchd COMMAND --help for each)\n"
        )
    from cowbranchd.daemon.server import main as daemon_main  # noqa: PLC0415 (only when serving)

    return daemon_main(args)
