"""The checks `cowbranchd doctor` runs, in order, each a function of the
`Host` returning one `Finding`. `ABOUT` says once, for every host, why each
check matters; a finding says what was found here and how to fix it.

They read what the daemon reads, the way it reads it: the storage drivers'
own `check()`, base metadata through `BaseRecord.from_meta`, binaries through
`postgres.find_binaries`, ports through the daemon's bind probe, idmapped
mounts through its probe. They change nothing (the idmap probe's scratch
directory is removed).
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import grp
import os
import pwd
import shutil
import stat
import time
from collections.abc import Callable
from pathlib import Path

import psutil

from cowbranchd import postgres
from cowbranchd.errors import CowbranchError, NotFound
from cowbranchd.model import BaseRecord
from cowbranchd.ports import port_free
from cowbranchd.run import run
from cowbranchd.storage.base import Kind

from .doctor import Finding, Host, Status, pool_kind

__all__ = ["ABOUT", "CHECKS"]

ABOUT = {
    "config": "the daemon refuses to start (status 2) on an unknown key or a bad value",
    "btrfs": "btrfs pools (and the loop-file pool) need btrfs in the kernel and its tools",
    "zfs": "ZFS pools need the zfs command and a ZFS behind it: the kernel module, or zfs-fuse; "
    "libzfs_core bindings make snapshots and clones in-process (faster)",
    "pool": "branches are copy-on-write clones in the pool; below storage.min_free_bytes "
    "CreateBranch is refused",
    "idmap": "with idmapped mounts each branch's postgres runs as its own OS user; without "
    "them every branch runs as postgres.os_user and a tenant's superuser can reach the others",
    "postgres": "every base needs the binaries of its PostgreSQL major version to start branches",
    "bases": "a branch's postgres writes its clone through an idmapped mount that maps only "
    "postgres.os_user and its group: a base file of any other user or group is one no branch "
    "can write, so the daemon refuses to branch that base",
    "ports": "each branch's postgres listens on a port of postgres.port_range; a port taken by "
    "another program is skipped, and a range full of them refuses creates",
    "socket": "the API socket's directory is 0750 root:<socket_group>; only root and that "
    "group's members may use the API",
    "state_dir": "the root daemon writes branch logs and mounts there; a directory others can "
    "write lets them plant links the daemon would follow",
    "clock": "branch TTLs and expire times are wall-clock times: a wrong or jumping clock "
    "expires branches early or keeps them too long (the daemon's own timeouts are monotonic)",
}

# The earliest plausible wall-clock time (2025-01-01T00:00:00Z): a host clock
# before it has not been set.
_CLOCK_FLOOR = 1735689600
_TIME_ERROR = 5  # adjtimex(2): the kernel clock is not synchronised


def _size(n: int) -> str:
    value = float(n)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if value < 1024 or unit == "TiB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    raise AssertionError("unreachable")


def check_config(host: Host) -> Finding:
    shown = host.config_path or "built-in defaults (no /etc/cowbranchd/config.toml)"
    return Finding("config", Status.OK, f"{shown} is valid")


def _in_proc_filesystems(name: str) -> bool:
    with open("/proc/filesystems", encoding="utf-8") as fh:
        return any(line.split()[-1:] == [name] for line in fh)


def check_btrfs(host: Host) -> Finding:
    from cowbranchd.storage.btrfs_subvol import btrfsutil  # noqa: PLC0415 (optional binding)

    loaded = _in_proc_filesystems("btrfs")
    module = Path(f"/lib/modules/{os.uname().release}/kernel/fs/btrfs").is_dir()
    kernel = "btrfs in the kernel" if loaded else "btrfs module (loads at mount)" if module else ""
    tools = "libbtrfsutil" if btrfsutil is not None else "btrfs command" if shutil.which(
        "btrfs"
    ) else ""
    found = ", ".join(part for part in (kernel, tools) if part) or "no btrfs"
    if pool_kind(host.config) != "btrfs":
        return Finding("btrfs", Status.OK, f"not used (storage driver zfs); {found}")
    if not kernel:
        return Finding(
            "btrfs",
            Status.FAIL,
            "btrfs is not in /proc/filesystems and no btrfs kernel module is installed",
            fix="use a kernel with btrfs (CONFIG_BTRFS_FS), or a ZFS pool (storage.driver = zfs)",
        )
    if not tools:
        return Finding(
            "btrfs",
            Status.FAIL,
            f"{kernel}, but neither libbtrfsutil's Python bindings nor the btrfs command",
            fix="apt-get install btrfs-progs (and python3-btrfsutil for the faster library path)",
        )
    missing = [t for t in ("losetup", "mkfs.btrfs", "mount") if shutil.which(t) is None]
    if not host.config.storage.root and missing:
        return Finding(
            "btrfs",
            Status.FAIL,
            f"the loop-file pool needs {', '.join(missing)}, not found",
            fix="apt-get install btrfs-progs util-linux mount",
        )
    return Finding("btrfs", Status.OK, found)


def _zfs_fuse_running() -> bool:
    return any(proc.info["name"] == "zfs-fuse" for proc in psutil.process_iter(["name"]))


def check_zfs(host: Host) -> Finding:
    from cowbranchd.storage.zfs_io import lzc  # noqa: PLC0415 (optional binding)

    kernel = os.path.exists("/dev/zfs") or os.path.isdir("/sys/module/zfs")
    fuse = _zfs_fuse_running()
    command = shutil.which("zfs") is not None
    library = lzc is not None
    parts = [
        "kernel module (/dev/zfs)" if kernel else "no ZFS kernel module",
        "zfs-fuse running" if fuse else "",
        "zfs command" if command else "no zfs command",
        "libzfs_core imports" if library else "libzfs_core does not import",
    ]
    found = ", ".join(p for p in parts if p)
    if pool_kind(host.config) != "zfs":
        return Finding("zfs", Status.OK, f"not used (storage driver btrfs); {found}")
    if not command:
        return Finding(
            "zfs",
            Status.FAIL,
            found,
            fix="apt-get install zfsutils-linux zfs-dkms (OpenZFS, contrib), or zfs-fuse",
        )
    if not kernel and not fuse:
        return Finding(
            "zfs",
            Status.FAIL,
            f"{found}: nothing serves ZFS",
            fix="modprobe zfs (OpenZFS), or start zfs-fuse (systemctl start zfs-fuse)",
        )
    if kernel and not library:
        return Finding(
            "zfs",
            Status.WARN,
            f"{found}: snapshots and clones go through the zfs command (slower)",
            fix="apt-get install python3-pyzfs and make it importable by the daemon's Python "
            "(a venv made with --system-site-packages sees it)",
        )
    if not kernel:
        return Finding(
            "zfs",
            Status.WARN,
            f"{found}: zfs-fuse serialises every mutating zfs command and cannot idmap",
            fix="use kernel OpenZFS (zfs-dkms) or btrfs on a shared runner",
        )
    return Finding("zfs", Status.OK, found)


def check_pool(host: Host) -> Finding:
    driver, why = host.pool()
    storage = host.config.storage
    if driver is None and not storage.root and why.startswith("the loop-file pool is not made"):
        state_dir = host.config.daemon.state_dir
        existing = next(p for p in (state_dir, *state_dir.parents) if p.exists())
        free = shutil.disk_usage(existing).free
        if free < storage.min_free_bytes:
            return Finding(
                "pool",
                Status.FAIL,
                f"{why}; only {_size(free)} free at {existing}",
                fix=f"free space under {existing}, or configure storage.root",
            )
        return Finding("pool", Status.OK, f"{why}; {_size(free)} free at {existing}")
    if driver is None:
        fix = (
            "point storage.root at a directory on a mounted btrfs filesystem (mkfs.btrfs, "
            "mount), or leave it empty for a loop-file pool under daemon.state_dir"
            if pool_kind(host.config) == "btrfs"
            else f"create the dataset (zfs create -p {storage.root}) or import its pool "
            "(zpool import)"
        )
        return Finding("pool", Status.FAIL, why, fix=fix)
    usage = driver.pool_usage()
    free = driver.free_bytes()
    summary = (
        f"{driver.kind} {driver.location}: {_size(free)} free of {_size(usage.total_bytes)} "
        f"(reserve {_size(storage.min_free_bytes)})"
    )
    if driver.kind == "zfs":
        zpool = driver.location.split("/")[0]
        health = run(["zpool", "list", "-H", "-o", "health", zpool], check=False, timeout=60)
        state = health.stdout.strip() or health.stderr.strip()
        if state != "ONLINE":
            return Finding(
                "pool",
                Status.WARN if state == "DEGRADED" else Status.FAIL,
                f"{summary}; zpool {zpool} is {state}",
                fix=f"zpool status -x {zpool} says which device and what to do",
            )
    if free < storage.min_free_bytes:
        return Finding(
            "pool",
            Status.FAIL,
            f"{summary}: below the reserve, CreateBranch is refused",
            fix="delete branches or bases, grow the pool, or lower storage.min_free_bytes",
        )
    return Finding("pool", Status.OK, summary)


def check_idmap(host: Host) -> Finding:
    # Imported here: the probe's ctypes set-up is only needed when it runs.
    from cowbranchd.daemon.isolation import pool_directory  # noqa: PLC0415
    from cowbranchd.storage import idmap  # noqa: PLC0415

    if host.config.postgres.branch_uids is None:
        return Finding(
            "idmap",
            Status.WARN,
            "postgres.branch_uids is empty: every branch runs as postgres.os_user",
            fix="remove postgres.branch_uids = \"\" from the config (default 300000-365535)",
        )
    driver, why = host.pool()
    if driver is None:
        return Finding("idmap", Status.SKIP, f"not probed: {why}")
    try:
        supported = idmap.supports_idmap(pool_directory(driver))
    except CowbranchError as exc:
        return Finding("idmap", Status.WARN, f"the probe failed: {exc.message}")
    if not supported:
        return Finding(
            "idmap",
            Status.WARN,
            f"the {driver.kind} pool cannot do idmapped mounts: branches share one OS user",
            fix="use btrfs (kernel 5.19 or later) or kernel OpenZFS 2.2 or later; zfs-fuse cannot",
        )
    uids = host.config.postgres.branch_uids
    return Finding("idmap", Status.OK, f"idmapped mounts work: one uid per branch ({uids[0]}-"
                   f"{uids[1]})")


def check_postgres(host: Host) -> Finding:
    pg = host.config.postgres
    try:
        pwd.getpwnam(pg.os_user)
    except KeyError:
        return Finding(
            "postgres",
            Status.FAIL,
            f"postgres.os_user {pg.os_user!r} does not exist",
            fix="apt-get install postgresql (makes the postgres user), or set postgres.os_user",
        )
    installed = postgres.installed_versions(pg.bin_dirs)
    driver, why = host.pool()
    needed: dict[int, list[str]] = {}
    unreadable: list[str] = []
    if driver is not None:
        for volume in driver.list():
            if volume.kind is not Kind.BASES:
                continue
            if volume.meta_error:
                unreadable.append(f"bases/{volume.name} ({volume.meta_error})")
                continue
            record = BaseRecord.from_meta(volume.name, volume.meta)
            needed.setdefault(record.pg_version, []).append(f"bases/{volume.name}")
    missing: list[str] = []
    for major, bases in sorted(needed.items()):
        try:
            postgres.find_binaries(major, pg.bin_dirs)
        except NotFound:
            missing.append(f"{', '.join(bases)} need{'s' if len(bases) == 1 else ''} "
                           f"PostgreSQL {major}")
    shown = ", ".join(map(str, installed)) or "none"
    if missing:
        return Finding(
            "postgres",
            Status.FAIL,
            f"{'; '.join(missing)}, not installed (installed: {shown}; searched "
            f"{', '.join(pg.bin_dirs)})",
            fix="install those majors (apt-get install postgresql-N, from apt.postgresql.org "
            "for majors Debian does not ship), or add their bin directory to postgres.bin_dirs",
        )
    if not installed:
        return Finding(
            "postgres",
            Status.FAIL,
            f"no PostgreSQL binaries under {', '.join(pg.bin_dirs)}",
            fix="apt-get install postgresql",
        )
    summary = f"installed: {shown}; " + (
        f"bases need {', '.join(map(str, sorted(needed)))}" if needed else
        f"no bases read: {why}" if driver is None else "no bases yet"
    )
    if unreadable:
        return Finding(
            "postgres",
            Status.WARN,
            f"{summary}; unreadable metadata: {', '.join(unreadable)}",
            fix="the daemon quarantines those bases; delete and import them again",
        )
    return Finding("postgres", Status.OK, summary)


def check_bases(host: Host) -> Finding:
    pg = host.config.postgres
    driver, why = host.pool()
    if driver is None:
        return Finding("bases", Status.SKIP, f"not read: {why}")
    try:
        user = pwd.getpwnam(pg.os_user)
    except KeyError:
        return Finding("bases", Status.SKIP, f"postgres.os_user {pg.os_user!r} does not exist")
    checked = 0
    foreign: list[str] = []
    for volume in driver.list():
        if volume.kind is not Kind.BASES:
            continue
        try:
            # The data the latest version was sealed from, as the daemon checks it.
            found = postgres.foreign_owned(
                volume.path / "pgdata", user.pw_uid, user.pw_gid, limit=1
            )
        except FileNotFoundError:
            continue  # half-built: the daemon removes it at its next start
        checked += 1
        if found:
            foreign.append(f"bases/{volume.name} ({found})")
    if foreign:
        return Finding(
            "bases",
            Status.WARN,
            f"files not owned by {pg.os_user} and its group: {'; '.join(foreign)}",
            fix="import those bases again (CreateBaseVersion with data_directory, ImportBase, "
            "or delete and create them); they were made by an older cowbranchd",
        )
    if not checked:
        return Finding("bases", Status.OK, "no bases yet")
    return Finding(
        "bases", Status.OK, f"{checked} base(s), every file {pg.os_user}'s and its group's"
    )


def _sockets(ports: set[int]) -> tuple[dict[int, int], set[int]]:
    """Of `ports`: port -> pid of its listener (as far as we may see), and the
    ports that are only the local end of connections (ephemeral ports)."""
    listeners: dict[int, int] = {}
    connected: set[int] = set()
    with contextlib.suppress(psutil.AccessDenied):
        for conn in psutil.net_connections("inet"):
            address = conn.laddr
            if not isinstance(address, tuple) or not address or address[1] not in ports:
                continue
            if conn.status == psutil.CONN_LISTEN:
                listeners[address[1]] = conn.pid if conn.pid is not None else -1
            else:
                connected.add(address[1])
    return listeners, connected - set(listeners)


def _ephemeral_overlap(first: int, last: int) -> str:
    """The kernel's ephemeral port range where it overlaps `first`-`last`, or ""."""
    try:
        with open("/proc/sys/net/ipv4/ip_local_port_range", encoding="ascii") as fh:
            low, high = (int(v) for v in fh.read().split())
    except (OSError, ValueError):
        return ""
    return f"{low}-{high}" if low <= last and first <= high else ""


