"""`cowbranchd install` and `cowbranchd uninstall`: make this host run the
daemon as a systemd service, and take that back.

Install, in order: doctor (stops on a failure), the daemon's own venv under
the prefix (or the running one), the config if absent, the socket group, the
unit, a record of what it made (`<prefix>/install.json`), then enable and
start where systemd runs. Each step is printed before it runs; `--dry-run`
prints them all, file contents included, and does nothing. `--root DIR`
writes under DIR instead of `/` (tests, images): nothing is started there.

Uninstall stops and removes the service, the unit, the venv under the prefix,
the group if install made it, and the directories install made once empty.
Config and data (daemon.state_dir: the loop-file pool, logs, mounts) stay
unless `--purge`; a pool the operator named (storage.root) is always left.

Files are written as root with explicit modes, by a temporary file and a
rename, never through a link, and only into directories no one else can
write. This module may not touch a file it did not write (`files.MARKER`).
"""

from __future__ import annotations

import contextlib
import grp
import json
import os
import shutil
import stat
import sys
import tomllib
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TextIO

from cowbranchd.config import Config, config_from_mapping, load_config
from cowbranchd.errors import CowbranchError, FailedPrecondition, InvalidArgument
from cowbranchd.run import run

from .doctor import print_report, run_checks
from .files import MARKER, UNIT_NAME, Pool, render_config, render_unit

__all__ = ["Installer", "Layout", "install", "uninstall"]


@dataclass(frozen=True)
class Layout:
    """Where things go on the host; `root` prefixes every path written (not
    the paths written into files: those are where the host will see them)."""

    root: Path = Path("/")
    prefix: Path = Path("/opt/cowbranchd")
    config: Path = Path("/etc/cowbranchd/config.toml")
    unit_dir: Path = Path("/etc/systemd/system")

    def at(self, path: Path) -> Path:
        """`path` as written: under `root`."""
        return self.root / path.relative_to("/")

    @property
    def venv(self) -> Path:
        return self.prefix / "venv"

    @property
    def record(self) -> Path:
        return self.prefix / "install.json"

    @property
    def unit(self) -> Path:
        return self.unit_dir / UNIT_NAME


def systemd_running() -> bool:
    """sd_booted(): PID 1 is systemd."""
    return os.path.isdir("/run/systemd/system")


@dataclass
class Installer:
    """Prints each step, then runs it (unless `dry_run`)."""

    layout: Layout
    out: TextIO
    dry_run: bool = False
    made_dirs: list[str] = field(default_factory=list)
    _steps: int = 0

    def step(self, title: str, action: Callable[[], None] | None = None) -> None:
        self._steps += 1
        print(f"{self._steps}. {title}", file=self.out)
        if action is not None and not self.dry_run:
            action()

    def show(self, text: str) -> None:
        for line in text.rstrip("\n").split("\n"):
            print(f"   | {line}" if line else "   |", file=self.out)

    def command(self, argv: list[str]) -> None:
        print(f"   $ {' '.join(argv)}", file=self.out)
        if not self.dry_run:
            run(argv, timeout=900)

    # -- files ------------------------------------------------------------

    def make_parent(self, path: Path) -> Path:
        """Make `path`'s parent (0755, recorded as made), one component at a
        time from `root`, never through a link; check that no one but root can
        write it or any directory on the way to it."""
        parent = path.parent
        current = self.layout.root
        for part in parent.relative_to(self.layout.root).parts:
            current = current / part
            try:
                st = os.lstat(current)
            except FileNotFoundError:
                os.mkdir(current, 0o755)
                os.chmod(current, 0o755)
                self.made_dirs.append(str(Path("/") / current.relative_to(self.layout.root)))
                continue
            # A link inside the tree written to could send a root write anywhere.
            if stat.S_ISLNK(st.st_mode) or not stat.S_ISDIR(st.st_mode):
                raise FailedPrecondition(
                    f"{current} is a symbolic link or not a directory; refusing"
                )
        for directory in (parent, *parent.parents):
            st = os.stat(directory)
            writable = stat.S_IMODE(st.st_mode) & 0o022 and not st.st_mode & stat.S_ISVTX
            if st.st_uid != 0 or writable:
                raise FailedPrecondition(
                    f"{directory} can be written by others than root; refusing to write "
                    f"{path} as root"
                )
        return parent

    def write(self, path: Path, text: str, mode: int) -> None:
        """Write `text` to `path` (under root) as root:root `mode`, atomically."""
        target = self.layout.at(path)
        parent = self.make_parent(target)
        with contextlib.suppress(FileNotFoundError):
            if not stat.S_ISREG(os.lstat(target).st_mode):
                raise FailedPrecondition(f"{target} exists and is not a regular file; refusing")
        temp = parent / f".{target.name}.cowbranchd-tmp"
        with contextlib.suppress(FileNotFoundError):
            os.unlink(temp)
        fd = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, mode)
        try:
            os.fchown(fd, 0, 0)
            os.fchmod(fd, mode)
            os.write(fd, text.encode())
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(temp, target)

    def show_file(self, path: Path, text: str, mode: int) -> None:
        self.step(f"write {path} (root:root {mode:04o})", lambda: self.write(path, text, mode))
        self.show(text)


