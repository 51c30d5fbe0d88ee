"""Figures out of samples: summaries, the per-step breakdown from the daemon's
log lines, the printed table, the JSON file and the PNG plots."""

from __future__ import annotations

import json
import math
import statistics
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

from _measure import StormResult

__all__ = [
    "breakdown",
    "plot_breakdown",
    "plot_latency",
    "render_table",
    "storm_figures",
    "summary",
    "write_json",
]


def _percentile(ordered: Sequence[float], pct: float) -> float:
    """Nearest-rank percentile (with 30 samples, p99 is the maximum)."""
    rank = max(1, math.ceil(pct / 100 * len(ordered)))
    return ordered[rank - 1]


def summary(seconds: Iterable[float]) -> dict[str, Any]:
    """median/p95/p99/min/max in milliseconds, and the samples themselves."""
    ms = [s * 1000 for s in seconds]
    if not ms:
        return {"n": 0}
    ordered = sorted(ms)
    return {
        "n": len(ms),
        "median_ms": round(statistics.median(ms), 2),
        "p95_ms": round(_percentile(ordered, 95), 2),
        "p99_ms": round(_percentile(ordered, 99), 2),
        "min_ms": round(ordered[0], 2),
        "max_ms": round(ordered[-1], 2),
        "samples_ms": [round(x, 2) for x in ms],
    }


def storm_figures(result: StormResult) -> dict[str, Any]:
    """The JSON figures of one storm: outcomes, latencies of the accepted and
    the refused creates, and of each read during the storm and just before."""
    return {
        "wall_ms": round(result.wall_s * 1000, 1),
        "outcomes": result.outcomes(),
        "messages": result.messages(),
        "accepted": summary(result.seconds("READY")),
        "refused": summary(result.seconds("UNAVAILABLE")),
        "during": {k: summary(v) for k, v in result.during.times.items()},
        "during_errors": dict(result.during.errors),
        "idle": {k: summary(v) for k, v in result.idle.times.items()},
        "idle_errors": dict(result.idle.errors),
        "delete_wall_ms": round(result.delete_wall_s * 1000, 1),
        "deleted": result.deleted,
        "delete_failures": result.delete_failures,
    }


def _median(values: list[float]) -> float | None:
    return round(statistics.median(values), 2) if values else None


def breakdown(
    created: Mapping[str, Mapping[str, Any]],
    started: Mapping[str, Mapping[str, Any]],
    client: Mapping[str, tuple[float, float]],
) -> dict[str, float | None]:
    """Median ms per create step, over the branches in `client`.

    `created`: the daemon's branch_created line per branch id; `started`: its
    `postgres started` line per branch id; `client`: (rpc s, verify s).
    """
    steps: dict[str, list[float]] = {k: [] for k in (
        "source", "clone", "prepare", "spawn", "postgres_boot", "daemon_select1",
        "metadata_ready", "daemon_total", "grpc_overhead", "client_select1", "client_total")}
    for branch_id, (rpc_s, verify_s) in client.items():
        c = created.get(branch_id)
        if c is None:
            continue
        total = float(c["ms_total"])
        steps["source"].append(float(c["ms_source"]))
        steps["clone"].append(float(c["ms_clone"]))
        steps["metadata_ready"].append(
            total - float(c["ms_source"]) - float(c["ms_clone"]) - float(c["ms_start"])
        )
        steps["daemon_total"].append(total)
        steps["grpc_overhead"].append(rpc_s * 1000 - total)
        steps["client_select1"].append(verify_s * 1000)
        steps["client_total"].append((rpc_s + verify_s) * 1000)
        s = started.get(branch_id)
        if s is not None:
            steps["prepare"].append(float(c["ms_start"]) - float(s["select1_ms"]))
            steps["spawn"].append(float(s["spawn_ms"]))
            steps["postgres_boot"].append(float(s["pidfile_ready_ms"]) - float(s["spawn_ms"]))
            steps["daemon_select1"].append(float(s["select1_ms"]) - float(s["pidfile_ready_ms"]))
    return {k: _median(v) for k, v in steps.items()}


STEP_LABELS = {
    "source": "resolve parent / snapshot",
    "clone": "port + clone (+ sidecar / zfs clone)",
    "prepare": "prepare_clone, binaries, socket dir",
    "spawn": "spawn postgres (Popen)",
    "postgres_boot": "postgres boot until postmaster.pid 'ready'",
    "daemon_select1": "daemon's SELECT 1 (TCP + SCRAM)",
    "metadata_ready": "write state=ready metadata",
    "grpc_overhead": "gRPC + servicer (RPC time - daemon total)",
    "client_select1": "client connect + SELECT 1 (TCP + SCRAM)",
}


