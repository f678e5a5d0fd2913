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


def decision_outcomes(conn: sqlite3.Connection) -> dict[str, int]:
    """Decisions made per outcome: the audit trail's counts (sealed windows + open ones), plus full records
    written without it (older agents)."""
    out: dict[str, int] = {}
    if _exists(conn, "audit_keys"):
        for outcome, n in conn.execute(
                "SELECT k.outcome, sum(n) FROM (SELECT key AS id, full + rolled AS n FROM audit_rollups "
                "UNION ALL SELECT id, made FROM audit_keys) t JOIN audit_keys k ON k.id = t.id GROUP BY k.outcome"):
            out[str(outcome)] = int(n or 0)
        legacy = conn.execute("SELECT outcome, count(*) FROM decisions WHERE kept = 'legacy' AND id > "
                              "coalesce((SELECT CAST(value AS INTEGER) FROM kv WHERE key = 'outbox.decisions_cursor'),"
                              " 0) GROUP BY outcome").fetchall()
        for outcome, n in legacy:
            out[str(outcome)] = out.get(str(outcome), 0) + int(n)
        return out
    return {str(o): int(n) for o, n in conn.execute("SELECT outcome, count(*) FROM decisions GROUP BY outcome")}


def audit_section(conn: sqlite3.Connection, config: AgentConfig, report: Any) -> None:
    """``audit``: decisions made = kept in full + rolled up, per policy version; windows; what was shed."""
    if not _exists(conn, "audit_keys"):
        return
    per: dict[tuple[str, int], list[int]] = {}
    for policy, version, made, full, rolled, shed in conn.execute(
            "SELECT k.policy, k.version, sum(t.made), sum(t.full), sum(t.rolled), sum(t.shed) FROM (SELECT key AS id, "
            "full + rolled AS made, full, rolled, 0 AS shed FROM audit_rollups UNION ALL SELECT id, made, full, "
            "rolled, shed FROM audit_keys) t JOIN audit_keys k ON k.id = t.id GROUP BY k.policy, k.version "
            "ORDER BY k.policy, k.version"):
        per[(str(policy), int(version))] = [int(made or 0), int(full or 0), int(rolled or 0), int(shed or 0)]
    totals = [sum(v[i] for v in per.values()) for i in range(4)]
    states = dict(conn.execute("SELECT state, count(*) FROM audit_windows GROUP BY state").fetchall())
    gaps = [{"what": str(w), "ranges": int(r), "records": int(n)} for w, r, n in conn.execute(
        "SELECT what, ranges, records FROM outbox_gaps ORDER BY what")] if _exists(conn, "outbox_gaps") else []
    report.data["audit"] = {
        "decisions": totals[0], "kept_in_full": totals[1], "rolled_up": totals[2], "moved_to_counts": totals[3],
        "identity_holds": totals[0] == totals[1] + totals[2],
        "window_s": config.audit.window_s, "open_windows": int(states.get(0, 0)),
        "sealed_windows": int(states.get(1, 0)), "gaps": gaps,
        "policies": [{"policy": p, "version": v, "decisions": m, "kept_in_full": f, "rolled_up": r,
                      "moved_to_counts": s} for (p, v), (m, f, r, s) in per.items()]}
    report.data["audit_policies"] = [
        {"policy": f"{p} v{v}", "decisions": f"{m:,}", "full": f"{f:,}", "rolled": f"{r:,}",
         "share_full": f"{100.0 * f / m:.2f} %" if m else "-", "shed": f"{s:,}"}
        for (p, v), (m, f, r, s) in per.items()]
    report.data["audit_gaps"] = gaps
    if gaps:
        report.warnings.append("disk pressure shed detail (" + ", ".join(f"{g['records']:,} {g['what']}" for g in gaps)
                               + "): every range is reported to the cloud as a gap record; counts are complete")


def pipeline_section(conn: sqlite3.Connection, config: AgentConfig, report: Any) -> None:
    """``pipeline`` (counts), ``readings_last``, ``denials_last``, ``properties`` in the report."""
    if not _exists(conn, "readings"):
        return
    n_readings, last_at = conn.execute("SELECT count(*), max(wall) FROM readings").fetchone()
    n_rejects, last_reject = conn.execute("SELECT count(*), max(wall) FROM rejects").fetchone()
    outcomes = decision_outcomes(conn)
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
