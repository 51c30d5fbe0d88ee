"""`cowbranchd doctor` (also `cowbranchctl doctor`): says whether this host can
run cowbranchd with its configuration, and for each problem what to do.

It reads the config file and the host (kernel, pool, PostgreSQL binaries,
ports, directories, clock) and needs no running daemon. Each check gives a
status: `ok`, `warn` (works, but worse than it could: never fails the run),
`fail` (the daemon would not start, or would refuse work), or `skip` (it
could not be asked, e.g. the config is invalid). The checks themselves live
in `checks.py`; this module runs them and prints the report.

What it may not do: change the host. The one write is the daemon's own
idmapped-mount probe, which makes and removes a scratch directory in the pool.
"""

from __future__ import annotations

import enum
import json
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TextIO

from cowbranchd.config import Config, load_config
from cowbranchd.errors import CowbranchError, InvalidArgument
from cowbranchd.storage.base import StorageDriver

__all__ = [
    "DEFAULT_CONFIG",
    "Finding",
    "Host",
    "Status",
    "config_path_of",
    "print_report",
    "run_checks",
]

DEFAULT_CONFIG = Path("/etc/cowbranchd/config.toml")


class Status(enum.Enum):
    OK = "ok"
    WARN = "warn"
    FAIL = "fail"
    SKIP = "skip"


@dataclass(frozen=True)
class Finding:
    """What one check found: `summary` says what, `fix` what to do about it."""

    check: str
    status: Status
    summary: str
    about: str = ""  # why the check matters, the same for every host
    fix: str = ""

    def to_dict(self) -> dict[str, str]:
        return {
            "check": self.check,
            "status": self.status.value,
            "summary": self.summary,
            "about": self.about,
            "fix": self.fix,
        }


@dataclass
class Host:
    """What the checks look at: the config and, opened once, its pool.

    `installing`: `cowbranchd install` asks before it makes the socket group,
    so a missing group is what it is about to fix, not a failure.
    """

    config: Config
    config_path: Path | None
    installing: bool = False
    _pool: tuple[StorageDriver | None, str] | None = field(default=None, repr=False)

    def pool(self) -> tuple[StorageDriver | None, str]:
        """The pool's driver if it can be opened without changing anything,
        else None and why (the loop-file pool is made only by the daemon)."""
        if self._pool is None:
            self._pool = _open_pool(self.config)
        return self._pool


def _open_pool(config: Config) -> tuple[StorageDriver | None, str]:
    # Imported here: the storage drivers pull in their bindings, and doctor
    # must still report an invalid config when they cannot load.
    from cowbranchd.storage import BtrfsDriver, ZfsDriver  # noqa: PLC0415
    from cowbranchd.storage.loop import mounted_source  # noqa: PLC0415

    storage = config.storage
    kind = pool_kind(config)
    try:
        if storage.root:
            driver: StorageDriver = (
                BtrfsDriver(Path(storage.root)) if kind == "btrfs" else ZfsDriver(storage.root)
            )
        else:
            mountpoint = config.daemon.state_dir / "pool"
            if mounted_source(mountpoint) is None:
                image = config.daemon.state_dir / "pool.img"
                return None, f"the loop-file pool is not made yet ({image}, made at first start)"
            driver = BtrfsDriver(mountpoint)
        driver.check()
    except CowbranchError as exc:
        return None, exc.message
    return driver, ""


def pool_kind(config: Config) -> str:
    """`btrfs` or `zfs`: what the daemon would open (the loop-file pool is btrfs)."""
    storage = config.storage
    if not storage.root:
        return "btrfs"
    if storage.driver == "auto":
        return "btrfs" if storage.root.startswith("/") else "zfs"
    return storage.driver


def config_path_of(given: Path | None) -> Path | None:
    """The file the daemon would read: `given`, else the default when it exists."""
    if given is not None:
        return given
    return DEFAULT_CONFIG if DEFAULT_CONFIG.exists() else None


Check = Callable[[Host], Finding]


def run_checks(
    config_path: Path | None, *, config: Config | None = None, installing: bool = False
) -> list[Finding]:
    """Every check, in order. With `config` given, that config (as it is about
    to be written to `config_path`) is checked instead of reading the file."""
    from .checks import ABOUT, CHECKS  # noqa: PLC0415 (checks import this module)

    if config is None:
        try:
            config = load_config(config_path)
        except InvalidArgument as exc:
            shown = str(config_path or "built-in defaults")
            findings = [
                Finding(
                    "config",
                    Status.FAIL,
                    exc.message,
                    ABOUT["config"],
                    f"correct {shown} (docs/configuration.md lists every key)",
                )
            ]
            findings += [
                Finding(name, Status.SKIP, "not checked: the config is invalid", ABOUT[name])
                for name, _ in CHECKS[1:]
            ]
            return findings
    host = Host(config, config_path, installing=installing)
    findings = []
    for name, check in CHECKS:
        try:
            found = check(host)
        except PermissionError as exc:
            # Not root (a CI job checking its runner): what only root may
            # read is unknown, not broken; root runs decide.
            status = Status.FAIL if os.geteuid() == 0 else Status.WARN
            found = Finding(name, status, f"could not check as uid {os.geteuid()}: {exc}")
        except (CowbranchError, OSError) as exc:
            # A check that cannot look is a failure to look, said as such.
            text = exc.message if isinstance(exc, CowbranchError) else str(exc)
            found = Finding(name, Status.FAIL, f"could not check: {text}")
        findings.append(
            Finding(name, found.status, found.summary, ABOUT[name], found.fix)
        )
    return findings


def passed(findings: list[Finding]) -> bool:
    """True when nothing failed (warnings and skips do not fail a run)."""
    return all(f.status is not Status.FAIL for f in findings)


def print_report(
    findings: list[Finding], config_path: Path | None, stream: TextIO, *, as_json: bool
) -> int:
    """Print `findings` as a table with fixes, or as JSON; return the exit code."""
    ok = passed(findings)
    if as_json:
        document = {
            "ok": ok,
            "config": str(config_path) if config_path else None,
            "checks": [f.to_dict() for f in findings],
        }
        print(json.dumps(document, indent=2), file=stream)
        return 0 if ok else 1
    width = max(len(f.check) for f in findings)
    print(f"cowbranchd doctor: {config_path or 'built-in defaults (no config file)'}", file=stream)
    for f in findings:
        mark = f.status.value.upper() if f.status in (Status.FAIL, Status.WARN) else f.status.value
        print(f"  {mark:<4}  {f.check:<{width}}  {f.summary}", file=stream)
        if f.status in (Status.FAIL, Status.WARN):
            pad = " " * (width + 8)
            if f.about:
                print(f"{pad}why: {f.about}", file=stream)
            if f.fix:
                print(f"{pad}fix: {f.fix}", file=stream)
    failed = [f.check for f in findings if f.status is Status.FAIL]
    counts = {s: sum(f.status is s for f in findings) for s in Status}
    tally = ", ".join(f"{n} {s.value}" for s, n in counts.items() if n)
    print(f"{'FAILED: ' + ', '.join(failed) if failed else 'OK'} ({tally})", file=stream)
    return 0 if ok else 1
