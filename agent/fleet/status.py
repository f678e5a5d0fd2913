"""The ``fleet`` section of ``edge-agent status``: the last fleet event per release line, from SQLite,
and (``fleet_watches``) the releases still on probation: their health window is open."""

from __future__ import annotations

import json
import sqlite3
from typing import TYPE_CHECKING

from agent.clock import iso
from agent.fleet.watches import open_watches
from agent.storage.lock import daemon_holds_lock

if TYPE_CHECKING:
    from agent.config import AgentConfig
    from agent.storage.report import Report


def fleet_section(conn: sqlite3.Connection, config: AgentConfig, report: Report) -> None:
    if not config.fleet.enabled and conn.execute("SELECT 1 FROM sqlite_master WHERE name = 'fleet_status'"
                                                 ).fetchone() is None:
        return
    rows = conn.execute("SELECT kind, name, version, state, payload, updated_at FROM fleet_status "
                        "ORDER BY kind, name").fetchall()
    items = []
    for kind, name, version, state, payload, updated in rows:
        try:
            doc = json.loads(payload)
        except json.JSONDecodeError:
            doc = {}
        shadow = doc.get("shadow") or {}
        reason = f"{doc.get('code')}: {doc.get('message')}" if doc.get("code") else ""
        items.append({"kind": kind, "name": name, "version": version, "state": state,
                      "active_version": doc.get("active_version"),
                      "shadow": f"{shadow.get('changed')}/{shadow.get('evaluated')} changed" if shadow else "",
                      "reason": reason[:160], "at": iso(updated)})
        if state == "rolled_back":
            # the agent handled it and runs the previous version: the fleet manager must look, it need not
            report.warnings.append(f"{kind} {name} v{version} was rolled back to v{doc.get('active_version')}: "
                                   f"{reason}")
        elif state == "active" and doc.get("code"):  # unhealthy, but there was nothing to roll back to
            report.problems.append(f"{kind} {name} v{version} is unhealthy and still runs: {reason}")
    report.data["fleet"] = items
    probation = []
    watches = open_watches(conn)
    running = bool(watches) and daemon_holds_lock(config.state_dir)
    for w in watches:
        left = w.left_s() if running else 0.0  # a stopped agent's window waits for its next start
        probation.append({
            "kind": w.kind, "name": w.name, "version": w.version, "replaced": w.previous_version,
            "window_s": w.window_s, "left_s": round(left, 1), "starts": w.starts,
            "max_starts": config.fleet.max_starts_in_health_window,
            "left": ("agent not running: the full window runs again at its next start" if not running else
                     f"{left:.0f} s of {w.window_s:g} s" if config.fleet.enabled else
                     "not watched: [fleet] is disabled"),
            "restarts": f"{w.starts} of {config.fleet.max_starts_in_health_window} tolerated",
            "since": iso(w.opened_at)})
    report.data["fleet_watches"] = probation
