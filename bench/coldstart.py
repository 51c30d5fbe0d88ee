"""Benchmark: where the time of a cold create goes, step by step, on a real
btrfs loop pool (no daemon, no gRPC: the library calls the daemon's cold
create makes, each timed on its own).

    .venv/bin/python bench/coldstart.py --runs 25                   # from a base version
    .venv/bin/python bench/coldstart.py --runs 25 --from-branch     # crash-consistent clone
    .venv/bin/python bench/coldstart.py --runs 25 --setting huge_pages=off
    .venv/bin/python bench/coldstart.py --rounds 8 --runs 5 \
        --variant before=src=/tmp/old/src --variant after=         # A/B, in turns
    .venv/bin/python bench/coldstart.py --remove                    # pool image gone too

Run as root. The pool is a loop image under --data-dir (default
/var/tmp/cowbranchd-cold), mounted at `<data-dir>/mnt`; its base is a copy
of --source (a cleanly shut down data directory, by default the main
benchmark's pgbench scale-70 source, 1.14 GB) made the way an import makes
one (`finish_import`: cowbranchd's postgresql.conf and pg_hba.conf) and
snapshotted as version 1. Both are reused by later runs; at the end the pool
is unmounted and its loop device detached (`--keep`: left mounted;
`--remove`: the image deleted as well).

One run mirrors daemon/branches.py `_build` for a cold create and
daemon/lifecycle.py `materialise` / `start_postmaster`: port, clone (the
snapshot ioctl, the sidecar, and for a source whose sidecar names no volume
the rename into place), prepare_clone, pg_hba, the idmapped mount of pgdata
for the branch's own uid, postgres started as that uid (spawn, pid file
`ready`, the socket connection and `SELECT 1`, the password's `ALTER ROLE`),
the durable state=ready metadata, and a client's TCP + SCRAM connection
answering `SELECT 1`. Then the branch is dismantled (immediate stop,
unmount, destroy) and, after --gap seconds (a test's own work), the next run
starts. With --from-branch each run first writes a row to a running parent
branch, CHECKPOINTs it and snapshots it (as a branch of a branch does), then
clones that snapshot: the clone starts with crash recovery.

What-ifs for the daemon's own code (daemon/ is not imported here):
--async-password commits the ALTER ROLE without waiting for its WAL flush;
--ready-record makes state=ready durable as a record on the host filesystem
(as a warm hand-over does) and writes the volume's sidecar without fsync.
--neighbour-tps N keeps another branch committing N transactions a second
(one-row inserts, or --neighbour-tpcb) and reports its commit latency;
--watch-pidfile times how late the daemon sees postmaster.pid say `ready`
against an inotify watcher process; --commit-after-delete starts (or waits
for) a btrfs commit after each delete, outside the timed create.

Figures only: nothing here asserts on time. Each step is a median on its
own, so the steps do not add up exactly to the total.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import fcntl
import json
import os
import secrets
import shlex
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import psycopg
import structlog
from structlog.testing import LogCapture

from cowbranchd import postgres
from cowbranchd.errors import CowbranchError
from cowbranchd.ports import PortAllocator
from cowbranchd.postgres.sources import finish_import
from cowbranchd.storage import btrfs as btrfs_module
from cowbranchd.storage import btrfs_io, idmap
from cowbranchd.storage.base import Kind, SnapshotRef
from cowbranchd.storage.btrfs import BtrfsDriver
from cowbranchd.storage.loop import make_btrfs_loop_pool

REPO = Path(__file__).resolve().parent.parent
BIN_DIRS = ["/usr/lib/postgresql/{version}/bin"]
OS_USER = "postgres"
SUPERUSER = "postgres"
DATABASE = "postgres"
BASE = "cold"
HOST = "127.0.0.1"
PORTS = (47700, 47799)
FIRST_UID = 399900  # far from the daemon's default branch_uids (300000-365535)
IMAGE_BYTES = 16 * 1024**3  # sparse
QUIET = "-c log_statement=none -c log_min_duration_statement=-1"


class Steps:
    """Milliseconds per named step of one run."""

    def __init__(self) -> None:
        self.ms: dict[str, float] = {}

    @contextmanager
    def step(self, name: str) -> Iterator[None]:
        started = time.perf_counter()
        try:
            yield
        finally:
            self.add(name, (time.perf_counter() - started) * 1000)

    def add(self, name: str, ms: float) -> None:
        self.ms[name] = self.ms.get(name, 0.0) + ms

    def wrap(self, name: str, fn: Callable[..., Any]) -> Callable[..., Any]:
        def timed(*args: Any, **kwargs: Any) -> Any:
            with self.step(name):
                return fn(*args, **kwargs)

        return timed


_WATCHER = """
import ctypes, os, select, sys, time
libc = ctypes.CDLL(None, use_errno=True)
fd = libc.inotify_init1(os.O_CLOEXEC)
# IN_MODIFY: at the write, before postgres's fsync of it (what a poll sees)
if fd < 0 or libc.inotify_add_watch(fd, os.fsencode(sys.argv[1]), 0x2) < 0:
    sys.exit("inotify: " + os.strerror(ctypes.get_errno()))