def _branch_postmaster(pid: int, roots: tuple[str, ...]) -> bool:
    """Whether `pid` is a postgres whose data directory lies under one of `roots`."""
    try:
        proc = psutil.Process(pid)
        argv = proc.cmdline()
        if proc.name() != "postgres" or "-D" not in argv:
            return False
    except psutil.Error:
        return False
    pgdata = argv[argv.index("-D") + 1] if argv.index("-D") + 1 < len(argv) else ""
    return any(pgdata.startswith(root.rstrip("/") + "/") for root in roots)


def check_ports(host: Host) -> Finding:
    pg = host.config.postgres
    first, last = pg.port_range
    busy = {p for p in range(first, last + 1) if not port_free(pg.listen_addresses, p)}
    listeners, connected = _sockets(busy)
    driver, _ = host.pool()
    roots = (str(host.config.daemon.state_dir),) + (
        (str(driver.location),) if driver is not None and driver.kind == "btrfs" else ()
    )
    branches = {p for p in listeners if _branch_postmaster(listeners[p], roots)}
    transient = busy & connected
    foreign = sorted(busy - branches - transient)
    size = last - first + 1
    summary = f"{first}-{last}: {size - len(busy)} free" + (
        f", {len(branches)} held by branches" if branches else ""
    )
    if foreign:

        def who(port: int) -> str:
            pid = listeners.get(port)
            if pid is None:
                return f"port {port} (bound, not listening)"
            try:
                return f"port {port} ({psutil.Process(pid).name()}, pid {pid})"
            except psutil.Error:
                return f"port {port} (listening)"

        shown = ", ".join(who(p) for p in foreign[:10]) + (
            f" and {len(foreign) - 10} more" if len(foreign) > 10 else ""
        )
        return Finding(
            "ports",
            Status.FAIL,
            f"{summary}; in use by other programs: {shown}",
            fix="stop what listens there, or move postgres.port_range to a free range",
        )
    ephemeral = _ephemeral_overlap(first, last)
    if ephemeral:
        return Finding(
            "ports",
            Status.WARN,
            f"{summary}; the range overlaps the kernel's ephemeral ports {ephemeral} "
            f"(net.ipv4.ip_local_port_range): {len(transient)} taken by connections now",
            fix=f"sysctl -w net.ipv4.ip_local_reserved_ports={first}-{last} (and in "
            "/etc/sysctl.d), or move postgres.port_range out of the ephemeral range",
        )
    slots = host.config.daemon.max_branches + host.config.daemon.warm_branches
    if size < slots:
        return Finding(
            "ports",
            Status.WARN,
            f"{summary}; fewer ports than daemon.max_branches (+ warm_branches) = {slots}",
            fix="widen postgres.port_range or lower daemon.max_branches",
        )
    return Finding("ports", Status.OK, summary)