# -- install ------------------------------------------------------------------


def _venv_source() -> str:
    """What to pip install into a new venv: the checkout or wheel the running
    cowbranchd was installed from (pip's direct_url.json), if it is still there."""
    from importlib.metadata import distribution  # noqa: PLC0415

    raw = distribution("cowbranchd").read_text("direct_url.json")
    url = json.loads(raw).get("url", "") if raw else ""
    source = url.removeprefix("file://")
    if url.startswith("file://") and os.path.exists(source):
        return source
    raise InvalidArgument(
        "--from", "cannot tell where this cowbranchd came from: name a wheel or a checkout"
    )


def _group_exists(layout: Layout, name: str) -> bool:
    if layout.root == Path("/"):
        try:
            grp.getgrnam(name)
        except KeyError:
            return False
        return True
    group_file = layout.at(Path("/etc/group"))
    if not group_file.exists():
        return False
    return any(line.split(":")[0] == name for line in group_file.read_text().splitlines())


def _root_args(layout: Layout, tool: str) -> list[str]:
    """groupadd/groupdel and systemctl working on `layout.root` instead of `/`."""
    if layout.root == Path("/"):
        return []
    return ["--prefix", str(layout.root)] if tool == "group" else [f"--root={layout.root}"]


def install(
    layout: Layout,
    out: TextIO,
    *,
    pool: Pool,
    socket_group: str,
    port_range: str = "",
    use_current_venv: bool = False,
    source: str = "",
    dry_run: bool = False,
    skip_doctor: bool = False,
) -> int:
    """Install as the module docstring says; return the exit code."""
    if use_current_venv or Path(sys.prefix) == layout.venv:
        venv = Path(sys.prefix)
    elif layout.root != Path("/"):
        raise InvalidArgument(
            "--root", "a venv cannot be moved: with --root use --use-current-venv"
        )
    else:
        venv = layout.venv
    exec_path = venv / "bin" / "cowbranchd"
    config_text = render_config(pool, socket_group, port_range)
    # Every value checked as the daemon would check it.
    config = config_from_mapping(tomllib.loads(config_text))
    config_file = layout.at(layout.config)
    keep_config = config_file.exists()
    if keep_config:
        config = load_config(config_file)
    inst = Installer(layout, out, dry_run=dry_run)
    print(f"cowbranchd install{' (dry run: nothing is changed)' if dry_run else ''}", file=out)

    def doctor() -> None:
        findings = run_checks(layout.config, config=config, installing=True)
        if print_report(findings, layout.config, out, as_json=False) != 0:
            raise FailedPrecondition(
                "doctor found problems (above); fix them, or pass --skip-doctor to install anyway"
            )

    if skip_doctor:
        inst.step("doctor: skipped (--skip-doctor)")
    else:
        inst.step(f"doctor: check this host for the config {layout.config}", doctor)
    if venv == layout.venv and Path(sys.prefix) != venv:
        what = source or (_venv_source() if not dry_run else "(this cowbranchd's source)")
        inst.step(f"make the daemon's venv {venv}")
        inst.command([sys.executable, "-m", "venv", "--system-site-packages", str(venv)])
        inst.command([str(venv / "bin" / "pip"), "install", "--upgrade", what])
    else:
        inst.step(f"use the running venv {venv} (ExecStart={exec_path})")
    if keep_config:
        inst.step(f"keep {layout.config}: it exists (--pool is not applied to it)")
    else:
        inst.show_file(layout.config, config_text, 0o644)
    group = config.daemon.socket_group
    made_group = False
    if not group:
        inst.step("socket group: none configured (daemon.socket_group): root only")
    elif _group_exists(layout, group):
        inst.step(f"socket group {group}: exists")
    else:
        made_group = True
        inst.step(f"make the socket group {group}")
        inst.command(["groupadd", *_root_args(layout, "group"), "--system", group])
    unit_pool = pool if not keep_config else _pool_of(config)
    inst.show_file(layout.unit, render_unit(exec_path, layout.config, unit_pool), 0o644)

    def write_record() -> None:
        inst.make_parent(layout.at(layout.record))  # first, so its directories are recorded
        record = {
            "exec_start": str(exec_path),
            "venv": str(venv),
            "own_venv": venv == layout.venv,
            "config": str(layout.config),
            "made_group": group if made_group else "",
            "made_dirs": inst.made_dirs,
        }
        inst.write(layout.record, json.dumps(record, indent=2) + "\n", 0o644)

    inst.step(f"record what was made in {layout.record}", write_record)
    _enable(inst, layout, exec_path)
    print("done" if not dry_run else "dry run: nothing was changed", file=out)
    return 0


