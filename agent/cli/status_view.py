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


def _wear(wear: dict[str, Any] | None) -> str | None:
    if not wear:
        return None
    recent = wear.get("recent_bytes_per_day")
    per_day = recent if recent is not None else wear.get("bytes_per_day", 0)
    return f"{_mib(int(per_day))}/day ({_mib(int(wear.get('written_bytes', 0)))} since start)"


def render(report: dict[str, Any]) -> str:
    out: list[str] = []
    health = "HEALTHY" if report["healthy"] else "UNHEALTHY"
    warnings = report.get("warnings", [])
    note = f" ({len(warnings)} warning{'s' if len(warnings) != 1 else ''})" if warnings else ""
    out.append(f"edge-agent status: {health}{note}\n")
    for problem in report.get("problems", []):
        out.append(f"  ! {problem}\n")
    for warning in warnings:
        out.append(f"  ~ {warning}\n")
    d = report.get("daemon", {})
    a = report.get("agent", {})
    out.append("\nDaemon\n")
    rows = [("state", d.get("state")), ("pid", d.get("pid")), ("version", d.get("version")),
            ("started", d.get("started_at")), ("last heartbeat", d.get("heartbeat_at")),
            ("heartbeat age", f"{d['heartbeat_age_s']} s" if "heartbeat_age_s" in d else None),
            ("doing", d.get("status_text")), ("node id", a.get("node_id")),
            ("state dir", a.get("state_dir")), ("database", _mib(a.get("db_bytes"))),
            ("written (flash wear)", _wear(a.get("wear"))),
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
    ("Refused input (counted; the messages were acknowledged and dropped)", "rejected_input", [
        ("source", "source"), ("code", "code"), ("count", "count"), ("last", "last_at"), ("detail", "last")]),
    ("Installed releases", "releases", [("kind", "kind"), ("name", "name"), ("version", "version"),
                                        ("state", "state"), ("signer key", "signer_key"),
                                        ("installed", "installed_at")]),
    ("Outbox budget", "outbox_summary", [
        ("held", "held"), ("budget", "budget"), ("used", "used"), ("written", "per_day"),
        ("budget lasts (at this rate)", "full_in"), ("uplink", "uplink")]),
    ("Audit trail (decisions = kept in full + rolled up)", "audit_policies", [
        ("policy", "policy"), ("decisions", "decisions"), ("kept in full", "full"), ("rolled up", "rolled"),
        ("in full", "share_full"), ("shed to counts", "shed")]),
    ("Detail shed under disk pressure (gap records)", "audit_gaps", [
        ("what", "what"), ("ranges", "ranges"), ("records", "records")]),
    ("Outbox (store-and-forward)", "outbox_classes", [
        ("class", "class"), ("backlog", "backlog"), ("bytes", "bytes"), ("oldest unsent", "oldest_unsent"),
        ("sent", "sent"), ("expired", "expired"), ("dropped", "dropped"), ("merged", "thinned")]),
    ("Control loop", "pipeline_counts", [("readings", "readings"), ("rejected", "rejected"),
                                         ("allowed", "allow"), ("modified", "modify"), ("denied", "deny"),
                                         ("published", "published"), ("publish failed", "failed"),
                                         ("events", "events"), ("last reading", "last_reading_at")]),
    ("Workload modules", "modules", [("module", "name"), ("version", "version"), ("last run", "last_run_at"),
                                     ("outcome", "last_outcome"), ("runs 24h", "runs_24h"),
                                     ("failed 24h", "failed_24h"), ("schedule", "schedule")]),
    ("Last readings", "readings_last", [("device", "device"), ("metric", "metric"), ("value", "value"),
                                        ("at", "at")]),
    ("Last denials", "denials_last", [("at", "at"), ("subject", "subject"), ("policy", "policy"),
                                      ("reason", "reason")]),
    ("Properties", "properties", [("device", "device"), ("property", "name"), ("value", "value"),
                                  ("source", "source"), ("updated", "updated_at")]),
    ("KubeEdge twins", "kubeedge_devices", [
        ("device", "device_id"), ("bound", "bound"), ("state", "state"), ("twins", "twins"),
        ("unsynced", "unsynced"), ("error", "error")]),
    ("Fleet releases (last event per release line)", "fleet", [
        ("kind", "kind"), ("name", "name"), ("version", "version"), ("state", "state"),
        ("running", "active_version"), ("shadow", "shadow"), ("reason", "reason"), ("at", "at")]),
    ("Fleet releases on probation (health window open)", "fleet_watches", [
        ("kind", "kind"), ("name", "name"), ("version", "version"), ("replaced", "replaced"),
        ("window left", "left"), ("restarts", "restarts"), ("since", "since")]),
]
