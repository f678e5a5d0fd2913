"""``status`` sections of the sync package: the outbox backlog and forecast, the KubeEdge twins.

Read-only, from SQLite alone, so they work with the daemon down.
"""

from __future__ import annotations

import json
import sqlite3
import time
from typing import TYPE_CHECKING, Any

from agent import clock
from agent.clock import iso
from agent.storage.db import table_exists
from agent.sync.outbox import OutboxClass

if TYPE_CHECKING:
    from agent.config import AgentConfig
    from agent.storage.report import Report


def forecast(conn: sqlite3.Connection, budget: int, held: int) -> dict[str, Any]:
    """Bytes written per day (mean of up to the last 7 synced days) and time-to-full at that rate."""
    rows = conn.execute("SELECT day, bytes FROM outbox_daily WHERE day != 'unsynced' ORDER BY day DESC LIMIT 8"
                        ).fetchall()
    today = time.strftime("%Y-%m-%d", time.gmtime())
    full_days = [int(b) for d, b in rows if d != today][:7]
    if full_days:
        per_day = sum(full_days) / len(full_days)
    elif rows:
        # only today so far: extrapolate from the part of the day that has passed
        elapsed = max(time.time() % 86_400, 3600.0)
        per_day = int(rows[0][1]) * 86_400 / elapsed
    else:
        per_day = 0.0
    free = max(0, budget - held)
    ttf = None if per_day <= 0 else free / per_day * 86_400
    return {"bytes_per_day": int(per_day), "time_to_full_s": None if ttf is None else int(ttf),
            "days": [{"day": d, "bytes": int(b)} for d, b in rows[:7]]}


def outbox_section(conn: sqlite3.Connection, config: AgentConfig, report: Report) -> None:
    if not table_exists(conn, "outbox_classes"):
        return
    settings = config.outbox
    budget = settings.disk_budget_bytes
    classes = []
    held = 0
    now = clock.now()
    for cls, rows, size, enq, sent, expired, dropped, thinned, dups in conn.execute(
            "SELECT cls, rows, bytes, enqueued, sent, expired, dropped, thinned, duplicates FROM outbox_classes "
            "ORDER BY cls"):
        held += int(size)
        oldest = conn.execute("SELECT o.wall, b.boot_id, o.mono FROM outbox o JOIN outbox_boots b ON b.seq = o.boot "
                              "WHERE o.cls = ? ORDER BY o.id LIMIT 1", (cls,)).fetchone()
        oldest_wall = None
        oldest_age = None
        if oldest is not None:
            stamp = clock.Stamp(float(oldest[0]), str(oldest[1]), float(oldest[2]))
            oldest_wall = clock.best_wall(stamp, now)
            spans = {str(b): clock.BootSpan(str(b), float(w), float(m)) for b, w, m in conn.execute(
                "SELECT boot_id, last_wall, last_mono FROM outbox_boots")}
            oldest_age = int(clock.age(stamp, now, spans))
        classes.append({"class": OutboxClass(int(cls)).label, "backlog": int(rows), "bytes": int(size),
                        "oldest_unsent": iso(oldest_wall), "oldest_age_s": oldest_age, "enqueued": int(enq),
                        "sent": int(sent), "expired": int(expired), "dropped": int(dropped),
                        "thinned": int(thinned), "duplicates": int(dups)})
    fc = forecast(conn, budget, held)
    link = conn.execute("SELECT state, detail FROM links WHERE name = 'uplink'").fetchone() if table_exists(
        conn, "links") else None
    ratio = conn.execute("SELECT sum(plain_bytes), sum(stored_bytes) FROM outbox_classes").fetchone() if any(
        r[1] == "plain_bytes" for r in conn.execute("PRAGMA table_info(outbox_classes)")) else None
    report.data["outbox"] = {
        "budget_bytes": budget, "held_bytes": held, "used_pct": round(100.0 * held / budget, 1),
        "compression_ratio": round(ratio[0] / ratio[1], 2) if ratio and ratio[1] else None,
        "bytes_per_day": fc["bytes_per_day"], "time_to_full_s": fc["time_to_full_s"],
        "time_to_full_days": None if fc["time_to_full_s"] is None else round(fc["time_to_full_s"] / 86_400, 1),
        "daily": fc["days"], "uplink": settings.uplink_url or None,
        "uplink_state": link[0] if link else None, "classes": classes,
    }
    report.data["outbox_classes"] = classes
    ttf = report.data["outbox"]["time_to_full_days"]
    report.data["outbox_summary"] = [{
        "held": f"{held:,} B", "budget": f"{budget:,} B", "used": f"{report.data['outbox']['used_pct']} %",
        "per_day": f"{fc['bytes_per_day']:,} B/day", "full_in": "-" if ttf is None else f"{ttf} days",
        "uplink": f"{settings.uplink_url or '(none)'} {link[0] if link else ''}".strip()}]
    if held > budget:
        report.problems.append(f"outbox holds {held} bytes, over its budget of {budget} bytes: only records that are "
                               "never shed are left (control, audit counts, transitions, gap records); restore the "
                               "uplink or raise [outbox] disk_budget_bytes (edge-agent plan tells by how much)")
    elif fc["time_to_full_s"] is not None and fc["time_to_full_s"] < 3 * 86_400 and held > budget / 2:
        report.warnings.append(f"outbox budget lasts about {fc['time_to_full_s'] / 3600:.0f} h more at the current "
                               "rate; then detail is shed (raw and 1-minute telemetry first), each range reported "
                               "by a gap record")


def kubeedge_section(conn: sqlite3.Connection, config: AgentConfig, report: Report) -> None:
    if not table_exists(conn, "kv"):
        return
    row = conn.execute("SELECT value, updated_at FROM kv WHERE key = 'kubeedge.twins'").fetchone()
    if row is None:
        return
    data = json.loads(row[0])
    devices = data.get("devices", [])
    report.data["kubeedge"] = {"node": data.get("node"), "updated_at": iso(float(row[1])),
                               "connected": data.get("connected"), "last_full_sync": data.get("last_full_sync"),
                               "devices": devices}
    report.data["kubeedge_devices"] = devices
    for dev in devices:
        if dev.get("bound") is False:
            report.warnings.append(f"KubeEdge device {dev['device_id']} is not bound to node {data.get('node')}: "
                                   "EdgeCore rejects its twins (404); set Device.spec.nodeName in the cloud")
        elif dev.get("state") == "failing":
            report.problems.append(f"KubeEdge twin sync of {dev['device_id']} fails: {dev.get('error')}")
        if dev.get("invalid"):
            report.problems.append(f"KubeEdge device {dev['device_id']}: properties not publishable: "
                                   + "; ".join(dev["invalid"][:3]))
