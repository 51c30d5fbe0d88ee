"""cowbranchd benchmark: branch create/delete latency at several data sizes on
btrfs and zfs-fuse, against what users do today, plus memory per branch.

    .venv/bin/python bench/run.py [--driver btrfs|zfs|both] [--sizes 7,70]
                                  [--runs 30] [--out bench/results] [--keep]

Run as root. Pools and pgbench bases persist under --data-dir between runs;
the daemons, postmasters, mounts and loop devices it made are gone when it
ends (unless --keep). Figures only: nothing here asserts on time.
See bench/README.md and docs/performance.md.
"""

from __future__ import annotations

import argparse
import datetime as dt
import hashlib
import json
import logging
import os
import platform
import signal
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import psycopg
import structlog
from _baselines import copy_and_start, template_database
from _daemon import BenchDaemon
from _data import base_id, dir_bytes, ensure_base, ensure_source
from _measure import (
    create_delete_series,
    density,
    from_branch_series,
    parallel_creates,
    reset_series,
    storm,
    warm_series,
)
from _pg import stop_postmasters_under
from _pools import open_pool
from _report import (
    breakdown,
    plot_breakdown,
    plot_latency,
    render_table,
    storm_figures,
    summary,
    write_json,
)

from cowbranchd.config import DaemonConfig

REPO = Path(__file__).resolve().parent.parent
BASELINE_PORT = 47900
DEFAULT_SIZES = "7,70"


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--driver", choices=("btrfs", "zfs", "both"), default="both")
    p.add_argument("--sizes", default=DEFAULT_SIZES,
                   help="pgbench scales, comma separated (7 ~ 100 MB, 70 ~ 1 GB, 700 ~ 10 GB; "
                        "700 is opt-in: building it takes long on a small machine)")
    p.add_argument("--runs", type=int, default=30, help="sequential create/delete pairs per size")
    p.add_argument("--parallel", type=int, default=20, help="creates issued at once")
    p.add_argument("--parallel-rounds", type=int, default=3)
    p.add_argument("--aux-runs", type=int, default=15,
                   help="branch-from-branch and reset runs per size (0 skips them)")
    p.add_argument("--baseline-runs", type=int, default=5)
    p.add_argument("--density-max", type=int, default=100,
                   help="at most this many idle branches in the density test (0 skips it)")
    p.add_argument("--storm", type=int, default=200, metavar="N",
                   help="CreateBranch calls released at once while another client reads "
                        "(smallest scale, once per driver; 0 skips it)")
    p.add_argument("--storm-rounds", type=int, default=2)
    p.add_argument("--skip-baselines", action="store_true")
    p.add_argument("--warm", type=int, default=0, metavar="N",
                   help="daemon.warm_branches: started clones kept per base (btrfs only)")
    p.add_argument("--warm-gap", type=float, default=0.3, metavar="S",
                   help="with --warm: pause before each create of the warm series (a test's "
                        "own work, during which the pool refills)")
    p.add_argument("--shared-uid", action="store_true",
                   help="postgres.branch_uids = \"\": no per-branch OS user (to measure "
                        "what isolation costs)")
    p.add_argument("--data-dir", type=Path, default=Path("/var/tmp/cowbranchd-bench"))
    p.add_argument("--out", type=Path, default=REPO / "bench" / "results")
    p.add_argument("--docs", type=Path, default=REPO / "docs",
                   help="where bench-results.json and the PNG plots go")
    p.add_argument("--replot", type=Path, metavar="RESULTS_JSON",
                   help="only print the table and redraw the plots from an earlier run's JSON")
    p.add_argument("--keep", action="store_true",
                   help="leave pools mounted (the daemon and postmasters are stopped anyway)")
    args = p.parse_args(argv)
    args.scales = [int(s) for s in args.sizes.split(",") if s.strip()]
    args.drivers = ["btrfs", "zfs"] if args.driver == "both" else [args.driver]
    if args.runs < 1 or any(s < 1 for s in args.scales):
        p.error("--runs and --sizes must be positive")
    return args