print("armed", flush=True)
while select.select([fd, sys.stdin], [], [])[0] != [sys.stdin]:
    now = time.perf_counter()
    os.read(fd, 65536)
    try:
        lines = open(os.path.join(sys.argv[1], "postmaster.pid")).read().split("\\n")
    except OSError:
        continue
    if len(lines) > 7 and lines[7].strip() == "ready":
        print(now, flush=True)
        break
"""


class PidFileWatch:
    """When postmaster.pid in `directory` first said `ready`, seen through
    inotify by a process of its own (a thread would wait for the daemon's
    GIL): CLOCK_MONOTONIC, the clock of time.perf_counter here too."""

    def __init__(self, directory: Path) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, "-c", _WATCHER, str(directory)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        assert self.proc.stdout is not None
        if self.proc.stdout.readline().strip() != "armed":
            raise RuntimeError("pid file watcher did not start")

    def close(self) -> float:
        """The moment, or 0.0 if it was not seen."""
        assert self.proc.stdin is not None and self.proc.stdout is not None
        self.proc.stdin.close()
        line = self.proc.stdout.readline().strip()
        self.proc.wait()
        return float(line) if line else 0.0


class Bench:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.data_dir: Path = args.data_dir
        self.state = self.data_dir / "state"
        self.mount_root = self.state / "mnt"
        self.log_dir = self.state / "logs"
        self.socket_root = self.state / "sock"
        self.binaries = postgres.find_binaries(15, BIN_DIRS)
        self.ports = PortAllocator(*PORTS, HOST)
        self.settings = dict(args.setting)
        self.capture = LogCapture()
        structlog.configure(processors=[self.capture])
        self.loop = make_btrfs_loop_pool(
            self.data_dir / "btrfs.img", self.data_dir / "mnt", IMAGE_BYTES
        )
        root = self.loop.mountpoint / "pool"
        root.mkdir(mode=0o755, exist_ok=True)
        for directory in (self.data_dir, self.loop.mountpoint, root):
            os.chmod(directory, 0o755)
        self.driver = BtrfsDriver(root)
        self.driver.check()
        self.driver.ensure_layout()
        for directory in (self.state, self.mount_root, self.socket_root):
            directory.mkdir(mode=0o711, parents=True, exist_ok=True)
        self.log_dir.mkdir(mode=0o700, parents=True, exist_ok=True)

    # -- the base ------------------------------------------------------------

    def ensure_base(self) -> SnapshotRef:
        ref = SnapshotRef(Kind.BASES, BASE, "v1")
        if any(
            v.kind == Kind.BASES and v.name == BASE and "v1" in v.snapshots
            for v in self.driver.list()
        ):
            return ref
        source: Path = self.args.source
        print(f"making base {BASE} from {source} ...", flush=True)
        with contextlib.suppress(CowbranchError):  # a base half made by an interrupted run
            self.driver.destroy(Kind.BASES, BASE)
        volume = self.driver.create_volume(Kind.BASES, BASE, {"state": "ready"})
        pgdata = volume / "pgdata"
        subprocess.run(["cp", "-a", "--reflink=never", f"{source}", str(pgdata)], check=True)
        finish_import(str(pgdata), self.binaries, os_user=OS_USER)
        subprocess.run(["sync", "-f", str(pgdata)], check=True)
        self.driver.snapshot(Kind.BASES, BASE, "v1")
        return ref

    # -- one branch ----------------------------------------------------------

    def make(
        self, name: str, source: SnapshotRef, uid: int, steps: Steps, *, settings: Mapping[str, str]
    ) -> tuple[postgres.Postmaster, int, str]:
        """A cold create of `name` from `source`; returns its postmaster, port
        and password."""
        driver = self.driver
        with steps.step("port"):
            port = self.ports.allocate()
        # The clone, split: the snapshot ioctl, the sidecar, the rename.
        snapshot = BtrfsDriver._snapshot.__get__(driver)
        driver._snapshot = steps.wrap("clone.snapshot_ioctl", snapshot)  # type: ignore[method-assign]
        driver._write_sidecar = steps.wrap("clone.sidecar", btrfs_io.write_sidecar)
        rename = btrfs_io.rename_noreplace
        setattr(btrfs_module, "rename_noreplace", steps.wrap("clone.rename", rename))  # noqa: B010
        try:
            with steps.step("clone"):
                path = driver.clone(
                    source, Kind.BRANCHES, name, {"state": "creating", "port": str(port)}
                )
                (path / "pgdata" / "PG_VERSION").exists()  # lifecycle._wait_for_pgdata
        finally:
            setattr(btrfs_module, "rename_noreplace", rename)  # noqa: B010
            del driver._snapshot, driver._write_sidecar
        pgdata = path / "pgdata"
        with steps.step("prepare_clone"):
            postgres.prepare_clone(pgdata)
        with steps.step("pg_hba"):
            postgres.write_hba(pgdata, OS_USER, postgres.client_networks(HOST))
        with steps.step("binaries"):
            binaries = postgres.find_binaries(postgres.pg_version(pgdata), BIN_DIRS)
        run_dir = pgdata
        if uid:
            run_dir = self.mount_root / name
            with steps.step("idmapped_mount"):
                disk = os.stat(pgdata)
                idmap.idmapped_mount(
                    pgdata, run_dir, disk_uid=disk.st_uid, disk_gid=disk.st_gid, uid=uid, gid=uid
                )
        password = secrets.token_urlsafe(18)
        verifier = postgres.scram_verifier(password)
        socket_dir = self.socket_root / name
        ready_dsn = postgres.dsn(str(socket_dir), port, SUPERUSER, "", DATABASE)
        marks: dict[str, float] = {}

        def on_ready(conn: psycopg.Connection[Any]) -> None:
            marks["on_ready"] = time.perf_counter()
            conn.execute("SET log_statement = 'none'")
            conn.execute("SET log_min_duration_statement = -1")
            if self.args.async_password:
                conn.execute("SET synchronous_commit = off")
            t = time.perf_counter()
            conn.execute(f"ALTER ROLE {SUPERUSER} PASSWORD '{verifier}'")
            marks["alter_role"] = time.perf_counter() - t

        watch = PidFileWatch(run_dir) if self.args.watch_pidfile else None
        started = time.perf_counter()
        pm = postgres.start(
            str(run_dir),
            binaries=binaries,
            os_user=(uid, uid) if uid else OS_USER,
            port=port,
            socket_dir=str(socket_dir),
            listen_addresses=HOST,
            settings=settings,
            log_path=str(self.log_dir / f"{name}.log"),
            ready_dsn=ready_dsn,
            on_ready=on_ready,
        )
        done = time.perf_counter()
        event = next(e for e in reversed(self.capture.entries) if e["event"] == "postgres started")
        if watch is not None and (written := watch.close()):
            # From the pid file's `ready` (seen by inotify) to the daemon's.
            detected = started + event["pidfile_ready_ms"] / 1000
            steps.add("start.pidfile_ready_detection", (detected - written) * 1000)
        self.capture.entries.clear()
        steps.add("start.total", (done - started) * 1000)
        steps.add("start.spawn", event["spawn_ms"])
        steps.add("start.boot_to_pidfile_ready", event["pidfile_ready_ms"] - event["spawn_ms"])
        steps.add(
            "start.connect_select1",
            (marks["on_ready"] - started) * 1000 - event["pidfile_ready_ms"],
        )
        steps.add("start.password", (done - marks["on_ready"]) * 1000)
        steps.add("start.password.alter_role", marks["alter_role"] * 1000)
        with steps.step("state_ready_meta"):
            if self.args.ready_record:
                self.record(name, {"state": "ready"})
                driver.set_meta(Kind.BRANCHES, name, {"state": "ready"}, durable=False)
            else:
                driver.set_meta(Kind.BRANCHES, name, {"state": "ready"})
        return pm, port, password

    def record(self, name: str, meta: Mapping[str, str]) -> None:
        """What daemon/lifecycle.record_hand_over does for a warm hand-over:
        the metadata made durable on the host filesystem instead of the pool."""
        folder = self.state / "records"
        folder.mkdir(mode=0o700, exist_ok=True)
        tmp = folder / f".{name}.tmp"
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW, 0o600)
        try:
            os.write(fd, json.dumps({"volume": name, "meta": dict(meta)}).encode())
            os.fsync(fd)
        finally:
            os.close(fd)
        os.rename(tmp, folder / f"{name}.json")
        dirfd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY)
        try:
            os.fsync(dirfd)
        finally:
            os.close(dirfd)

    def dismantle(self, name: str, pm: postgres.Postmaster | None, port: int) -> None:
        if pm is not None:
            postgres.stop(pm, fast_timeout=0)
        target = self.mount_root / name
        if target.exists():
            idmap.unmount(target)
            target.rmdir()
        self.driver.destroy(Kind.BRANCHES, name)
        (self.state / "records" / f"{name}.json").unlink(missing_ok=True)
        shutil.rmtree(self.socket_root / name, ignore_errors=True)
        (self.log_dir / f"{name}.log").unlink(missing_ok=True)
        self.ports.release(port)

    def client(self, port: int, password: str, steps: Steps) -> None:
        dsn = postgres.dsn(HOST, port, SUPERUSER, password, DATABASE)
        if self.args.client_options:
            dsn += "?" + self.args.client_options
        with steps.step("client.connect"):
            conn = psycopg.connect(dsn, autocommit=True)
        with conn, steps.step("client.select1"):
            conn.execute("SELECT 1").fetchone()

    # -- the series ------------------------------------------------------------

    def parent(self, ref: SnapshotRef) -> tuple[postgres.Postmaster, int, str]:
        pm, port, password = self.make("parent", ref, 0, Steps(), settings=self.settings)
        with psycopg.connect(self._socket("parent", port), autocommit=True) as conn:
            conn.execute("CREATE TABLE IF NOT EXISTS cold_writes (i int, at timestamptz)")
        return pm, port, password

    def neighbour(
        self, ref: SnapshotRef
    ) -> tuple[postgres.Postmaster, int, subprocess.Popen[bytes]]:
        """Another branch on the pool committing --neighbour-tps small
        transactions a second (pgbench, each commit a WAL flush): the pool
        of a daemon whose other branches are in use."""
        pm, port, _ = self.make("neighbour", ref, 0, Steps(), settings=self.settings)
        dsn = self._socket("neighbour", port)
        with psycopg.connect(dsn, autocommit=True) as conn:
            conn.execute("CREATE TABLE IF NOT EXISTS neighbour_writes (i int)")
        script = self.state / "neighbour.sql"
        script.write_text("INSERT INTO neighbour_writes VALUES (1);\n")
        pgbench = os.path.join(self.binaries.bindir, "pgbench")
        argv = [
            pgbench,
            "-n",
            "-c",
            "1",
            "-T",
            "3600",
            "-R",
            str(self.args.neighbour_tps),
            "-l",
            f"--log-prefix={self.state / 'neighbour'}",
            *(["-b", "tpcb-like"] if self.args.neighbour_tpcb else ["-f", str(script)]),
            dsn,
        ]
        writer = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        return pm, port, writer

    def _neighbour_latency(self, pid: int, results: list[dict[str, float]]) -> None:
        """The neighbour's commit latencies while the creates ran (pgbench's
        log: the third field is the transaction's time in µs), as p50, p99
        and max on every sample of this series."""
        log_file = self.state / f"neighbour.{pid}"
        with contextlib.suppress(OSError):
            lines = log_file.read_text().splitlines()
            log_file.unlink()
            # The last line may be cut short: pgbench was terminated.
            fields = [line.split() for line in lines]
            times = sorted(int(f[2]) / 1000 for f in fields if len(f) > 3 and f[2].isdigit())
            if times and results:
                figures = {
                    "neighbour.commit_p50": statistics.median(times),
                    "neighbour.commit_p99": times[int(0.99 * (len(times) - 1))],
                    "neighbour.commit_max": times[-1],
                }
                for sample in results:
                    sample.update(figures)

    def _socket(self, name: str, port: int) -> str:
        return postgres.dsn(str(self.socket_root / name), port, SUPERUSER, "", DATABASE)

    def series(self) -> list[dict[str, float]]:
        ref = self.ensure_base()
        self.clean_leftovers()
        parent: tuple[postgres.Postmaster, int, str] | None = None
        if self.args.from_branch:
            parent = self.parent(ref)
        busy = self.neighbour(ref) if self.args.neighbour_tps else None
        results: list[dict[str, float]] = []
        try:
            for i in range(self.args.warmups + self.args.runs):
                name = f"cold-{i}"
                steps = Steps()
                source = ref
                if parent is not None:
                    with psycopg.connect(
                        self._socket("parent", parent[1]), autocommit=True, options=QUIET
                    ) as conn:
                        conn.execute("INSERT INTO cold_writes VALUES (1, now())")
                        with steps.step("parent.checkpoint"):
                            conn.execute("CHECKPOINT")
                    with steps.step("parent.snapshot"):
                        source = self.driver.snapshot(Kind.BRANCHES, "parent", f"c-{i}")
                uid = 0 if self.args.no_idmap else FIRST_UID + i % 50
                pm: postgres.Postmaster | None = None
                port = 0
                t0 = time.perf_counter()
                try:
                    pm, port, password = self.make(name, source, uid, steps, settings=self.settings)
                    steps.add("daemon_total", (time.perf_counter() - t0) * 1000)
                    self.client(port, password, steps)
                    steps.add("create_to_first_query", (time.perf_counter() - t0) * 1000)
                finally:
                    t1 = time.perf_counter()
                    self.dismantle(name, pm, port)
                    steps.add("delete", (time.perf_counter() - t1) * 1000)
                    if self.args.commit_after_delete:
                        t2 = time.perf_counter()
                        if self.args.commit_after_delete == "wait":
                            subprocess.run(
                                ["btrfs", "filesystem", "sync", str(self.driver.root)], check=True
                            )
                        else:  # BTRFS_IOC_START_SYNC: start a commit, do not wait
                            fd = os.open(self.driver.root, os.O_RDONLY | os.O_DIRECTORY)
                            try:
                                fcntl.ioctl(fd, 0x80089418, bytearray(8))
                            finally:
                                os.close(fd)
                        steps.add("commit_after_delete", (time.perf_counter() - t2) * 1000)
                    if parent is not None:
                        self.driver.destroy_snapshot(source)
                if i >= self.args.warmups:
                    results.append(steps.ms)
                time.sleep(self.args.gap)
        finally:
            if busy is not None:
                busy[2].terminate()
                busy[2].wait()
                self.dismantle("neighbour", busy[0], busy[1])
                self._neighbour_latency(busy[2].pid, results)
            if parent is not None:
                self.dismantle("parent", parent[0], parent[1])
        return results

    def clean_leftovers(self) -> None:
        for volume in self.driver.list():
            if volume.kind == Kind.BRANCHES:
                found = postgres.find_postmaster(
                    str(self.mount_root / volume.name)
                ) or postgres.find_postmaster(str(volume.path / "pgdata"))
                self.dismantle(volume.name, found, 0)
        self.driver.gc()

    def release(self) -> None:
        self.loop.release()
        if self.args.remove:
            (self.data_dir / "btrfs.img").unlink(missing_ok=True)
            shutil.rmtree(self.data_dir, ignore_errors=True)


def _quantile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def report(results: list[dict[str, float]]) -> dict[str, dict[str, float]]:
    names = list(dict.fromkeys(name for r in results for name in r))
    table: dict[str, dict[str, float]] = {}
    print(f"{'step':40s} {'p50':>8s} {'p25':>8s} {'p75':>8s} {'min':>8s}   (ms, n={len(results)})")
    for name in names:
        values = [r[name] for r in results if name in r]
        row = {
            "p50": statistics.median(values),
            "p25": _quantile(values, 0.25),
            "p75": _quantile(values, 0.75),
            "min": min(values),
        }
        table[name] = row
        print(f"{name:40s} {row['p50']:8.2f} {row['p25']:8.2f} {row['p75']:8.2f} {row['min']:8.2f}")
    return table


def compare(args: argparse.Namespace) -> None:
    """--variant NAME=ARGS...: each variant run as a child process of this
    script (`src=DIR` in ARGS puts DIR first on PYTHONPATH: another checkout's
    code), --runs creates at a time, the variants taking turns for --rounds
    rounds so that they share the machine's moods; then one table."""
    common = [
        *(["--neighbour-tps", str(args.neighbour_tps)] if args.neighbour_tps else []),
        *(["--neighbour-tpcb"] if args.neighbour_tpcb else []),
        "--runs",
        str(args.runs),
        "--warmups",
        str(args.warmups),
        "--gap",
        str(args.gap),
        "--data-dir",
        str(args.data_dir),
        "--source",
        str(args.source),
        "--keep",
    ]
    variants: dict[str, tuple[list[str], str]] = {}
    for spec in args.variant:
        name, _, rest = spec.partition("=")
        words = shlex.split(rest)
        src = next((w[len("src=") :] for w in words if w.startswith("src=")), "")
        variants[name] = ([w for w in words if not w.startswith("src=")], src)
    samples: dict[str, list[dict[str, float]]] = {name: [] for name in variants}
    loads: list[float] = []
    order = list(variants)
    with tempfile.TemporaryDirectory() as scratch:
        for round_ in range(args.rounds):
            loads.append(os.getloadavg()[0])
            for name in order[round_ % len(order) :] + order[: round_ % len(order)]:
                extra, src = variants[name]
                env = dict(os.environ)
                if src:
                    env["PYTHONPATH"] = src
                out = Path(scratch) / f"{name}-{round_}.json"
                subprocess.run(
                    [sys.executable, __file__, *common, *extra, "--samples-json", str(out)],
                    env=env,
                    check=True,
                    stdout=subprocess.DEVNULL,
                )
                samples[name] += json.loads(out.read_text())
    steps = list(dict.fromkeys(step for runs in samples.values() for r in runs for step in r))
    print(f"{'median ms':40s}" + "".join(f"{name[:18]:>19s}" for name in variants))
    table: dict[str, dict[str, float]] = {}
    for step in steps:
        row = {
            name: statistics.median([r[step] for r in runs if step in r])
            for name, runs in samples.items()
            if any(step in r for r in runs)
        }
        table[step] = row
        print(
            f"{step:40s}"
            + "".join(f"{row[name]:19.2f}" if name in row else f"{'-':>19s}" for name in variants)
        )
    print(
        f"n = {', '.join(f'{n}: {len(r)}' for n, r in samples.items())}; "
        f"load average at each round: {' '.join(f'{x:.1f}' for x in loads)}"
    )
    args.out.mkdir(parents=True, exist_ok=True)
    stamp = dt.datetime.now(dt.UTC).strftime("%Y%m%dT%H%M%SZ")
    (args.out / f"coldstart-compare-{stamp}.json").write_text(
        json.dumps(
            {
                "argv": sys.argv[1:],
                "commit": _commit(),
                "loads": loads,
                "variants": {n: {"args": v[0], "src": v[1]} for n, v in variants.items()},
                "medians": table,
                "samples": samples,
            },
            indent=1,
        )
    )


