"""Status sections of the local control loop: readings, decisions, actuations, properties, events."""

from __future__ import annotations

import sqlite3
from typing import Any

from agent.clock import iso
from agent.config import AgentConfig

LAST_READINGS = 10
LAST_DENIALS = 5
MAX_PROPERTIES = 50


def _exists(conn: sqlite3.Connection, table: str) -> bool:
    return conn.execute("SELECT 1 FROM sqlite_master WHERE type='table' AND name=?", (table,)).fetchone() is not None


def pipeline_section(conn: sqlite3.Connection, config: AgentConfig, report: Any) -> None:
    """``pipeline`` (counts), ``readings_last``, ``denials_last``, ``properties`` in the report."""
    if not _exists(conn, "readings"):
        return
    n_readings, last_at = conn.execute("SELECT count(*), max(wall) FROM readings").fetchone()
    n_rejects, last_reject = conn.execute("SELECT count(*), max(wall) FROM rejects").fetchone()
    outcomes = dict(conn.execute("SELECT outcome, count(*) FROM decisions GROUP BY outcome").fetchall())
    states = dict(conn.execute("SELECT state, count(*) FROM actuations GROUP BY state").fetchall())
    n_events = conn.execute("SELECT count(*) FROM events").fetchone()[0]
    report.data["pipeline"] = {
        "readings": n_readings, "last_reading_at": iso(last_at),
        "rejected_messages": n_rejects, "last_reject_at": iso(last_reject),
        "decisions": {k: outcomes.get(k, 0) for k in ("allow", "modify", "deny")},
        "actuations_published": states.get("published", 0), "actuations_failed": states.get("failed", 0),
        "events": n_events,
        "retention": {"readings_max_rows": config.pipeline.readings_max_rows,
                      "readings_max_age_s": config.pipeline.readings_max_age_s},
    }
    p = report.data["pipeline"]
    report.data["pipeline_counts"] = [{
        "readings": n_readings, "rejected": n_rejects, **p["decisions"],
        "published": p["actuations_published"], "failed": p["actuations_failed"], "events": n_events,
        "last_reading_at": p["last_reading_at"]}]
    report.data["readings_last"] = [
        {"device": d, "metric": m, "value": v if v is not None else (p or "")[:40], "at": iso(w)}
        for d, m, v, p, w in conn.execute(
            "SELECT device, metric, value, payload, wall FROM readings ORDER BY id DESC LIMIT ?", (LAST_READINGS,))]
    report.data["denials_last"] = [
        {"at": iso(w), "subject": s, "policy": f"{pn} v{pv}", "reason": r[:100]}
        for w, s, pn, pv, r in conn.execute(
            "SELECT wall, subject, policy_name, policy_version, reason FROM decisions WHERE outcome = 'deny'"
            " ORDER BY id DESC LIMIT ?", (LAST_DENIALS,))]
    report.data["properties"] = [
        {"device": d, "name": n, "value": v[:60], "type": t, "source": s, "updated_at": iso(w)}
        for d, n, v, t, s, w in conn.execute(
            "SELECT device, name, value, type, source, wall FROM properties ORDER BY device, name LIMIT ?",
            (MAX_PROPERTIES,))]
