"""Plain-text rendering of the status report (imported only when a human asked for it)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any


def _mib(n: int | None) -> str:
    return "-" if n is None else f"{n / (1024 * 1024):.1f} MiB"


def table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    cells = [[str(h) for h in headers]] + [["-" if c is None else str(c) for c in r] for r in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() for r in cells]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join("  " + line for line in lines) + "\n"


def pairs(rows: Sequence[tuple[str, Any]]) -> str:
    width = max((len(k) for k, _ in rows), default=0)
    return "".join(f"  {k.ljust(width)}  {v}\n" for k, v in rows)


def render(report: dict[str, Any]) -> str:
    out: list[str] = []
    health = "HEALTHY" if report["healthy"] else "UNHEALTHY"
    out.append(f"edge-agent status: {health}\n")
    for problem in report.get("problems", []):
        out.append(f"  ! {problem}\n")
    d = report.get("daemon", {})
    a = report.get("agent", {})
    out.append("\nDaemon\n")
    rows = [("state", d.get("state")), ("pid", d.get("pid")), ("version", d.get("version")),
            ("started", d.get("started_at")), ("last heartbeat", d.get("heartbeat_at")),
            ("heartbeat age", f"{d['heartbeat_age_s']} s" if "heartbeat_age_s" in d else None),
            ("doing", d.get("status_text")), ("node id", a.get("node_id")),
            ("state dir", a.get("state_dir")), ("database", _mib(a.get("db_bytes"))),
            ("disk free", f"{_mib(a.get('disk_free_bytes'))} of {_mib(a.get('disk_total_bytes'))}")]
    out.append(pairs([r for r in rows if r[1] is not None]))
    for title, key, cols in EXTRA_TABLES:
        items = report.get(key)
        if items:
            out.append(f"\n{title}\n")
            out.append(table([c for c, _ in cols], [[item.get(k) for _, k in cols] for item in items]))
    return "".join(out)


# (title, report key, [(column header, item key)]) — subsystems add their lists here
EXTRA_TABLES: list[tuple[str, str, list[tuple[str, str]]]] = [
    ("Links", "links", [("link", "name"), ("state", "state"), ("since", "since"), ("detail", "detail")]),
    ("Recent errors", "errors", [("at", "at"), ("component", "component"), ("code", "code"),
                                 ("message", "message")]),
]