def _commit() -> str:
    return subprocess.run(
        ["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"],
        capture_output=True,
        text=True,
        check=False,
    ).stdout.strip()


def _setting(text: str) -> tuple[str, str]:
    name, sep, value = text.partition("=")
    if not sep:
        raise argparse.ArgumentTypeError(f"{text!r} is not name=value")
    return name, value


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=25)
    parser.add_argument("--warmups", type=int, default=2)
    parser.add_argument("--gap", type=float, default=0.3, help="seconds between runs")
    parser.add_argument(
        "--from-branch",
        action="store_true",
        help="clone a snapshot of a running branch taken after CHECKPOINT",
    )
    parser.add_argument(
        "--neighbour-tps",
        type=int,
        default=0,
        help="another branch on the pool commits this many transactions a second meanwhile",
    )
    parser.add_argument(
        "--neighbour-tpcb",
        action="store_true",
        help="the neighbour runs pgbench's TPC-B-like script (the base's pgbench tables) "
        "instead of one-row inserts",
    )
    parser.add_argument(
        "--setting",
        type=_setting,
        action="append",
        default=[],
        help="a postgres setting for every start, name=value",
    )
    parser.add_argument(
        "--no-idmap", action="store_true", help="run postgres as the postgres user on pgdata itself"
    )
    parser.add_argument(
        "--watch-pidfile",
        action="store_true",
        help="time how late the daemon's poll sees postmaster.pid say ready (inotify)",
    )
    parser.add_argument(
        "--ready-record",
        action="store_true",
        help="state=ready durable on the host filesystem (a record), not the pool",
    )
    parser.add_argument(
        "--async-password", action="store_true", help="ALTER ROLE with synchronous_commit=off"
    )
    parser.add_argument(
        "--client-options",
        default="",
        help="query string appended to the client's DSN, e.g. gssencmode=disable",
    )
    parser.add_argument("--source", type=Path, default=Path("/var/tmp/cowbranchd-bench/src/s70"))
    parser.add_argument("--data-dir", type=Path, default=Path("/var/tmp/cowbranchd-cold"))
    parser.add_argument("--out", type=Path, default=REPO / "bench" / "results")
    parser.add_argument(
        "--variant",
        action="append",
        default=[],
        help="NAME=ARGS: compare variants, each ARGS (plus `src=DIR` for another "
        "checkout's src/) run --rounds times, in turns",
    )
    parser.add_argument("--rounds", type=int, default=6)
    parser.add_argument("--samples-json", type=Path, help=argparse.SUPPRESS)
    parser.add_argument(
        "--commit-after-delete",
        choices=("wait", "start"),
        help="after each delete, commit the pool (btrfs filesystem sync) or start a commit "
        "without waiting (BTRFS_IOC_START_SYNC)",
    )
    parser.add_argument("--keep", action="store_true", help="leave the pool mounted")
    parser.add_argument("--remove", action="store_true", help="delete the pool image at the end")
    args = parser.parse_args()
    if os.geteuid() != 0:
        sys.exit("run as root")
    if args.variant:
        bench = Bench(args)  # the pool and base, made once
        try:
            bench.ensure_base()
            compare(args)
        finally:
            if not args.keep:
                bench.release()
        return
    bench = Bench(args)
    try:
        load = os.getloadavg()[0]
        results = bench.series() if args.runs else []
        if args.samples_json is not None:
            args.samples_json.write_text(json.dumps(results))
        elif results:
            table = report(results)
            print(f"load average before: {load:.2f}, after: {os.getloadavg()[0]:.2f}")
            args.out.mkdir(parents=True, exist_ok=True)
            stamp = dt.datetime.now(dt.UTC).strftime("%Y%m%dT%H%M%SZ")
            (args.out / f"coldstart-{stamp}.json").write_text(
                json.dumps(
                    {
                        "argv": sys.argv[1:],
                        "commit": _commit(),
                        "load_before": load,
                        "medians": table,
                        "samples": results,
                    },
                    indent=1,
                )
            )
    finally:
        if not args.keep:
            bench.release()


if __name__ == "__main__":
    main()
