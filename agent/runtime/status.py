"""The ``modules`` section of ``edge-agent status``: per module, its runs and how the last one ended.

Read-only, from SQLite alone (works with the daemon down). A module whose latest run failed is
listed as a problem, with the reason a technician can act on.
"""

from __future__ import annotations

import sqlite3
import time
from typing import TYPE_CHECKING, Any

from agent.clock import iso

if TYPE_CHECKING:
    from agent.config import AgentConfig
    from agent.storage.report import Report

WINDOW_S = 86400.0


def modules_section(conn: sqlite3.Connection, config: AgentConfig, report: Report) -> None:
    has = conn.execute("SELECT 1 FROM sqlite_master WHERE type='table' AND name='module_runs'").fetchone()
    if not has:
        return
    since = time.time() - WINDOW_S
    counts = {str(n): (int(total), int(ok or 0)) for n, total, ok in conn.execute(
        "SELECT name, count(*), sum(outcome = 'ok') FROM module_runs WHERE started_wall >= ? GROUP BY name",
        (since,))}
    last = conn.execute(
        "SELECT r.name, r.version, r.outcome, r.error, r.started_wall, r.duration_ms, r.trigger_kind FROM module_runs r"
        " JOIN (SELECT name, max(id) AS id FROM module_runs GROUP BY name) m ON r.id = m.id ORDER BY r.name").fetchall()
    schedules = {str(n): (str(s), w) for n, s, w in
                 conn.execute("SELECT name, spec, last_run_wall FROM module_schedules")}
    items: list[dict[str, Any]] = []
    for name, version, outcome, error, started, duration, kind in last:
        total, ok = counts.get(name, (0, 0))
        spec, last_sched = schedules.get(name, ("", None))
        items.append({
            "name": name, "version": version, "last_outcome": outcome, "last_run_at": iso(started),
            "last_trigger": kind, "last_duration_ms": round(float(duration), 2), "runs_24h": total,
            "failed_24h": total - ok, "schedule": spec or None, "last_scheduled_run": iso(last_sched),
            "last_error": error or None,
        })
        if outcome not in ("ok", "missed"):
            report.problems.append(f"module '{name}' v{version}: last run failed ({outcome}): {error[:200]}")
    report.data["modules"] = items
