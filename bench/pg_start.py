"""Benchmark: start-to-SELECT-1 and stop latency of a branch postmaster (median of N).

Run as root: .venv/bin/python bench/pg_start.py [N]. Each sample starts postgres
on a fresh copy (cp -a) of a small base made by initdb, so every start is a
first start, as for a new clone. Not a test: no asserts, figures only.
"""

from __future__ import annotations

import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Mapping

import psycopg
import structlog
from structlog.testing import LogCapture

from cowbranchd import postgres as pg
from cowbranchd.postgres.datadir import read_pid_file

BIN_DIRS = ["/usr/lib/postgresql/{version}/bin"]
OS_USER = "postgres"
PORT = 54987


def _ms(samples: list[float]) -> str:
    return (
        f"median {statistics.median(samples) * 1000:6.1f} ms  "
        f"min {min(samples) * 1000:6.1f}  max {max(samples) * 1000:6.1f}"
    )


def bench(
    root: str,
    base: str,
    binaries: pg.Binaries,
    *,
    n: int,
    settings: Mapping[str, str],
    stop: Callable[[pg.Postmaster], None],
    ready_dsn: str,
) -> dict[str, list[float]]:
    out: dict[str, list[float]] = {
        "start": [],
        "spawn": [],
        "pidfile_ready": [],
        "select1": [],
        "stop": [],
    }
    capture = LogCapture()
    structlog.configure(processors=[capture])
    for i in range(n):
        clone = os.path.join(root, f"clone{i}")
        subprocess.run(["cp", "-a", base, clone], check=True)
        pg.prepare_clone(clone)
        t0 = time.perf_counter()
        pm = pg.start(
            clone,
            binaries=binaries,
            os_user=OS_USER,
            port=PORT,
            socket_dir=os.path.join(root, "sock"),
            listen_addresses="127.0.0.1",
            settings=settings,
            log_path=os.path.join(root, "bench.log"),
            ready_dsn=ready_dsn,
        )
        t1 = time.perf_counter()
        t2 = time.perf_counter()
        stop(pm)
        t3 = time.perf_counter()
        out["start"].append(t1 - t0)
        started = next(e for e in reversed(capture.entries) if e["event"] == "postgres started")
        out["spawn"].append(started["spawn_ms"] / 1000)
        out["pidfile_ready"].append(started["pidfile_ready_ms"] / 1000)
        out["select1"].append((started["select1_ms"] - started["pidfile_ready_ms"]) / 1000)
        out["stop"].append(t3 - t2)
        shutil.rmtree(clone)
    return out


def probe_costs(root: str, base: str, binaries: pg.Binaries, tcp: str, sock: str) -> None:
    clone = os.path.join(root, "probe")
    subprocess.run(["cp", "-a", base, clone], check=True)
    pm = pg.start(
        clone,
        binaries=binaries,
        os_user=OS_USER,
        port=PORT,
        socket_dir=os.path.join(root, "sock"),
        listen_addresses="127.0.0.1",
        settings={},
        log_path=os.path.join(root, "bench.log"),
        ready_dsn=sock,
    )
    try:
        for label, conninfo in (("tcp+scram", tcp), ("socket+trust", sock)):
            samples = []
            for _ in range(20):
                t = time.perf_counter()
                with psycopg.connect(conninfo, autocommit=True) as conn:
                    conn.execute("SELECT 1").fetchone()
                samples.append(time.perf_counter() - t)
            print(f"  connect+SELECT 1 on a warm server, {label:13s} {_ms(samples)}")
        samples = []
        for _ in range(200):
            t = time.perf_counter()
            read_pid_file(clone)
            samples.append(time.perf_counter() - t)
        print(f"  read postmaster.pid                          {_ms(samples)}")
    finally:
        pg.stop(pm)
        shutil.rmtree(clone)


def main() -> None:
    n = int(sys.argv[1]) if len(sys.argv) > 1 else 20
    binaries = pg.find_binaries(15, BIN_DIRS)
    root = tempfile.mkdtemp(prefix="cowbranchd-bench-")
    os.chmod(root, 0o711)
    try:
        base = os.path.join(root, "base")
        os.mkdir(base)
        pg.initdb(
            base,
            binaries,
            os_user=OS_USER,
            superuser="bench",
            password="bench-pw",
            database="app",
            init_sql="CREATE TABLE t (i int); INSERT INTO t SELECT generate_series(1, 1000);",
        )
        tcp = pg.dsn("127.0.0.1", PORT, "bench", "bench-pw", "app")
        sock = pg.dsn(os.path.join(root, "sock"), PORT, "bench", "", "app")
        probe_costs(root, base, binaries, tcp, sock)
        fast = pg.stop

        def immediate(pm: pg.Postmaster) -> None:
            pg.stop(pm, fast_timeout=0)

        variants: list[tuple[str, Mapping[str, str], Callable[[pg.Postmaster], None], str]] = [
            ("defaults, TCP probe, fast stop", {}, fast, tcp),
            ("defaults, TCP probe, immediate stop", {}, immediate, tcp),
            ("defaults, socket probe", {}, fast, sock),
            ("shared_buffers=16MB", {"shared_buffers": "16MB"}, fast, tcp),
            ("huge_pages=off", {"huge_pages": "off"}, fast, tcp),
            ("max_connections=20", {"max_connections": "20"}, fast, tcp),
            ("fsync=off (NOT applied)", {"fsync": "off"}, fast, tcp),
        ]
        # Warm the page cache first.
        bench(root, base, binaries, n=3, settings={}, stop=fast, ready_dsn=tcp)
        for label, settings, stop, probe in variants:
            r = bench(root, base, binaries, n=n, settings=settings, stop=stop, ready_dsn=probe)
            print(f"{label}:")
            print(f"  start->SELECT 1  {_ms(r['start'])}")
            print(f"    spawn (Popen)  {_ms(r['spawn'])}")
            print(f"    pid file ready {_ms(r['pidfile_ready'])}  (since start() was called)")
            print(f"    then SELECT 1  {_ms(r['select1'])}")
            print(f"  stop             {_ms(r['stop'])}")
    finally:
        shutil.rmtree(root)


if __name__ == "__main__":
    main()