def _group_name(gid: int) -> str:
    try:
        return grp.getgrgid(gid).gr_name
    except KeyError:
        return str(gid)


def check_socket(host: Host) -> Finding:
    daemon = host.config.daemon
    group = daemon.socket_group
    problems: list[str] = []
    if group:
        try:
            grp.getgrnam(group)
        except KeyError:
            if not host.installing:
                return Finding(
                    "socket",
                    Status.FAIL,
                    f"daemon.socket_group {group!r} does not exist",
                    fix=f"groupadd --system {group} (cowbranchd install makes it), then add "
                    "the runner's user: usermod -aG {group} USER".replace("{group}", group),
                )
    directory = host.config.runtime_dir
    try:
        st = os.lstat(directory)
    except FileNotFoundError:
        return Finding(
            "socket", Status.OK, f"{directory} is made at start (0750 root:{group or 'root'})"
        )
    if stat.S_ISLNK(st.st_mode) or not stat.S_ISDIR(st.st_mode) or st.st_uid != 0:
        return Finding(
            "socket",
            Status.FAIL,
            f"{directory} is not a directory owned by root",
            fix=f"remove {directory} (systemd's RuntimeDirectory= and the daemon make it)",
        )
    mode = stat.S_IMODE(st.st_mode)
    if mode & 0o002:
        return Finding(
            "socket",
            Status.FAIL,
            f"{directory} is writable by everyone (mode {mode:04o})",
            fix=f"chmod 0750 {directory}",
        )
    if mode & 0o007 or (group and _group_name(st.st_gid) != group):
        problems.append(
            f"{directory} is {mode:04o} root:{_group_name(st.st_gid)}, the daemon sets "
            f"0750 root:{group or 'root'} at start"
        )
    sock = daemon.socket
    with contextlib.suppress(FileNotFoundError):
        if not stat.S_ISSOCK(os.lstat(sock).st_mode):
            return Finding(
                "socket", Status.FAIL, f"{sock} exists and is not a socket", fix=f"remove {sock}"
            )
    if problems:
        return Finding("socket", Status.WARN, "; ".join(problems), fix="restart the daemon")
    return Finding("socket", Status.OK, f"{directory} is {mode:04o} root:{_group_name(st.st_gid)}")


