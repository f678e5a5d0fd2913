"""The ``fleet`` section of ``edge-agent status``: the last fleet event per release line, from SQLite."""

from __future__ import annotations

import json
import sqlite3
from typing import TYPE_CHECKING

from agent.clock import iso

if TYPE_CHECKING:  # agent.status imports this module: no runtime import back
    from agent.config import AgentConfig
    from agent.status import Report


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
            report.problems.append(f"{kind} {name} v{version} was rolled back to v{doc.get('active_version')}: "
                                   f"{reason}")
    report.data["fleet"] = items