def _pool_of(config: Config) -> Pool:
    storage = config.storage
    if not storage.root:
        return Pool("loop")
    kind = storage.driver if storage.driver != "auto" else (
        "btrfs" if storage.root.startswith("/") else "zfs"
    )
    return Pool(kind, storage.root)


def _enable(inst: Installer, layout: Layout, exec_path: Path) -> None:
    if layout.root != Path("/") or not systemd_running():
        why = "under --root" if layout.root != Path("/") else "systemd is not PID 1 here"
        inst.step(f"enable {UNIT_NAME} ({why}: not started)")
        inst.command(["systemctl", *_root_args(layout, "systemctl"), "enable", UNIT_NAME])
        if layout.root == Path("/"):
            print(
                f"   start it by hand: {exec_path} --config {layout.config}", file=inst.out
            )
        return
    inst.step(f"enable and (re)start {UNIT_NAME}")
    inst.command(["systemctl", "daemon-reload"])
    inst.command(["systemctl", "enable", UNIT_NAME])
    # restart, not start: an upgrade takes effect; branches keep running (KillMode=process).
    inst.command(["systemctl", "restart", UNIT_NAME])


# -- uninstall ----------------------------------------------------------------


def _ours(path: Path) -> bool:
    try:
        with open(path, encoding="utf-8", errors="replace") as fh:
            return fh.readline().startswith(MARKER)
    except FileNotFoundError:
        return False


def _read_record(layout: Layout) -> dict[str, object]:
    try:
        data = json.loads(layout.at(layout.record).read_text())
    except FileNotFoundError:
        return {}
    except ValueError as exc:
        raise FailedPrecondition(f"{layout.at(layout.record)} is not JSON: {exc}") from exc
    return data if isinstance(data, dict) else {}


def _mounts_under(path: Path) -> list[str]:
    """Mountpoints at or under `path`, deepest first."""
    found = []
    prefix = str(path).rstrip("/") + "/"
    with open("/proc/self/mountinfo", encoding="utf-8") as fh:
        for line in fh:
            point = line.split()[4].replace("\\040", " ")
            if point == str(path) or point.startswith(prefix):
                found.append(point)
    return sorted(set(found), key=lambda p: -p.count("/"))


def _users_of(path: Path) -> list[str]:
    """Processes running from under `path` (their cwd), e.g. branch postmasters."""
    import psutil  # noqa: PLC0415

    prefix = str(path).rstrip("/") + "/"
    found = []
    for proc in psutil.process_iter(["pid", "name", "cwd"]):
        cwd = proc.info.get("cwd") or ""
        if cwd == str(path) or cwd.startswith(prefix):
            found.append(f"{proc.info['name']} (pid {proc.info['pid']})")
    return found


