"""pgbench data: one cleanly shut down source data directory per scale on the
host filesystem (reused between runs), and a base made from it in each pool.

Building: initdb, start with durability off (fsync, full_page_writes,
wal_level=minimal: safe here because a failed build is simply redone), server-side
`pgbench -i` (generate_series, no client round trips), fast shutdown, syncfs.
Those settings are command-line only: the data directory's postgresql.conf,
which branches inherit, keeps the defaults. The directory is renamed into
place only when complete. The base is then `CreateBase(data_directory=...)`.
"""

from __future__ import annotations

import shutil
import subprocess
import time
from pathlib import Path

import grpc
from _daemon import BenchDaemon
from _pg import PlainPostgres, bin_path, initdb, run_as_os_user

from cowbranchd.v1 import bases_pb2

__all__ = ["base_id", "dir_bytes", "ensure_base", "ensure_source"]

BUILD_SETTINGS = {
    "fsync": "off",
    "full_page_writes": "off",
    "synchronous_commit": "off",
    "wal_level": "minimal",
    "max_wal_senders": "0",
    "max_wal_size": "16GB",
    "checkpoint_timeout": "1h",
    "maintenance_work_mem": "512MB",
    "autovacuum": "off",
}


def base_id(scale: int) -> str:
    return f"pgbench-s{scale}"


def dir_bytes(path: Path) -> int:
    out = subprocess.run(["du", "-sb", str(path)], capture_output=True, text=True, check=True)
    return int(out.stdout.split()[0])


def ensure_source(data_dir: Path, scale: int, port: int) -> tuple[Path, float | None]:
    """The source data directory for `scale`; built if missing. Returns it and
    the build time in seconds (None when reused)."""
    target = data_dir / "src" / f"s{scale}"
    if (target / "PG_VERSION").exists():
        return target, None
    started = time.perf_counter()
    building = data_dir / "src" / f"s{scale}.building"
    shutil.rmtree(building, ignore_errors=True)
    building.parent.mkdir(mode=0o755, parents=True, exist_ok=True)
    initdb(building)
    server = PlainPostgres(building, port, data_dir / "src" / "sock")
    server.start(BUILD_SETTINGS)
    try:
        run_as_os_user(
            [bin_path("pgbench"), "-i", "-s", str(scale), "-I", "dtGvp", "-q",
             "-h", str(server.socket_dir), "-p", str(port), "-U", "postgres", "postgres"],
            timeout=6 * 3600,
        )
    finally:
        server.stop()
    (building.parent / f"s{scale}.building.log").unlink(missing_ok=True)
    subprocess.run(["sync", "-f", str(building)], check=True)
    building.rename(target)
    return target, time.perf_counter() - started


def ensure_base(daemon: BenchDaemon, scale: int, source: Path) -> tuple[int, float | None]:
    """Make base `pgbench-s<scale>` from `source` unless the pool has it.
    Returns its size in bytes and the CreateBase time (None when reused)."""
    wanted = f"bases/{base_id(scale)}"
    for base in daemon.bases.ListBases(bases_pb2.ListBasesRequest(), timeout=60).bases:
        if base.name == wanted:
            return base.size_bytes, None
    started = time.perf_counter()
    try:
        base = daemon.bases.CreateBase(
            bases_pb2.CreateBaseRequest(base_id=base_id(scale), data_directory=str(source)),
            timeout=6 * 3600,
        )
    except grpc.RpcError as exc:
        raise RuntimeError(f"CreateBase {base_id(scale)} failed: {exc}") from exc
    return base.size_bytes, time.perf_counter() - started
