"""The host side of cowbranchd: what an operator runs as root on a runner.

`cowbranchd install` / `uninstall` (install.py, with the files it writes in
files.py) and `cowbranchd doctor` (doctor.py, its checks in checks.py), all
behind the `cowbranchd` command (cli.py), which runs the daemon itself when
no subcommand is given. This package sits above the daemon: it may import
any layer; nothing imports it (`cowbranchctl doctor` runs it in a child
process, so the client side never loads daemon code).
"""

from __future__ import annotations

from .cli import main

__all__ = ["main"]
