"""How cowbranchctl shows things: aligned tables, key/value blocks, sizes and
ages for people; the stable JSON documents for scripts.

Pure functions of values and a `now`, so the output is testable to the byte.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping, Sequence
from datetime import datetime
from typing import Any

from cowbranchd.client.types import Base, Branch, format_duration

__all__ = [
    "base_rows",
    "branch_details",
    "branch_rows",
    "format_age",
    "format_bytes",
    "format_labels",
    "key_values",
    "table",
    "to_json",
]


def table(headers: Sequence[str], rows: Iterable[Sequence[str]]) -> str:
    """Columns left-aligned to their widest cell, two spaces apart, no trailing blanks."""
    all_rows = [list(headers), *(list(r) for r in rows)]
    widths = [max(len(r[i]) for r in all_rows) for i in range(len(headers))]
    lines = [
        "  ".join(cell.ljust(w) for cell, w in zip(r, widths, strict=True)).rstrip()
        for r in all_rows
    ]
    return "\n".join(lines)


def key_values(pairs: Sequence[tuple[str, str]]) -> str:
    """`key:  value` lines with the values aligned."""
    width = max((len(k) for k, _ in pairs), default=0) + 1
    return "\n".join(f"{(k + ':').ljust(width)}  {v}".rstrip() for k, v in pairs)


def to_json(document: Any) -> str:
    """The JSON text scripts read: indented, keys in a fixed order."""
    return json.dumps(document, indent=2, ensure_ascii=False)


def format_bytes(count: int) -> str:
    """`count` bytes in binary units: `0 B`, `512 B`, `1.5 KiB`, `2.0 GiB`."""
    value = float(count)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(value) < 1024 or unit == "TiB":
            return f"{int(value)} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    raise AssertionError("unreachable")


def format_age(then: datetime | None, now: datetime) -> str:
    """How long ago `then` was (`5m`, `2h3m`), `-` when unknown."""
    if then is None:
        return "-"
    return _coarse(now - then)


def _expires(then: datetime | None, now: datetime) -> str:
    if then is None:
        return "never"
    if then <= now:
        return "expired"
    return f"in {_coarse(then - now)}"


def _coarse(delta: Any) -> str:
    # Two units are plenty for people: `1d2h`, not `1d2h3m4s`.
    text = format_duration(delta)
    parts: list[str] = []
    number = ""
    for char in text:
        number += char
        if char.isalpha():
            parts.append(number)
            number = ""
    return "".join(parts[:2])


def format_labels(labels: Mapping[str, str]) -> str:
    """Labels as selector text `k=v,k2=v2`, sorted; `-` when none."""
    return ",".join(f"{k}={v}" for k, v in sorted(labels.items())) or "-"


BRANCH_HEADERS = (
    "BRANCH",
    "STATE",
    "PARENT",
    "OWNER",
    "PORT",
    "AGE",
    "EXPIRES",
    "WRITTEN",
    "LABELS",
)


def branch_rows(branches: Iterable[Branch], now: datetime) -> list[list[str]]:
    """One table row per branch, under BRANCH_HEADERS."""
    return [
        [
            b.branch_id + (" (protected)" if b.protected else ""),
            b.state,
            b.parent,
            b.owner,
            str(b.port) if b.port else "-",
            format_age(b.create_time, now),
            _expires(b.expire_time, now),
            format_bytes(b.written_bytes),
            format_labels(b.labels),
        ]
        for b in branches
    ]


def branch_details(branch: Branch, now: datetime) -> list[tuple[str, str]]:
    """The key/value block `show` and `create` print for one branch."""
    pairs = [
        ("name", branch.name),
        ("state", branch.state),
        ("parent", branch.parent),
        ("owner", branch.owner),
        ("dsn", branch.dsn),
        ("host", branch.host),
        ("port", str(branch.port)),
        ("user", branch.user),
        ("database", branch.database),
        ("socket_dir", branch.socket_dir),
        ("labels", format_labels(branch.labels)),
        ("created", format_age(branch.create_time, now) + " ago" if branch.create_time else "-"),
        ("expires", _expires(branch.expire_time, now)),
        ("protected", "yes" if branch.protected else "no"),
        ("idle_suspend", format_duration(branch.idle_suspend) if branch.idle_suspend else "never"),
        ("frozen", "yes (a template: children clone its frozen data)" if branch.frozen else "no"),
        ("written", format_bytes(branch.written_bytes)),
    ]
    if branch.failure:
        pairs.append(("failure", branch.failure))
    return pairs


BASE_HEADERS = ("BASE", "PG", "LATEST", "VERSIONS", "BRANCHES", "SIZE", "AGE", "LABELS")


def base_rows(bases: Iterable[Base], now: datetime) -> list[list[str]]:
    """One table row per base, under BASE_HEADERS."""
    rows = []
    for base in bases:
        latest = base.latest_version
        rows.append(
            [
                base.base_id,
                str(base.pg_version),
                latest.name if latest else "-",
                str(len(base.versions)),
                str(sum(v.branch_count for v in base.versions)),
                format_bytes(base.size_bytes),
                format_age(base.create_time, now),
                format_labels(base.labels),
            ]
        )
    return rows


def base_details(base: Base, now: datetime) -> str:
    """The block `base show` prints: the base, then a table of its versions."""
    head = key_values(
        [
            ("name", base.name),
            ("pg_version", str(base.pg_version)),
            ("user", base.user),
            ("database", base.database),
            ("role", base.branch_role or base.user),
            ("roles", ", ".join(base.roles) or "-"),
            ("size", format_bytes(base.size_bytes)),
            ("created", format_age(base.create_time, now) + " ago" if base.create_time else "-"),
            ("labels", format_labels(base.labels)),
        ]
    )
    versions = table(
        ("VERSION", "AGE", "BRANCHES"),
        [
            [v.name, format_age(v.create_time, now), str(v.branch_count)]
            for v in sorted(base.versions, key=lambda v: v.version)
        ],
    )
    return f"{head}\n\n{versions}"