def uninstall(layout: Layout, out: TextIO, *, purge: bool = False, dry_run: bool = False) -> int:
    """Uninstall as the module docstring says; return the exit code."""
    inst = Installer(layout, out, dry_run=dry_run)
    record = _read_record(layout)
    config_file = layout.at(layout.config)
    try:
        config = load_config(config_file) if config_file.exists() else Config()
    except InvalidArgument:
        config = Config()  # an edited, broken config must not block removal
    state_dir = layout.at(config.daemon.state_dir)
    if purge and not dry_run:
        users = _users_of(state_dir)
        if users:
            raise FailedPrecondition(
                f"processes still run from {state_dir}: {', '.join(users[:10])}; delete the "
                "branches first (cowbranchctl list, cowbranchctl delete ...), then purge"
            )
    print(f"cowbranchd uninstall{' (dry run: nothing is changed)' if dry_run else ''}", file=out)
    unit = layout.at(layout.unit)
    if _ours(unit):
        if layout.root == Path("/") and systemd_running():
            inst.step(f"stop and disable {UNIT_NAME} (branches keep running)")
            inst.command(["systemctl", "disable", "--now", UNIT_NAME])
        else:
            inst.step(f"disable {UNIT_NAME}")
            inst.command(["systemctl", *_root_args(layout, "systemctl"), "disable", UNIT_NAME])
        inst.step(f"remove {layout.unit}", unit.unlink)
        if layout.root == Path("/") and systemd_running():
            inst.command(["systemctl", "daemon-reload"])
    elif unit.exists():
        inst.step(f"keep {layout.unit}: not written by cowbranchd install")
    group = record.get("made_group")
    if isinstance(group, str) and group and _group_exists(layout, group):
        inst.step(f"remove the socket group {group} (made by install)")
        inst.command(["groupdel", *_root_args(layout, "group"), group])
    if purge:
        _purge(inst, layout, config, config_file, state_dir)
    else:
        kept = [str(p) for p in (layout.config, config.daemon.state_dir) if layout.at(p).exists()]
        if kept:
            inst.step(f"keep {', '.join(kept)} (config and data; --purge removes them)")
    if config.storage.root:
        inst.step(f"keep the pool {config.storage.root}: it is the operator's, never removed")
    venv = layout.at(layout.venv)
    if record.get("own_venv") and (venv / "pyvenv.cfg").exists():
        # Last of the removals: uninstall may be running from this venv.
        inst.step(f"remove the venv {layout.venv}", lambda: shutil.rmtree(venv))
    record_file = layout.at(layout.record)
    if record_file.exists():
        inst.step(f"remove {layout.record}", record_file.unlink)
    made = [str(d) for d in record.get("made_dirs") or [] if isinstance(d, str)]  # type: ignore[attr-defined]
    if not dry_run:
        _remove_wants(layout, made)
    for directory in sorted(made, key=lambda d: -d.count("/")):
        path = layout.at(Path(directory))
        if path.is_dir() and not any(path.iterdir()):
            inst.step(f"remove the empty directory {directory} (made by install)", path.rmdir)
    print("done" if not dry_run else "dry run: nothing was changed", file=out)
    return 0


def _remove_wants(layout: Layout, made: list[str]) -> None:
    """`systemctl enable` makes multi-user.target.wants/ where it is missing;
    an empty one inside a unit directory install made goes with it."""
    wants = layout.at(layout.unit_dir) / "multi-user.target.wants"
    if str(layout.unit_dir) in made and wants.is_dir() and not any(wants.iterdir()):
        wants.rmdir()


@contextlib.contextmanager
def _step_errors() -> Iterator[None]:
    try:
        yield
    except OSError as exc:
        raise FailedPrecondition(str(exc)) from exc


def _purge(
    inst: Installer, layout: Layout, config: Config, config_file: Path, state_dir: Path
) -> None:
    if config_file.exists():
        inst.step(f"remove {layout.config} (--purge)", config_file.unlink)
        parent = config_file.parent
        if not inst.dry_run and parent.is_dir() and not any(parent.iterdir()):
            parent.rmdir()
    if not state_dir.exists():
        return
    for mountpoint in _mounts_under(state_dir):
        inst.step(f"unmount {mountpoint} (--purge)")
        inst.command(["umount", mountpoint])
    image = state_dir / "pool.img"
    if image.exists():
        inst.step(f"detach the loop devices of {image} (--purge)")
        if not inst.dry_run:
            out = run(["losetup", "-j", str(image), "-O", "NAME", "-n"]).stdout
            for device in out.split():
                inst.command(["losetup", "-d", device])

    def remove() -> None:
        if _mounts_under(state_dir):
            raise FailedPrecondition(f"{state_dir} still has mounts; not removing it")
        with _step_errors():
            shutil.rmtree(state_dir)

    inst.step(f"remove {config.daemon.state_dir}: bases, branches, logs (--purge)", remove)


def run_safely(action: Callable[[], int], out: TextIO) -> int:
    """Run install/uninstall; a CowbranchError is one line on stderr, exit 1."""
    try:
        return action()
    except CowbranchError as exc:
        print(f"cowbranchd: {exc.message}", file=sys.stderr)
        return 1
    except OSError as exc:
        print(f"cowbranchd: {exc}", file=sys.stderr)
        return 1