def check_state_dir(host: Host) -> Finding:
    state_dir = host.config.daemon.state_dir
    for path in (*reversed(state_dir.parents), state_dir):
        try:
            st = os.stat(path)  # the daemon goes through links too: their targets count
        except FileNotFoundError:
            return Finding("state_dir", Status.OK, f"{path} is made at start")
        mode = stat.S_IMODE(st.st_mode)
        sticky_parent = bool(mode & stat.S_ISVTX) and path != state_dir
        if st.st_uid != 0 or (mode & 0o022 and not sticky_parent):
            return Finding(
                "state_dir",
                Status.FAIL,
                f"{path} is {mode:04o} owned by uid {st.st_uid}: others may write in "
                f"daemon.state_dir's path ({state_dir})",
                fix=f"chown root {path} && chmod go-w {path}, or move daemon.state_dir",
            )
    free = shutil.disk_usage(state_dir).free
    return Finding("state_dir", Status.OK, f"{state_dir}: owned by root, {_size(free)} free")


def _kernel_clock_state() -> int | None:
    """adjtimex(2) with no change: TIME_ERROR (5) when the kernel clock is not
    synchronised; None when it cannot be asked."""
    libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)
    buf = ctypes.create_string_buffer(512)  # struct timex, modes = 0: read only
    state = int(libc.adjtimex(buf))
    return None if state < 0 else state