def render_table(results: Mapping[str, Any]) -> str:
    lines: list[str] = []
    head = (f"{'driver':8} {'scale':>5} {'size':>8} | {'create med':>10} {'p95':>7} {'p99':>7}"
            f" | {'delete med':>10} {'p95':>7} | {'20 par':>7} | {'b-f-b':>7} | {'reset':>7}"
            f" | {'x TEMPLATE':>10} {'x cp+start':>10}")
    lines += [head, "-" * len(head)]
    sizes = results.get("sizes", {})
    for driver, per_scale in results.get("drivers", {}).items():
        for scale, r in per_scale.items():
            if "create" not in r:
                continue
            size_mb = sizes.get(scale, {}).get("bytes", 0) / 1e6
            c, d = r["create"], r["delete"]
            par = r.get("parallel", {}).get("wall", {}).get("median_ms")
            bfb = r.get("from_branch", {}).get("create", {}).get("median_ms")
            reset = r.get("reset", {}).get("ready", {}).get("median_ms")
            ratios = r.get("ratios", {})

            def f(x: object, fmt: str = "7.1f") -> str:
                return format(x, fmt) if isinstance(x, int | float) else "-".rjust(7)

            lines.append(
                f"{driver:8} {scale:>5} {size_mb:7.0f}M | {c['median_ms']:10.1f}"
                f" {c['p95_ms']:7.1f} {c['p99_ms']:7.1f} | {d['median_ms']:10.1f}"
                f" {d['p95_ms']:7.1f} | {f(par)} | {f(bfb)} | {f(reset)}"
                f" | {f(ratios.get('template_wal_log'), '9.0f')}x"
                f" {f(ratios.get('copy_and_start'), '9.0f')}x"
            )
    lines += _parallel_lines(results)
    lines += _storm_lines(results)
    lines.append("")
    lines.append("baselines (host ext4, median ms):")
    for scale, s in sizes.items():
        b = s.get("baselines", {})
        if not b:
            continue
        parts = [f"  scale {scale:>4} ({s['bytes'] / 1e6:.0f} MB):"]
        for key, label in (("template_wal_log", "TEMPLATE WAL_LOG"),
                           ("template_file_copy", "TEMPLATE FILE_COPY"),
                           ("copy_and_start", "cp -a + start")):
            if key in b:
                parts.append(f"{label} {b[key]['median_ms']:.0f}")
        lines.append("  ".join(parts))
    lines.append("")
    lines.append("where create time goes (median ms per step; daemon log + client clock):")
    for driver, per_scale in results.get("drivers", {}).items():
        for scale, r in per_scale.items():
            bd = r.get("breakdown")
            if not bd:
                continue
            lines.append(f"  {driver} scale {scale}: " + ", ".join(
                f"{k}={v}" for k, v in bd.items() if v is not None))
    return "\n".join(lines)


def _parallel_lines(results: Mapping[str, Any]) -> list[str]:
    lines: list[str] = []
    for driver, per_scale in results.get("drivers", {}).items():
        for scale, r in per_scale.items():
            par = r.get("parallel", {})
            if not par.get("rounds"):
                continue
            rounds = ", ".join(
                f"{x['wall_ms']:.0f} ms ({x['ready']}/{par['width']} ready"
                + (f", failed {x['failed']}" if x["failed"] else "") + ")"
                for x in par["rounds"])
            lines.append(f"  {driver} scale {scale}: {rounds}")
    if lines:
        lines.insert(0, "\nparallel creates released at once, per round (wall until all answered):")
    return lines


