"""The files `cowbranchd install` writes, rendered from the operator's choices:
the systemd unit and the commented starting config.

`systemd/cowbranchd.service` in the repository is `render_unit()` of the
default choices (a test keeps it so). Every value put in a file is checked
here first: paths are absolute, normalised and plain (no whitespace, quote,
`%`, `$` or control character that systemd or TOML would read differently),
so nothing the operator passes can add a line or a directive.
"""

from __future__ import annotations

import os.path
import re
from dataclasses import dataclass
from pathlib import Path

from cowbranchd.config import parse_size
from cowbranchd.errors import InvalidArgument

__all__ = [
    "MARKER",
    "UNIT_NAME",
    "Pool",
    "check_group",
    "check_path",
    "parse_pool",
    "render_config",
    "render_unit",
]

UNIT_NAME = "cowbranchd.service"
# The first line of every file install writes; uninstall removes only files
# that carry it, never one an operator wrote.
MARKER = "# Written by `cowbranchd install`"

_PLAIN_PATH = re.compile(r"/[A-Za-z0-9._+/-]*")
_DATASET = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.:-]*(/[A-Za-z0-9][A-Za-z0-9_.:-]*)*")
_GROUP = re.compile(r"[a-z_][a-z0-9_-]{0,31}")


def check_path(what: str, text: str) -> Path:
    """`text` as an absolute, normalised, plain path, or InvalidArgument naming `what`."""
    if not _PLAIN_PATH.fullmatch(text):
        raise InvalidArgument(
            what, f"{text!r} is not an absolute path of letters, digits and . _ + - /"
        )
    normal = "/" + os.path.normpath(text).lstrip("/")
    if text != normal:
        raise InvalidArgument(what, f"{text!r} is not normalised; write {normal!r}")
    return Path(text)


def check_group(text: str) -> str:
    """A group name groupadd accepts (and nothing else)."""
    if not _GROUP.fullmatch(text):
        raise InvalidArgument("--socket-group", f"{text!r} is not a group name like cowbranchd")
    return text


@dataclass(frozen=True)
class Pool:
    """The pool the operator names: `btrfs:/srv/cowbranchd`, `zfs:tank/cowbranchd`,
    or `loop[:SIZE]` (a loop-file btrfs pool under daemon.state_dir)."""

    driver: str  # btrfs | zfs | loop
    root: str = ""
    loop_size: str = ""

    def __str__(self) -> str:
        if self.driver == "loop":
            return f"loop:{self.loop_size}" if self.loop_size else "loop"
        return f"{self.driver}:{self.root}"


def parse_pool(text: str) -> Pool:
    kind, _, rest = text.partition(":")
    if kind == "btrfs":
        return Pool("btrfs", str(check_path("--pool", rest)))
    if kind == "zfs":
        if not _DATASET.fullmatch(rest) or len(rest) > 200:
            raise InvalidArgument("--pool", f"{rest!r} is not a ZFS dataset like tank/cowbranchd")
        return Pool("zfs", rest)
    if kind == "loop":
        if rest:
            parse_size("--pool", rest)  # raises naming --pool
            if not re.fullmatch(r"\d+[KMGT]?", rest):
                raise InvalidArgument("--pool", f"{rest!r} is not a size like 8G")
        return Pool("loop", loop_size=rest)
    raise InvalidArgument(
        "--pool", f"{text!r} is not btrfs:/path, zfs:pool/dataset, loop or loop:SIZE"
    )


_UNIT = """\
{marker} (src/cowbranchd/host/files.py);
# `cowbranchd uninstall` removes it. cowbranchd: copy-on-write PostgreSQL
# branches over gRPC. Check the host with: cowbranchd doctor
[Unit]
Description=cowbranchd - copy-on-write PostgreSQL branches over gRPC
After={after}
{requires}
[Service]
# READY=1 is sent only after start-up reconcile (adopting live branches,
# removing half-built ones) is done and the health service says SERVING.
Type=notify
NotifyAccess=main
ExecStart={exec_start} --config {config}
# SIGTERM drains in-flight calls; branches keep running and are adopted by
# the next start, so a restart never interrupts a test suite's databases.
KillMode=process
KillSignal=SIGTERM
TimeoutStopSec=60
TimeoutStartSec=300
Restart=on-failure
RestartSec=2
# Branch postmasters are children of the daemon; they must survive its
# restarts (KillMode=process above) and may hold many files.
LimitNOFILE=1048576
TasksMax=infinity
RuntimeDirectory=cowbranchd cowbranchd-pg
RuntimeDirectoryMode=0750
RuntimeDirectoryPreserve=yes
StateDirectory=cowbranchd
# No mount-namespace hardening (ProtectSystem, PrivateTmp, ProtectHome,
# ReadWritePaths...): a private mount namespace would hide the daemon's
# mounts and clones from the host, and from the postmasters it starts.

[Install]
WantedBy=multi-user.target
"""


def render_unit(
    exec_path: Path = Path("/opt/cowbranchd/venv/bin/cowbranchd"),
    config: Path = Path("/etc/cowbranchd/config.toml"),
    pool: Pool = Pool("loop"),
) -> str:
    """The systemd unit running `exec_path --config config` for `pool`."""
    check_path("ExecStart", str(exec_path))
    check_path("--config", str(config))
    after = ["local-fs.target", "network.target"]
    requires = ""
    if pool.driver == "zfs":
        # Kernel OpenZFS mounts its datasets by zfs.target; zfs-fuse is a service.
        after += ["zfs.target", "zfs-fuse.service"]
    elif pool.driver == "btrfs":
        requires = f"RequiresMountsFor={check_path('--pool', pool.root)}\n"
    return _UNIT.format(
        marker=MARKER,
        after=" ".join(after),
        requires=requires,
        exec_start=exec_path,
        config=config,
    )


def _storage_lines(pool: Pool) -> str:
    if pool.driver == "loop":
        size = f'loop_size = "{pool.loop_size}"' if pool.loop_size else '# loop_size = "8G"'
        return (
            "# No root: a btrfs pool on a sparse loop file, daemon.state_dir/pool.img,\n"
            "# good for trying cowbranchd out. For a runner, name a btrfs directory\n"
            '# (driver = "btrfs", root = "/srv/cowbranchd") or a ZFS dataset.\n'
            f"{size}\n"
        )
    return f'driver = "{pool.driver}"\nroot = "{pool.root}"\n'


def render_config(pool: Pool, socket_group: str, port_range: str = "") -> str:
    """A commented config.toml naming `pool`; every other key at its default."""
    check_group(socket_group)
    ports = f'port_range = "{port_range}"' if port_range else '# port_range = "54000-54999"'
    return f"""\
{MARKER}.
# Every key is optional: docs/configuration.md lists them all. The daemon
# refuses to start on an unknown key or a bad value, naming it; check this
# file and the host with: cowbranchd doctor

[daemon]
# Members of this group may use the API socket (/run/cowbranchd/api.sock):
#   usermod -aG {socket_group} <the CI runner's user>
socket_group = "{socket_group}"
# default_ttl = "4h"        # TTL of branches created without one
# max_branches = 500
# warm_branches = 0         # started clones kept ready per hot parent: faster creates

[storage]
{_storage_lines(pool)}# min_free_bytes = "256M"   # CreateBranch is refused below this free space
# max_branch_bytes = 0      # per-branch size limit, e.g. "2G" (docs/configuration.md)

[postgres]
{ports}
# bin_dirs = ["/usr/lib/postgresql/{{version}}/bin"]

[demo]
# A small base "demo" is made when the pool holds no base at all.
# enabled = true
"""