def _say(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", flush=True)


def _took(seconds: float | None) -> str:
    return "reused" if seconds is None else f"built in {seconds:.0f} s"


def _git_state() -> dict[str, str]:
    """The commit and the uncommitted files under src/: which daemon code was measured."""
    def git(*argv: str) -> str:
        proc = subprocess.run(["git", "-C", str(REPO), *argv], capture_output=True, text=True,
                              check=False)
        return proc.stdout.strip()

    return {"commit": git("rev-parse", "HEAD"),
            "dirty_src": git("status", "--porcelain", "src"),
            "src_diff_sha1": hashlib.sha1(git("diff", "HEAD", "--", "src").encode()).hexdigest()}


def _pg_version() -> str:
    return ",".join(sorted(os.listdir("/usr/lib/postgresql")))


def bench_driver(args: argparse.Namespace, driver: str, sources: dict[int, Path],
                 results: dict[str, Any], save: Any) -> None:
    pool = open_pool(driver, args.data_dir)
    out: dict[str, Any] = results["drivers"].setdefault(driver, {})
    for note in pool.notes:
        _say(f"{driver}: {note}")
    daemon = BenchDaemon(
        driver, pool.root, args.data_dir, warm_branches=args.warm, isolation=not args.shared_uid
    )
    try:
        daemon.start()
        _say(f"{driver}: daemon serving on {daemon.socket_path}")
        for scale in args.scales:
            r: dict[str, Any] = out.setdefault(str(scale), {})
            size, took = ensure_base(daemon, scale, sources[scale])
            r["base"] = {"id": base_id(scale), "size_bytes": size, "create_base_s": took}
            _say(f"{driver} s{scale}: base {_took(took)}")
            parent = f"bases/{base_id(scale)}"
            # Others may share this machine: the load says how quiet it was.
            r["load_before"] = os.getloadavg()
            series = create_delete_series(daemon, parent, args.runs)
            r["create"] = summary(series.ready())
            r["create_rpc"] = summary(c.rpc_s for c in series.creates)
            r["create_verify"] = summary(c.verify_s for c in series.creates)
            r["delete"] = summary(series.deletes)
            _say(f"{driver} s{scale}: create median {r['create']['median_ms']} ms, "
                 f"delete median {r['delete']['median_ms']} ms")
            created = {e["branch"]: e for e in daemon.events("branch_created")}
            started = {}
            for e in daemon.events("postgres started"):
                parts = str(e.get("pgdata", "")).split("/")
                if "branches" in parts and parts.index("branches") + 1 < len(parts):
                    started[parts[parts.index("branches") + 1]] = e
            r["breakdown"] = breakdown(
                created, started, {c.branch_id: (c.rpc_s, c.verify_s) for c in series.creates}
            )
            deleted = {e["branch"]: float(e["ms_total"]) for e in daemon.events("branch_deleted")}
            daemon_delete = [deleted[c.branch_id] for c in series.creates if c.branch_id in deleted]
            r["delete_daemon_median_ms"] = (
                round(statistics.median(daemon_delete), 2) if daemon_delete else None
            )
            save()
            if args.warm > 0:
                r["warm"] = bench_warm(daemon, parent, args.runs, args.warm_gap)
                w = r["warm"]
                _say(f"{driver} s{scale}: warm hand-out ({w['warm_n']} of {w['n']} warm) RPC "
                     f"p50 {w['rpc']['median_ms']} ms, create-to-first-query p50 "
                     f"{w['ready']['median_ms']} ms; steps {w['steps_ms']}")
                save()
            rounds = parallel_creates(daemon, parent, args.parallel, args.parallel_rounds)
            r["parallel"] = {
                "width": args.parallel,
                "wall": summary(x.wall_s for x in rounds),
                "each": summary(t.ready_s for x in rounds for t in x.each),
                "delete_wall": summary(x.delete_wall_s for x in rounds),
                "rounds": [{"wall_ms": round(x.wall_s * 1000, 1), "ready": len(x.each),
                            "failed": x.failed} for x in rounds],
                "all_ready": all(len(x.each) == args.parallel for x in rounds),
            }
            _say(f"{driver} s{scale}: {args.parallel} parallel, wall per round "
                 + ", ".join(f"{x.wall_s * 1000:.0f} ms ({len(x.each)} ready"
                             + (f", failed {x.failed}" if x.failed else "") + ")"
                             for x in rounds))
            if args.aux_runs > 0:
                bfb = from_branch_series(daemon, parent, args.aux_runs)
                r["from_branch"] = {"create": summary(bfb.ready()),
                                    "delete": summary(bfb.deletes)}
                resets = reset_series(daemon, parent, args.aux_runs)
                r["reset"] = {"rpc": summary(a for a, _ in resets),
                              "ready": summary(a + b for a, b in resets)}
                _say(f"{driver} s{scale}: branch-from-branch median "
                     f"{r['from_branch']['create']['median_ms']} ms, reset median "
                     f"{r['reset']['ready']['median_ms']} ms")
            r["load_after"] = os.getloadavg()
            save()
        if args.storm > 0:
            bench_storm(args, daemon, out, save)
        if args.density_max > 0:
            scale = min(args.scales)

            def progress(n: int, ready_s: float) -> None:
                if n % 10 == 0:
                    _say(f"{driver}: density {n} branches, last create {ready_s * 1000:.0f} ms")

            d = density(daemon, f"bases/{base_id(scale)}", args.density_max,
                        on_progress=progress)
            rss = [m["rss_mib"] for m in d.memory_samples]
            pss = [m["pss_mib"] for m in d.memory_samples]
            out["density"] = {
                "scale": scale,
                "created": d.created,
                "stopped_because": d.stopped_because,
                "create_ms": [round(x, 2) for x in d.create_ms],
                "first5_median_ms": round(statistics.median(d.create_ms[:5]), 2),
                "last5_median_ms": round(statistics.median(d.create_ms[-5:]), 2),
                "idle_branch_rss_mib_median": round(statistics.median(rss), 1) if rss else None,
                "idle_branch_pss_mib_median": round(statistics.median(pss), 1) if pss else None,
                "processes_per_branch": d.memory_samples[0]["processes"]
                if d.memory_samples else None,
                "mem_available_drop_mib_per_branch": round(d.mem_available_drop_mib_per_branch, 1),
            }
            _say(f"{driver}: density {d.created} branches ({d.stopped_because}); idle branch "
                 f"RSS {out['density']['idle_branch_rss_mib_median']} MiB, PSS "
                 f"{out['density']['idle_branch_pss_mib_median']} MiB")
            save()
    finally:
        daemon.stop()
        leftovers = stop_postmasters_under(pool.mountpoint)
        if leftovers:
            _say(f"{driver}: stopped leftover postmasters {leftovers}")
        if not args.keep:
            pool.release()
            _say(f"{driver}: pool released (images kept in {args.data_dir})")


def bench_warm(daemon: BenchDaemon, parent: str, runs: int, gap_s: float) -> dict[str, Any]:
    """Creates that find a warm clone ready: the client's figures over the
    creates the daemon logged `warm`, and the median ms of each hand-out step
    (the daemon's `branch_created` ms_* fields; the servicer's `rpc` ms; the
    rest of the client's RPC time is gRPC itself)."""
    series = warm_series(daemon, parent, runs, gap_s)
    created = {e["branch"]: e for e in daemon.events("branch_created")}
    served = {e["branch_id"]: float(e["ms"]) for e in daemon.events("rpc")
              if e.get("method") == "CreateBranch" and "branch_id" in e}
    warm = [c for c in series.creates if created.get(c.branch_id, {}).get("warm")]
    steps: dict[str, list[float]] = {}
    for c in warm:
        line = created[c.branch_id]
        for key, value in line.items():
            if key.startswith("ms_") and key not in ("ms_clone", "ms_start"):
                steps.setdefault(key[3:], []).append(float(value))
        if c.branch_id in served:
            steps.setdefault("servicer_after_build", []).append(
                served[c.branch_id] - float(line["ms_total"]))
            steps.setdefault("grpc_transport", []).append(c.rpc_s * 1000 - served[c.branch_id])
        steps.setdefault("client_select1", []).append(c.verify_s * 1000)
    return {
        "gap_s": gap_s,
        "n": len(series.creates),
        "warm_n": len(warm),
        "rpc": summary(c.rpc_s for c in warm),
        "ready": summary(c.ready_s for c in warm),
        "verify": summary(c.verify_s for c in warm),
        "delete": summary(series.deletes),
        "steps_ms": {k: round(statistics.median(v), 2) for k, v in steps.items()},
        "load": os.getloadavg(),
    }


def bench_storm(args: argparse.Namespace, daemon: BenchDaemon, out: dict[str, Any],
                save: Any) -> None:
    """`--storm` creates at once, `--storm-rounds` times, on the smallest scale."""
    scale = min(args.scales)
    defaults = DaemonConfig()
    s: dict[str, Any] = out.setdefault("storm", {
        "scale": scale,
        "width": args.storm,
        "max_concurrent_writes": defaults.max_concurrent_writes,
        "max_queued_writes": defaults.max_queued_writes,
        "rounds": [],
    })
    for n in range(args.storm_rounds):
        load = os.getloadavg()
        result = storm(daemon, f"bases/{base_id(scale)}", args.storm)
        figures = storm_figures(result)
        figures["load_before"] = load
        s["rounds"].append(figures)
        save()
        d = figures["during"]
        _say(f"{daemon.driver}: storm {n + 1}/{args.storm_rounds}: {figures['outcomes']} "
             f"in {figures['wall_ms']:.0f} ms; GetBranch p50/p99/max "
             f"{d['get']['median_ms']}/{d['get']['p99_ms']}/{d['get']['max_ms']} ms, "
             f"health max {d['health']['max_ms']} ms, list max {d['list']['max_ms']} ms")


def bench_baselines(args: argparse.Namespace, scale: int, source: Path,
                    results: dict[str, Any]) -> None:
    work = args.data_dir / "baseline"
    b: dict[str, Any] = results["sizes"][str(scale)].setdefault("baselines", {})
    # Each run at ~10 GB copies ~10 GB: three are enough to see where it stands.
    runs = min(args.baseline_runs, 3) if scale >= 700 else args.baseline_runs
    b["runs"] = runs
    b["load_before"] = os.getloadavg()
    try:
        cp = copy_and_start(source, work, BASELINE_PORT, runs)
        b["copy_and_start"] = summary(cp["ready"])
        b["copy_and_start_steps"] = {k: summary(v) for k, v in cp.items() if k != "ready"}
        tpl = template_database(source, work, BASELINE_PORT, runs)
        b["template_wal_log"] = summary(tpl["WAL_LOG"]["ready"])
        b["template_wal_log_drop"] = summary(tpl["WAL_LOG"]["drop"])
        b["template_file_copy"] = summary(tpl["FILE_COPY"]["ready"])
        b["template_file_copy_drop"] = summary(tpl["FILE_COPY"]["drop"])
    finally:
        stop_postmasters_under(work)
    _say(f"baselines s{scale}: TEMPLATE {b['template_wal_log']['median_ms']:.0f} ms, "
         f"FILE_COPY {b['template_file_copy']['median_ms']:.0f} ms, "
         f"cp -a + start {b['copy_and_start']['median_ms']:.0f} ms")


def add_ratios(results: dict[str, Any]) -> None:
    for per_scale in results["drivers"].values():
        for scale, r in per_scale.items():
            base = results["sizes"].get(scale, {}).get("baselines", {})
            if "create" not in r or not base:
                continue
            mine = r["create"]["median_ms"]
            r["ratios"] = {k: round(base[k]["median_ms"] / mine, 1)
                           for k in ("template_wal_log", "template_file_copy", "copy_and_start")
                           if k in base}


def replot(args: argparse.Namespace) -> int:
    results = json.loads(args.replot.read_text())
    try:
        plot_latency(results, args.docs / "bench-latency.png")
        plot_breakdown(results, args.docs / "bench-breakdown.png")
    except ImportError:
        print("matplotlib is not installed: no plots (pip install matplotlib)",
              file=sys.stderr)
    print(render_table(results))
    return 0


def main(argv: list[str]) -> int:
    args = parse_args(argv)
    if args.replot is not None:
        return replot(args)
    if os.geteuid() != 0:
        print("run as root: it mounts pools and starts postgres as the postgres user",
              file=sys.stderr)
        return 2
    # The pool helpers log each command at debug level; only warnings matter here.
    structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(logging.WARNING))
    # SIGTERM unwinds like Ctrl-C, so every finally block cleans up.
    signal.signal(signal.SIGTERM, signal.default_int_handler)
    stamp = dt.datetime.now(dt.UTC).strftime("%Y%m%dT%H%M%SZ")
    results: dict[str, Any] = {
        "started": stamp,
        "command": "python bench/run.py " + " ".join(argv),
        "host": {"cpus": os.cpu_count(), "kernel": platform.release(),
                 "python": platform.python_version(), "postgres": _pg_version(),
                 "psycopg": psycopg.__version__},
        "settings": {k: str(v) for k, v in vars(args).items()},
        "git": _git_state(),
        "sizes": {},
        "drivers": {},
    }
    out_json = args.out / f"{stamp}.json"

    def save() -> None:
        add_ratios(results)
        write_json(results, out_json)

    try:
        sources: dict[int, Path] = {}
        for scale in args.scales:
            _say(f"source data scale {scale}: checking {args.data_dir / 'src'}")
            source, took = ensure_source(args.data_dir, scale, BASELINE_PORT)
            sources[scale] = source
            results["sizes"][str(scale)] = {"bytes": dir_bytes(source), "build_s": took}
            _say(f"source data scale {scale}: {results['sizes'][str(scale)]['bytes'] / 1e6:.0f} "
                 f"MB, {_took(took)}")
        for driver in args.drivers:
            bench_driver(args, driver, sources, results, save)
        if not args.skip_baselines:
            for scale in args.scales:
                bench_baselines(args, scale, sources[scale], results)
                save()
    except KeyboardInterrupt:
        _say("interrupted: writing what was measured")
        results["interrupted"] = True
    finally:
        stop_postmasters_under(args.data_dir / "src")
        stop_postmasters_under(args.data_dir / "baseline")
        save()
        write_json(results, args.docs / "bench-results.json")
        try:
            plot_latency(results, args.docs / "bench-latency.png")
            plot_breakdown(results, args.docs / "bench-breakdown.png")
        except ImportError:
            print("matplotlib is not installed: no plots (pip install matplotlib)",
                  file=sys.stderr)
    print()
    print(render_table(results))
    print(f"\nwrote {out_json}, {args.docs / 'bench-results.json'}, "
          f"{args.docs / 'bench-latency.png'}, {args.docs / 'bench-breakdown.png'}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
