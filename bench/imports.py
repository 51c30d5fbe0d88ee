#!/usr/bin/env python3
"""Import time: ImportBase by pg_basebackup and by pg_restore, next to the
bare tools doing the same copy on the same machine (the overhead ratio).

The source is the pgbench data directory `bench/run.py` builds (scale 70 is
~1 GB), started as a "production" server with a replication role. Bare
tools: `pg_basebackup -X stream` into a scratch directory; `pg_restore -j N`
of a custom-format dump into a fresh initdb cluster. Through the daemon:
ImportBase(from_server) and ImportBase(from_dump) of the same dump, timed
from the call to the operation being done (both end with a sealed,
branchable version: finish, password, snapshot). Each is run `--runs` times.

    .venv/bin/python bench/imports.py --scale 70 --runs 2
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from _daemon import BenchDaemon
from _data import ensure_source
from _pg import OS_USER, PlainPostgres, bin_path, chown_to_os_user, initdb
from _pools import open_pool

from cowbranchd.v1 import bases_pb2, operations_pb2, operations_pb2_grpc

REPLICATOR = "bench_replicator"
PASSWORD = "bench-replicator-password"


def timed(argv: list[str], **kwargs: Any) -> float:
    started = time.perf_counter()
    subprocess.run(argv, check=True, capture_output=True, **kwargs)
    return time.perf_counter() - started


def as_postgres(argv: list[str]) -> list[str]:
    return ["setpriv", f"--reuid={OS_USER}", f"--regid={OS_USER}", "--clear-groups", *argv]


def import_via_daemon(daemon: BenchDaemon, request: bases_pb2.ImportBaseRequest) -> float:
    assert daemon.channel is not None
    bases = daemon.bases
    ops = operations_pb2_grpc.OperationServiceStub(daemon.channel)
    started = time.perf_counter()
    op = bases.ImportBase(request, timeout=60)
    while not op.done:
        op = ops.WaitOperation(operations_pb2.WaitOperationRequest(name=op.name), timeout=120)
    took = time.perf_counter() - started
    if op.error_code:
        raise RuntimeError(f"{request.base_id}: {op.error_message}")
    bases.DeleteBase(bases_pb2.DeleteBaseRequest(name=f"bases/{request.base_id}"), timeout=300)
    return took


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--scale", type=int, default=70)
    p.add_argument("--runs", type=int, default=2)
    p.add_argument("--jobs", type=int, default=2)
    p.add_argument("--data-dir", type=Path, default=Path("/var/tmp/cowbranchd-bench"))
    p.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "results")
    args = p.parse_args()

    source, _ = ensure_source(args.data_dir, args.scale, port=55433)
    work = args.data_dir / "imports"
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(mode=0o755)
    chown_to_os_user(work)
    # The server runs on a clone of the source, so the source stays clean.
    prod_dir = work / "prod"
    subprocess.run(["cp", "-a", "--reflink=auto", str(source), str(prod_dir)], check=True)
    server = PlainPostgres(prod_dir, 55434, work / "prod-socket")
    results: dict[str, Any] = {"scale": args.scale, "runs": args.runs, "jobs": args.jobs}
    pool = open_pool("btrfs", args.data_dir)
    daemon = BenchDaemon("btrfs", pool.root, args.data_dir)
    try:
        server.start({"listen_addresses": "127.0.0.1", "max_wal_senders": "4",
                      "wal_level": "replica"})
        subprocess.run(
            as_postgres([bin_path("psql"), "-X", "-q", "-d", server.dsn(), "-c",
                         f"CREATE ROLE {REPLICATOR} REPLICATION LOGIN PASSWORD '{PASSWORD}'"]),
            check=True, capture_output=True,
        )
        hba = prod_dir / "pg_hba.conf"
        hba.write_text(hba.read_text() + "host replication all 127.0.0.1/32 scram-sha-256\n"
                       "host all all 127.0.0.1/32 scram-sha-256\n")
        subprocess.run(as_postgres([bin_path("pg_ctl"), "-D", str(prod_dir), "reload"]),
                       check=True, capture_output=True)
        dsn = f"host=127.0.0.1 port=55434 user={REPLICATOR} password={PASSWORD} dbname=postgres"
        env = {**os.environ, "PGPASSWORD": PASSWORD}
        dump = work / "prod.dump"
        subprocess.run(as_postgres([bin_path("pg_dump"), "-Fc", "-f", str(dump), "-d",
                                    server.dsn()]), check=True, capture_output=True)
        results["source_bytes"] = sum(f.stat().st_size for f in prod_dir.rglob("*") if f.is_file())
        results["dump_bytes"] = dump.stat().st_size

        bare_backup, bare_restore = [], []
        for n in range(args.runs):
            target = work / f"bb{n}"
            bare_backup.append(timed(as_postgres([
                bin_path("pg_basebackup"), "-d", f"host=127.0.0.1 port=55434 user={REPLICATOR}",
                "-D", str(target), "-X", "stream", "--checkpoint=fast", "--no-manifest"]),
                env=env, cwd="/"))
            shutil.rmtree(target)
            cluster = work / f"restore{n}"
            started = time.perf_counter()
            initdb(cluster)
            target_pg = PlainPostgres(cluster, 55435, work / f"restore{n}-socket")
            target_pg.start()
            subprocess.run(as_postgres([bin_path("pg_restore"), f"-j{args.jobs}",
                                        "-d", target_pg.dsn(), str(dump)]),
                           check=True, capture_output=True, cwd="/")
            target_pg.stop()
            bare_restore.append(time.perf_counter() - started)
            shutil.rmtree(cluster)

        import_root = daemon.import_root
        shutil.copy(dump, import_root / "bench-prod.dump")
        os.chmod(import_root / "bench-prod.dump", 0o644)
        daemon.start()
        via_server, via_dump = [], []
        for n in range(args.runs):
            via_server.append(import_via_daemon(daemon, bases_pb2.ImportBaseRequest(
                base_id=f"imp-server-{n}", from_server=dsn)))
            via_dump.append(import_via_daemon(daemon, bases_pb2.ImportBaseRequest(
                base_id=f"imp-dump-{n}", from_dump=str(import_root / "bench-prod.dump"),
                jobs=args.jobs)))
        median = statistics.median
        results["seconds"] = {
            "pg_basebackup": bare_backup, "import_from_server": via_server,
            "pg_restore": bare_restore, "import_from_dump": via_dump,
        }
        results["overhead_ratio"] = {
            "from_server": round(median(via_server) / median(bare_backup), 2),
            "from_dump": round(median(via_dump) / median(bare_restore), 2),
        }
        for name, samples in results["seconds"].items():
            each = ", ".join(f"{s:.1f}" for s in samples)
            print(f"{name:>20}: median {median(samples):.1f} s  ({each})")
        print(f"overhead: {results['overhead_ratio']}")
        args.out.mkdir(parents=True, exist_ok=True)
        out = args.out / f"imports-{time.strftime('%Y%m%dT%H%M%SZ', time.gmtime())}.json"
        out.write_text(json.dumps(results, indent=2))
        print(f"wrote {out}")
    finally:
        daemon.stop()
        server.stop()
        pool.release()
        shutil.rmtree(work, ignore_errors=True)
        (daemon.import_root / "bench-prod.dump").unlink(missing_ok=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
