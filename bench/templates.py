#!/usr/bin/env python3
"""Templates (issue 12): what building a template costs, and what a per-test
create from it costs, frozen (warm and cold) and the old way.

    .venv/bin/python bench/templates.py [--scale 70] [--builds 5] [--runs 50]
                                        [--warm-gap 0.3] [--out docs/bench-templates.json]

Run as root. Its own btrfs loop pool, daemon and ports under --data-dir (never
the pool of bench/run.py: a daemon's start-up reconcile would take over another
daemon's branches), a pgbench base at --scale (source data built once under
the data dir and kept; the pool image is deleted at the end unless
--keep-image; --remove deletes the whole data dir).

1. Template build, --builds times: CreateBranch of the base, a small
   application migration (MIGRATION: tables with foreign keys, indexes, a
   trigger, a few thousand seeded rows) over the branch's DSN, FreezeBranch.
   What the pytest plugin does per migration hash (pytest_plugin/templates.py).
2. Per-test creates from the template, --runs each after 2 unrecorded ones,
   each after a pause of --warm-gap s (a test's own work) and followed by
   DeleteBranch: the CreateBranch RPC, and create-to-first-query (the RPC,
   then a new psycopg TCP connection through the returned DSN running
   FIRST_QUERY on the migrated schema). Three modes:
   - `frozen_warm`: daemon.warm_branches = 2; only the creates the daemon
     logged `warm: true` are counted (the rest are reported apart);
   - `frozen_cold`: daemon.warm_branches = 0: clone of the frozen snapshot
     and a postgres start without recovery;
   - `unfrozen`: the template left running (before FreezeBranch): each child
     is a CHECKPOINT of it, its own snapshot, and a start with crash recovery.
   The daemon's `branch_created` steps (ms_*) are given as medians per mode.

Figures only: nothing here asserts on time. Every daemon, postmaster, mount
and loop device it made is gone when it ends, Ctrl-C and SIGTERM included.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import logging
import os
import shutil
import signal
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import psycopg
import structlog
from _daemon import BenchDaemon
from _data import base_id, dir_bytes, ensure_base, ensure_source
from _pg import stop_postmasters_under
from _pools import open_pool
from _report import summary

import cowbranchd
from cowbranchd.v1 import branches_pb2

REPO = Path(__file__).resolve().parent.parent
# Its own blocks: run.py uses 47000-47599 and 47900, coldstart.py 47700-47799,
# suspend.py 48000-48999.
PORTS = (49000, 49199)
SOURCE_PORT = 49900
RPC_TIMEOUT = 300.0
WARM = 2  # daemon.warm_branches of the warm mode

# A small application's first migration: what a test suite's template holds.
MIGRATION = """\
CREATE TYPE order_status AS ENUM ('new', 'paid', 'shipped', 'cancelled');
CREATE TABLE customers (
    id bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    email text NOT NULL UNIQUE,
    name text NOT NULL,
    created_at timestamptz NOT NULL DEFAULT now()
);
CREATE TABLE products (
    id bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    sku text NOT NULL UNIQUE,
    title text NOT NULL,
    price_cents integer NOT NULL CHECK (price_cents >= 0)
);
CREATE TABLE orders (
    id bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    customer_id bigint NOT NULL REFERENCES customers (id) ON DELETE CASCADE,
    status order_status NOT NULL DEFAULT 'new',
    total_cents bigint NOT NULL DEFAULT 0,
    created_at timestamptz NOT NULL DEFAULT now(),
    updated_at timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX orders_customer_idx ON orders (customer_id, created_at DESC);
CREATE INDEX orders_open_idx ON orders (status) WHERE status <> 'shipped';
CREATE TABLE order_items (
    order_id bigint NOT NULL REFERENCES orders (id) ON DELETE CASCADE,
    product_id bigint NOT NULL REFERENCES products (id),
    quantity integer NOT NULL CHECK (quantity > 0),
    price_cents integer NOT NULL,
    PRIMARY KEY (order_id, product_id)
);
CREATE INDEX order_items_product_idx ON order_items (product_id);
CREATE FUNCTION order_items_total() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    UPDATE orders
       SET total_cents = total_cents + NEW.quantity * NEW.price_cents, updated_at = now()
     WHERE id = NEW.order_id;
    RETURN NEW;
END
$$;
CREATE TRIGGER order_items_total AFTER INSERT ON order_items
    FOR EACH ROW EXECUTE FUNCTION order_items_total();
CREATE TABLE schema_migrations (version text PRIMARY KEY, applied_at timestamptz DEFAULT now());
INSERT INTO schema_migrations (version) VALUES ('0001_initial');
INSERT INTO customers (email, name)
    SELECT 'c' || i || '@example.com', 'Customer ' || i FROM generate_series(1, 1000) i;
INSERT INTO products (sku, title, price_cents)
    SELECT 'SKU-' || i, 'Product ' || i, 100 + (i * 37) % 5000 FROM generate_series(1, 200) i;
INSERT INTO orders (customer_id, status)
    SELECT 1 + i % 1000, (ARRAY['new', 'paid', 'shipped', 'cancelled']::order_status[])[1 + i % 4]
      FROM generate_series(1, 2000) i;
INSERT INTO order_items (order_id, product_id, quantity, price_cents)
    SELECT o, 1 + (o * 7 + k * 13) % 200, k, 100 + k
      FROM generate_series(1, 2000) o, generate_series(1, 3) k;
ANALYZE customers, products, orders, order_items;
"""
SEEDED_ROWS = 1000 + 200 + 2000 + 6000 + 1
# A test's first query: customer 43 has orders 42 and 1042, 3 items each.
FIRST_QUERY = (
    "SELECT count(*) FROM orders o JOIN order_items i ON i.order_id = o.id WHERE o.customer_id = 43"
)
FIRST_QUERY_ANSWER = 6


class TemplatesDaemon(BenchDaemon):
    """BenchDaemon with its own work dir, ports and warm_branches."""

    @property
    def workdir(self) -> Path:
        return self.data_dir / "daemon-templates"

    def port_range(self) -> tuple[int, int]:
        return PORTS

    def write_config(self, *, max_branches: int = 200) -> Path:
        return super().write_config(max_branches=max_branches)


def _say(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", flush=True)


def _ms(seconds: float) -> float:
    return round(seconds * 1000, 2)


def _load() -> list[float]:
    return [round(x, 2) for x in os.getloadavg()]


def _utc() -> str:
    return dt.datetime.now(dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


# -- template build ---------------------------------------------------------------


def migrate(dsn: str) -> None:
    with psycopg.connect(dsn, connect_timeout=10) as conn:
        conn.execute(MIGRATION)  # one simple-query round trip, one transaction


def build_template(
    d: TemplatesDaemon, base: str, branch_id: str, *, freeze: bool
) -> dict[str, Any]:
    """CreateBranch of the base, the migration, FreezeBranch: seconds of each."""
    t0 = time.perf_counter()
    branch = d.branches.CreateBranch(
        branches_pb2.CreateBranchRequest(branch_id=branch_id, parent=base), timeout=RPC_TIMEOUT
    )
    t1 = time.perf_counter()
    migrate(branch.connection.dsn)
    t2 = time.perf_counter()
    if freeze:
        frozen = d.branches.FreezeBranch(
            branches_pb2.FreezeBranchRequest(name=branch.name), timeout=RPC_TIMEOUT
        )
        if not frozen.frozen:
            raise RuntimeError(f"FreezeBranch answered {branch.name} not frozen")
    t3 = time.perf_counter()
    return {
        "name": branch.name,
        "create_s": t1 - t0,
        "migrate_s": t2 - t1,
        "freeze_s": t3 - t2 if freeze else None,
        "total_s": t3 - t0,
    }


def build_figures(
    builds: list[dict[str, Any]], created: dict[str, dict[str, Any]]
) -> dict[str, Any]:
    out: dict[str, Any] = {"n": len(builds)}
    for step in ("create", "migrate", "freeze", "total"):
        out[step] = summary(b[f"{step}_s"] for b in builds if b[f"{step}_s"] is not None)
    out["create_warm"] = [
        bool(created.get(b["name"].removeprefix("branches/"), {}).get("warm")) for b in builds
    ]
    return out


# -- per-test creates ---------------------------------------------------------------


@dataclass
class PerTest:
    branch_id: str
    rpc_s: float  # CreateBranch until it returned
    connect_s: float  # then a new TCP connection through the DSN (SCRAM)
    query_s: float  # then FIRST_QUERY on it (a new backend: catalog caches cold)
    delete_s: float

    @property
    def first_query_s(self) -> float:
        return self.rpc_s + self.connect_s + self.query_s


def first_query(dsn: str) -> tuple[float, float]:
    """Seconds to connect, then to run FIRST_QUERY."""
    t0 = time.perf_counter()
    with psycopg.connect(dsn, connect_timeout=10, autocommit=True) as conn:
        t1 = time.perf_counter()
        row = conn.execute(FIRST_QUERY).fetchone()
        t2 = time.perf_counter()
    if row is None or row[0] != FIRST_QUERY_ANSWER:
        raise RuntimeError(f"{FIRST_QUERY!r} answered {row}, not {FIRST_QUERY_ANSWER}")
    return t1 - t0, t2 - t1


def per_test_series(
    d: TemplatesDaemon, parent: str, prefix: str, *, runs: int, gap_s: float, warmup: int = 2
) -> list[PerTest]:
    out: list[PerTest] = []
    for i in range(warmup + runs):
        time.sleep(gap_s)
        branch_id = f"{prefix}-{i}"
        t0 = time.perf_counter()
        branch = d.branches.CreateBranch(
            branches_pb2.CreateBranchRequest(branch_id=branch_id, parent=parent),
            timeout=RPC_TIMEOUT,
        )
        t1 = time.perf_counter()
        connect_s, query_s = first_query(branch.connection.dsn)
        t2 = time.perf_counter()
        d.branches.DeleteBranch(
            branches_pb2.DeleteBranchRequest(name=branch.name), timeout=RPC_TIMEOUT
        )
        t3 = time.perf_counter()
        if i >= warmup:
            out.append(PerTest(branch_id, t1 - t0, connect_s, query_s, t3 - t2))
    return out


def step_medians(lines: list[dict[str, Any]]) -> dict[str, float]:
    """Median of each ms_* field of the daemon's branch_created lines."""
    steps: dict[str, list[float]] = {}
    for line in lines:
        for key, value in line.items():
            if key.startswith("ms_"):
                steps.setdefault(key[3:], []).append(float(value))
    return {k: round(statistics.median(v), 2) for k, v in steps.items()}


def series_figures(d: TemplatesDaemon, series: list[PerTest], *, warm_only: bool) -> dict[str, Any]:
    """Client figures over the series (over its warm creates only, if
    `warm_only`: the daemon's `branch_created` line says which), the
    daemon's per-step medians, and the creates not served warm."""
    created = {e["branch"]: e for e in d.events("branch_created")}
    deleted = {e["branch"]: float(e["ms_total"]) for e in d.events("branch_deleted")}
    warm = [s for s in series if created.get(s.branch_id, {}).get("warm")]
    counted = warm if warm_only else series
    cold = [s for s in series if s not in warm]
    out: dict[str, Any] = {
        "n": len(series),
        "warm_n": len(warm),
        "counted_n": len(counted),
        "rpc": summary(s.rpc_s for s in counted),
        "first_query": summary(s.first_query_s for s in counted),
        "connect": summary(s.connect_s for s in counted),
        "query": summary(s.query_s for s in counted),
        "delete": summary(s.delete_s for s in series),
        "daemon_steps_ms": step_medians(
            [created[s.branch_id] for s in counted if s.branch_id in created]
        ),
        "daemon_delete_median_ms": round(
            statistics.median([deleted[s.branch_id] for s in series if s.branch_id in deleted]), 2
        )
        if any(s.branch_id in deleted for s in series)
        else None,
    }
    if warm_only:
        out["not_warm"] = {
            "branches": [s.branch_id for s in cold],
            "rpc": summary(s.rpc_s for s in cold),
            "first_query": summary(s.first_query_s for s in cold),
        }
    return out


def wait_warm(d: TemplatesDaemon, parent: str, count: int, timeout: float) -> float:
    """Seconds until the daemon logged `count` warm clones of `parent` (a
    branch, or a base: any of its versions) started (its debug line `warm_ready`)."""
    started = time.monotonic()
    while time.monotonic() - started < timeout:
        ready = [
            e
            for e in d.events("warm_ready")
            if e.get("parent") == parent or str(e.get("parent")).startswith(parent + "/")
        ]
        if len(ready) >= count:
            return time.monotonic() - started
        time.sleep(0.1)
    raise RuntimeError(f"no {count} warm clones of {parent} within {timeout} s")


# -- phases ---------------------------------------------------------------------------


def cold_phase(
    args: argparse.Namespace,
    pool_root: str,
    sources: Path,
    results: dict[str, Any],
    save: Callable[[], None],
) -> None:
    """warm_branches = 0: the template builds, frozen cold creates, the old way."""
    base = f"bases/{base_id(args.scale)}"
    d = TemplatesDaemon("btrfs", pool_root, args.data_dir, warm_branches=0)
    try:
        d.start()
        size, took = ensure_base(d, args.scale, sources)
        results["base"] = {"id": base_id(args.scale), "size_bytes": size, "create_base_s": took}
        _say(
            f"base {base} ({size / 1e9:.2f} GB) "
            f"{'reused' if took is None else f'made in {took:.0f} s'}"
        )

        load = _load()
        builds = []
        for i in range(args.builds):
            last = i == args.builds - 1
            b = build_template(d, base, f"tpl-{i}", freeze=True)
            builds.append(b)
            _say(
                f"build {i + 1}/{args.builds}: create {_ms(b['create_s'])} ms, migration "
                f"{_ms(b['migrate_s'])} ms, freeze {_ms(b['freeze_s'])} ms, "
                f"total {_ms(b['total_s'])} ms"
            )
            if not last:
                d.branches.DeleteBranch(
                    branches_pb2.DeleteBranchRequest(name=b["name"]), timeout=RPC_TIMEOUT
                )
        created = {e["branch"]: e for e in d.events("branch_created")}
        results["build"] = build_figures(builds, created)
        results["build"].update(
            load_before=load, load_after=_load(), daemon_warm_branches=0, time=_utc()
        )
        save()

        template = builds[-1]["name"]
        results["frozen_cold"] = run_mode(d, template, "cold", args)
        save()

        old = build_template(d, base, "tpl-unfrozen", freeze=False)
        results["unfrozen_build"] = {
            "name": old["name"],
            "create_ms": _ms(old["create_s"]),
            "migrate_ms": _ms(old["migrate_s"]),
            "total_ms": _ms(old["total_s"]),
        }
        results["unfrozen"] = run_mode(d, old["name"], "old", args)
        save()
    finally:
        d.stop()


def warm_phase(
    args: argparse.Namespace, pool_root: str, results: dict[str, Any], save: Callable[[], None]
) -> None:
    """warm_branches = 2: a template built and frozen, then warm creates."""
    base = f"bases/{base_id(args.scale)}"
    d = TemplatesDaemon("btrfs", pool_root, args.data_dir, warm_branches=WARM)
    try:
        d.start()
        # The base's own warm clones first, so the build is measured as a
        # test session on a warm daemon sees it.
        waited = wait_warm(d, base, WARM, 300)
        load = _load()
        b = build_template(d, base, "tpl-warm", freeze=True)
        created = {e["branch"]: e for e in d.events("branch_created")}
        results["build_warm_daemon"] = build_figures([b], created)
        results["build_warm_daemon"].update(
            load_before=load,
            load_after=_load(),
            daemon_warm_branches=WARM,
            time=_utc(),
            base_warm_after_s=round(waited, 1),
        )
        _say(
            f"build on the warm daemon: create {_ms(b['create_s'])} ms "
            f"({'warm' if results['build_warm_daemon']['create_warm'][0] else 'cold'}), "
            f"migration {_ms(b['migrate_s'])} ms, freeze {_ms(b['freeze_s'])} ms"
        )
        results["template_warm_after_freeze_s"] = round(wait_warm(d, b["name"], WARM, 300), 2)
        results["frozen_warm"] = run_mode(d, b["name"], "warm", args)
        save()
    finally:
        d.stop()


def run_mode(
    d: TemplatesDaemon, parent: str, prefix: str, args: argparse.Namespace
) -> dict[str, Any]:
    load, at = _load(), _utc()
    try:
        series = per_test_series(d, parent, prefix, runs=args.runs, gap_s=args.warm_gap)
    except (grpc.RpcError, psycopg.Error, RuntimeError) as exc:
        # Recorded, and the other modes still run.
        _say(f"{prefix}: failed: {exc}")
        return {"parent": parent, "time": at, "load_before": load, "error": str(exc)}
    figures = series_figures(d, series, warm_only=prefix == "warm")
    figures.update(
        parent=parent,
        gap_s=args.warm_gap,
        time=at,
        load_before=load,
        load_after=_load(),
        daemon_warm_branches=d.warm_branches,
    )
    _say(
        f"{prefix}: {figures['counted_n']} of {figures['n']} counted "
        f"(warm {figures['warm_n']}); RPC p50/p95/p99 "
        f"{figures['rpc'].get('median_ms')}/{figures['rpc'].get('p95_ms')}/"
        f"{figures['rpc'].get('p99_ms')} ms; first query "
        f"{figures['first_query'].get('median_ms')}/{figures['first_query'].get('p95_ms')}/"
        f"{figures['first_query'].get('p99_ms')} ms; steps {figures['daemon_steps_ms']}"
    )
    return figures


# -- output ---------------------------------------------------------------------------


MODES = (
    ("frozen_warm", f"frozen, warm (warm_branches = {WARM})"),
    ("frozen_cold", "frozen, cold (warm_branches = 0)"),
    ("unfrozen", "not frozen (CHECKPOINT + snapshot + recovery)"),
)


def _trio(s: dict[str, Any]) -> str:
    if not s.get("n"):
        return "-"
    return f"{s['median_ms']:.1f} / {s['p95_ms']:.1f} / {s['p99_ms']:.1f}"


def render_table(results: dict[str, Any]) -> str:
    rows = []
    b = results.get("build")
    if b:
        rows += ["| template build, ms | median | min | max |", "|---|---|---|---|"]
        for step, label in (
            ("create", "CreateBranch of the base"),
            ("migrate", "migration (connect, DDL + seed in one transaction)"),
            ("freeze", "FreezeBranch"),
            ("total", "**total**"),
        ):
            s = b[step]
            rows.append(
                f"| {label} | {s['median_ms']:.0f} | {s['min_ms']:.0f} | {s['max_ms']:.0f} |"
            )
        rows.append(f"({b['n']} builds, daemon.warm_branches = 0)")
        rows.append("")
    rows += [
        "| per-test create, ms | CreateBranch RPC p50 / p95 / p99 | create-to-first-query "
        "p50 / p95 / p99 | connect, query p50 | daemon build p50 | creates |",
        "|---|---|---|---|---|---|",
    ]
    for key, label in MODES:
        m = results.get(key)
        if not m:
            continue
        if "error" in m:
            rows.append(f"| {label} | failed: {m['error'][:80]} | | | | |")
            continue
        counted = f"{m['counted_n']} of {m['n']} warm" if key == "frozen_warm" else str(m["n"])
        rows.append(
            f"| {label} | {_trio(m['rpc'])} | {_trio(m['first_query'])} | "
            f"{m['connect'].get('median_ms', 0):.1f}, {m['query'].get('median_ms', 0):.1f} | "
            f"{m['daemon_steps_ms'].get('total', 0):.1f} | {counted} |"
        )
    rows.append("")
    rows.append(
        f"load average (1, 5, 15 min) at start {results.get('load_start')}, "
        f"at end {results.get('load_end')}; {results.get('started')} to "
        f"{results.get('ended')}"
    )
    return "\n".join(rows)


def write_json(results: dict[str, Any], path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(results, indent=1) + "\n")
    tmp.replace(path)


def _git_commit() -> str:
    proc = subprocess.run(
        ["git", "-C", str(REPO), "rev-parse", "HEAD"], capture_output=True, text=True, check=False
    )
    return proc.stdout.strip()


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument(
        "--scale",
        type=int,
        default=70,
        help="pgbench scale of the base (70 ~ 1.14 GB; 1 for a quick run)",
    )
    p.add_argument("--builds", type=int, default=5, help="template builds timed")
    p.add_argument("--runs", type=int, default=50, help="per-test creates per mode")
    p.add_argument(
        "--warm-gap",
        type=float,
        default=0.3,
        metavar="S",
        help="pause before each create (a test's own work; the warm pool refills)",
    )
    p.add_argument("--data-dir", type=Path, default=Path("/var/tmp/cowbranchd-bench-templates"))
    p.add_argument("--out", type=Path, default=REPO / "docs" / "bench-templates.json")
    p.add_argument(
        "--keep-image",
        action="store_true",
        help="keep the pool image (and its base) for the next run",
    )
    p.add_argument(
        "--remove",
        action="store_true",
        help="at the end, delete the whole data dir (source data included)",
    )
    args = p.parse_args(argv)
    if args.scale < 1 or args.builds < 1 or args.runs < 1:
        p.error("--scale, --builds and --runs must be positive")
    return args


def main(argv: list[str]) -> int:
    args = parse_args(argv)
    if os.geteuid() != 0:
        print(
            "run as root: it mounts a pool and starts postgres as the postgres user",
            file=sys.stderr,
        )
        return 2
    structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(logging.WARNING))
    signal.signal(signal.SIGTERM, signal.default_int_handler)
    results: dict[str, Any] = {
        "started": _utc(),
        "command": "python bench/templates.py " + " ".join(argv),
        "commit": _git_commit(),
        # Which daemon code ran: the checkout's, or one given by PYTHONPATH.
        "cowbranchd": str(Path(cowbranchd.__file__).parent),
        "host": {
            "cpus": os.cpu_count(),
            "postgres": ",".join(sorted(os.listdir("/usr/lib/postgresql"))),
            "psycopg": psycopg.__version__,
        },
        "settings": {
            "scale": args.scale,
            "builds": args.builds,
            "runs": args.runs,
            "warm_gap_s": args.warm_gap,
            "warm_branches": WARM,
            "driver": "btrfs",
        },
        "migration": {"sql": MIGRATION, "seeded_rows": SEEDED_ROWS},
        "first_query": FIRST_QUERY,
        "load_start": _load(),
    }

    def save() -> None:
        write_json(results, args.out)

    pool = None
    try:
        _say(f"source data scale {args.scale} under {args.data_dir / 'src'}")
        source, took = ensure_source(args.data_dir, args.scale, SOURCE_PORT)
        results["source"] = {"bytes": dir_bytes(source), "build_s": took}
        pool = open_pool("btrfs", args.data_dir)
        cold_phase(args, pool.root, source, results, save)
        warm_phase(args, pool.root, results, save)
    except KeyboardInterrupt:
        _say("interrupted: writing what was measured")
        results["interrupted"] = True
    finally:
        stop_postmasters_under(args.data_dir / "src")
        if pool is not None:
            left = stop_postmasters_under(pool.mountpoint)
            if left:
                _say(f"stopped leftover postmasters {left}")
                results["leftover_postmasters"] = left
            pool.release()
            if not args.keep_image:
                (args.data_dir / "btrfs.img").unlink(missing_ok=True)
                # The daemon's records were of that pool (its log stays).
                for kept in ("state", "pg", "run"):
                    shutil.rmtree(args.data_dir / "daemon-templates" / kept, ignore_errors=True)
        if args.remove:
            shutil.rmtree(args.data_dir, ignore_errors=True)
        results["load_end"] = _load()
        results["ended"] = _utc()
        save()
    print()
    print(render_table(results))
    print(f"\nwrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