def _timedatectl_synced() -> bool | None:
    if not os.path.isdir("/run/systemd/system") or shutil.which("timedatectl") is None:
        return None
    out = run(["timedatectl", "show", "-p", "NTPSynchronized", "--value"], check=False, timeout=10)
    return {"yes": True, "no": False}.get(out.stdout.strip())


def check_clock(host: Host) -> Finding:
    now = time.time()
    shown = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(now))
    if now < _CLOCK_FLOOR:
        return Finding(
            "clock",
            Status.FAIL,
            f"the wall clock says {shown}, which is in the past",
            fix="set the clock (timedatectl set-ntp true, or chrony/ntpsec)",
        )
    synced = _timedatectl_synced()
    source = "timedatectl"
    if synced is None:
        state = _kernel_clock_state()
        synced = None if state is None else state != _TIME_ERROR
        source = "the kernel (adjtimex)"
    if synced is None:
        return Finding("clock", Status.WARN, f"{shown}; cannot tell whether it is synchronised")
    if not synced:
        return Finding(
            "clock",
            Status.WARN,
            f"{shown}; {source} says the clock is not NTP-synchronised",
            fix="run an NTP client on the host (systemd-timesyncd, chrony); "
            "in a container, on its host",
        )
    return Finding("clock", Status.OK, f"{shown}; NTP-synchronised ({source})")


CHECKS: list[tuple[str, Callable[[Host], Finding]]] = [
    ("config", check_config),
    ("btrfs", check_btrfs),
    ("zfs", check_zfs),
    ("pool", check_pool),
    ("idmap", check_idmap),
    ("postgres", check_postgres),
    ("bases", check_bases),
    ("ports", check_ports),
    ("socket", check_socket),
    ("state_dir", check_state_dir),
    ("clock", check_clock),
]