def _storm_lines(results: Mapping[str, Any]) -> list[str]:
    lines: list[str] = []
    for driver, per_scale in results.get("drivers", {}).items():
        st = per_scale.get("storm")
        if not st or not st.get("rounds"):
            continue
        lines.append(
            f"\nstorm, {driver} scale {st['scale']}: {st['width']} CreateBranch at once (daemon: "
            f"{st['max_concurrent_writes']} running + {st['max_queued_writes']} queued), one "
            f"client (own process) looping GetBranch, ListBranches(page_size=5), health Check:")
        for n, x in enumerate(st["rounds"], 1):
            outcomes = ", ".join(f"{v} {k}" for k, v in sorted(x["outcomes"].items()))
            acc, ref = x["accepted"], x["refused"]
            line = f"  #{n}: {outcomes}; all answered in {x['wall_ms']:.0f} ms"
            if acc.get("n"):
                line += f"; accepted p50 {acc['median_ms']:.0f} p99 {acc['p99_ms']:.0f} ms"
            if ref.get("n"):
                line += f"; refused p50 {ref['median_ms']:.1f} max {ref['max_ms']:.0f} ms"
            lines.append(line)
            for kind, label in (("get", "GetBranch"), ("list", "ListBranches"),
                                ("health", "health")):
                d, i = x["during"][kind], x["idle"][kind]
                if not d.get("n"):
                    continue
                lines.append(
                    f"      {label:12} during p50 {d['median_ms']:6.1f}  p99 {d['p99_ms']:6.1f}"
                    f"  max {d['max_ms']:6.1f} ms (n={d['n']}); idle p50 "
                    f"{i.get('median_ms', '-')} ms")
            if x["during_errors"]:
                lines.append(f"      read errors during the storm: {x['during_errors']}")
    return lines


def write_json(results: Mapping[str, Any], *paths: Path) -> None:
    text = json.dumps(results, indent=1, sort_keys=True)
    for path in paths:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text + "\n")


def plot_latency(results: Mapping[str, Any], path: Path) -> None:
    """Median time to a usable database vs data size, log-log, one line per method."""
    # matplotlib is optional (only the plots need it): imported here, not at the top.
    import matplotlib  # noqa: PLC0415

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # noqa: PLC0415

    sizes = results.get("sizes", {})
    series: dict[str, list[tuple[float, float, float]]] = {}
    names = {"btrfs": "cowbranchd, btrfs", "zfs": "cowbranchd, zfs-fuse"}
    for driver, per_scale in results.get("drivers", {}).items():
        for scale, r in per_scale.items():
            if "create" in r and scale in sizes:
                series.setdefault(names.get(driver, driver), []).append(
                    (sizes[scale]["bytes"] / 1e6, r["create"]["median_ms"], r["create"]["p99_ms"])
                )
    for key, label in (("template_wal_log", "CREATE DATABASE TEMPLATE (WAL_LOG)"),
                       ("template_file_copy", "CREATE DATABASE TEMPLATE (FILE_COPY)"),
                       ("copy_and_start", "cp -a + postgres start")):
        for s in sizes.values():
            b = s.get("baselines", {}).get(key)
            if b:
                series.setdefault(label, []).append(
                    (s["bytes"] / 1e6, b["median_ms"], b["p99_ms"]))
    fig, ax = plt.subplots(figsize=(8, 5))
    for label, points in series.items():
        points.sort()
        xs, meds, p99 = zip(*points, strict=True)
        line = ax.plot(xs, meds, marker="o", label=label)[0]
        ax.scatter(xs, p99, marker="_", s=120, color=line.get_color())
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.axhline(60, color="grey", linestyle="--", linewidth=0.8)
    ax.text(0.01, 62, "target (btrfs): median 60 ms", color="grey", fontsize=8,
            transform=ax.get_yaxis_transform())
    ax.set_xlabel("data directory size (MB, pgbench data)")
    ax.set_ylabel("time until SELECT 1 answers (ms); dash = p99")
    ax.set_title("New writable database: cowbranchd vs what users do today")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_breakdown(results: Mapping[str, Any], path: Path) -> None:
    """Stacked median ms per create step, one bar per driver and size."""
    # matplotlib is optional (only the plots need it): imported here, not at the top.
    import matplotlib  # noqa: PLC0415

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # noqa: PLC0415

    bars: list[tuple[str, Mapping[str, float | None]]] = []
    for driver, per_scale in results.get("drivers", {}).items():
        for scale, r in per_scale.items():
            if r.get("breakdown"):
                bars.append((f"{driver}\ns{scale}", r["breakdown"]))
    if not bars:
        return
    fig, ax = plt.subplots(figsize=(10, 5))
    bottoms = [0.0] * len(bars)
    for key, label in STEP_LABELS.items():
        heights = [max(0.0, float(b.get(key) or 0.0)) for _, b in bars]
        ax.bar([name for name, _ in bars], heights, bottom=bottoms, label=label)
        bottoms = [x + h for x, h in zip(bottoms, heights, strict=True)]
    ax.set_ylabel("ms (median of each step)")
    ax.set_title("Where create-to-ready time goes")
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
