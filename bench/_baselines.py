"""What users do today, on the same pgbench data, on the host filesystem (ext4
here: no reflinks, so a copy is a copy):

- `CREATE DATABASE ... TEMPLATE` on a running server that holds the data, until
  the new database answers `SELECT 1` (PostgreSQL 15's default WAL_LOG strategy,
  and FILE_COPY);
- `cp -a` of the cleanly shut down data directory, then a postgres started
  directly on the copy, until `SELECT 1` answers.

Readiness is polled every 2 ms over the Unix socket (trust auth): as fast as a
careful user could do it (pg_ctl -w would poll every 100 ms).
"""

from __future__ import annotations

import shutil
import subprocess
import time
from pathlib import Path

import psycopg
from _pg import PlainPostgres
from psycopg import sql

__all__ = ["copy_and_start", "template_database"]


def copy_and_start(source: Path, work: Path, port: int, runs: int) -> dict[str, list[float]]:
    """`runs` times: cp -a, start postgres, SELECT 1 (timed); stop; rm -rf (timed)."""
    out: dict[str, list[float]] = {"ready": [], "copy": [], "start": [], "remove": []}
    work.mkdir(mode=0o755, parents=True, exist_ok=True)
    for _ in range(runs):
        copy = work / "copy"
        shutil.rmtree(copy, ignore_errors=True)
        t0 = time.perf_counter()
        subprocess.run(["cp", "-a", str(source), str(copy)], check=True)
        t1 = time.perf_counter()
        server = PlainPostgres(copy, port, work / "sock")
        try:
            server.start()
            t2 = time.perf_counter()
        finally:
            server.stop()
        t3 = time.perf_counter()
        shutil.rmtree(copy)
        t4 = time.perf_counter()
        out["copy"].append(t1 - t0)
        out["start"].append(t2 - t1)
        out["ready"].append(t2 - t0)
        out["remove"].append(t4 - t3)
    return out


def template_database(source: Path, work: Path, port: int, runs: int
                      ) -> dict[str, dict[str, list[float]]]:
    """Start a server on a copy of `source`, then per strategy `runs` times:
    CREATE DATABASE ... TEMPLATE postgres + SELECT 1 in it (timed), DROP (timed)."""
    work.mkdir(mode=0o755, parents=True, exist_ok=True)
    copy = work / "template-server"
    shutil.rmtree(copy, ignore_errors=True)
    subprocess.run(["cp", "-a", str(source), str(copy)], check=True)
    server = PlainPostgres(copy, port, work / "sock")
    out: dict[str, dict[str, list[float]]] = {}
    try:
        server.start()
        with psycopg.connect(server.dsn("template1"), autocommit=True) as admin:
            for strategy in ("WAL_LOG", "FILE_COPY"):
                times: dict[str, list[float]] = {"ready": [], "drop": []}
                for i in range(runs):
                    name = f"bench_copy_{i}"
                    t0 = time.perf_counter()
                    admin.execute(
                        sql.SQL("CREATE DATABASE {} TEMPLATE postgres STRATEGY {}").format(
                            sql.Identifier(name), sql.SQL(strategy)
                        )
                    )
                    with psycopg.connect(server.dsn(name), autocommit=True) as conn:
                        conn.execute("SELECT 1").fetchone()
                    t1 = time.perf_counter()
                    admin.execute(sql.SQL("DROP DATABASE {}").format(sql.Identifier(name)))
                    times["ready"].append(t1 - t0)
                    times["drop"].append(time.perf_counter() - t1)
                out[strategy] = times
    finally:
        server.stop()
        shutil.rmtree(copy, ignore_errors=True)
    return out
