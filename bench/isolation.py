#!/usr/bin/env python3
"""What one OS user per branch costs a create, without the drift between runs.

Two daemons, each on a pool of its own with the same 1 GB base: one with
per-branch uids (idmapped mounts, the default), one with `branch_uids = ""`
(every postmaster the shared postgres user). Creates alternate between them
one by one (the order swapped every pair), each followed by connect +
`SELECT 1` and a delete, so a slow stretch of the machine hits both sides of
a pair. Reports the medians and the median of the paired differences.

    .venv/bin/python bench/isolation.py --scale 70 --pairs 60
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from _daemon import BenchDaemon
from _data import base_id, ensure_base, ensure_source
from _measure import create, delete, new_branch_id
from _pools import open_pool


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--scale", type=int, default=70)
    p.add_argument("--pairs", type=int, default=60)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--data-dir", type=Path, default=Path("/var/tmp/cowbranchd-bench"))
    p.add_argument("--swap", action="store_true",
                   help="the shared-uid daemon on the first pool and the isolated one on the "
                        "second (run both ways to tell the pools apart from the modes)")
    p.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "results")
    args = p.parse_args()

    shared_dir = Path(f"{args.data_dir}-shared-uid")
    source, _ = ensure_source(args.data_dir, args.scale, port=55433)
    copy = shared_dir / "src" / source.name
    if not copy.exists():
        copy.parent.mkdir(parents=True, exist_ok=True)
        subprocess.run(["cp", "-a", str(source), str(copy)], check=True)
    pools = [open_pool("btrfs", args.data_dir), open_pool("btrfs", shared_dir)]
    first, second = (1, 0) if args.swap else (0, 1)
    dirs = [args.data_dir, shared_dir]
    daemons = {
        "uid": BenchDaemon("btrfs", pools[first].root, dirs[first], isolation=True),
        "shared": BenchDaemon("btrfs", pools[second].root, dirs[second], isolation=False),
    }
    sources = {"uid": [source, copy][first], "shared": [source, copy][second]}
    samples: dict[str, dict[str, list[float]]] = {
        mode: {"create_ms": [], "rpc_ms": []} for mode in daemons
    }
    try:
        for mode, daemon in daemons.items():
            daemon.start()
            ensure_base(daemon, args.scale, sources[mode])
        parent = f"bases/{base_id(args.scale)}"
        for n in range(args.warmup + args.pairs):
            order = ["uid", "shared"] if n % 2 == 0 else ["shared", "uid"]
            for mode in order:
                timing = create(daemons[mode], parent, new_branch_id(f"iso-{mode}"))
                delete(daemons[mode], timing.branch_id)
                if n >= args.warmup:
                    samples[mode]["create_ms"].append(timing.ready_s * 1000)
                    samples[mode]["rpc_ms"].append(timing.rpc_s * 1000)
        median = statistics.median
        results: dict[str, Any] = {
            "scale": args.scale, "pairs": args.pairs, "swap": args.swap, "samples": samples
        }
        for key in ("create_ms", "rpc_ms"):
            pairs = zip(samples["uid"][key], samples["shared"][key], strict=True)
            diffs = [u - s for u, s in pairs]
            results[key] = {
                "uid_median": round(median(samples["uid"][key]), 2),
                "shared_median": round(median(samples["shared"][key]), 2),
                "median_paired_difference": round(median(diffs), 2),
            }
            print(f"{key}: {results[key]}")
        with open("/proc/loadavg") as fh:
            results["loadavg_after"] = fh.read().split()[:3]
        args.out.mkdir(parents=True, exist_ok=True)
        out = args.out / f"isolation-{time.strftime('%Y%m%dT%H%M%SZ', time.gmtime())}.json"
        out.write_text(json.dumps(results, indent=2))
        print(f"wrote {out}")
    finally:
        for daemon in daemons.values():
            daemon.stop()
        for pool in pools:
            pool.release()
    return 0


if __name__ == "__main__":
    sys.exit(main())
