"""The status report a field technician reads (``edge-agent status``): built from SQLite alone, read-only,
never waiting.

Works when the daemon is running, stopped or killed: liveness comes from the state-dir lock (held
by a live daemon, released by the kernel when it dies) and the heartbeat row, never from asking
the daemon. Each subsystem contributes a *section*; the JSON schema is documented in
docs/operating.md (``edge-agent.status/v1``) and only grows by adding keys.
"""

from __future__ import annotations

import json
import shutil
import sqlite3
import time
from typing import Any

from agent import __version__
from agent.clock import iso
from agent.config import AgentConfig
from agent.control.status import audit_section, pipeline_section
from agent.daemon.supervisor import SERVICES_KEY
from agent.errors import StorageError
from agent.fleet.status import fleet_section
from agent.handlers import HANDLER_FAILED
from agent.runtime.status import modules_section
from agent.storage.db import connect_reader, table_exists
from agent.storage.lock import daemon_holds_lock, lock_pid
from agent.storage.migrations import applied_versions
from agent.storage.report import Report, Section
from agent.storage.store import kv_get
from agent.sync.status import kubeedge_section, outbox_section
from agent.trust.status import releases_section

SCHEMA = "edge-agent.status/v1"


def daemon_section(conn: sqlite3.Connection, config: AgentConfig, report: Report) -> None:
    running = daemon_holds_lock(config.state_dir)
    row = conn.execute("SELECT pid, version, started_at, heartbeat_at, heartbeat_interval_s, state,"
                       " status_text, stopped_at FROM daemon WHERE id = 1").fetchone()
    now = time.time()
    if row is None:
        report.data["daemon"] = {"running": running, "state": "never_started"}
        report.problems.append("the daemon has never run with this state dir")
        return
    pid, version, started, beat, interval, state, text, stopped = row
    age = max(0.0, now - beat)
    holder = lock_pid(config.state_dir) if running else None
    if running and holder is not None and holder != pid:
        # a new daemon holds the lock but has not written its row yet: checking/migrating the database
        shown = "starting"
    elif running:
        shown = "running" if age <= 3 * interval + 5 else "stalled"
    elif state in ("stopped", "failed"):
        shown = state
    else:
        shown = "crashed"
    report.data["daemon"] = {
        "running": running, "state": shown, "pid": pid, "version": version,
        "started_at": iso(started), "heartbeat_at": iso(beat), "heartbeat_age_s": round(age, 1),
        "status_text": text, "stopped_at": iso(stopped),
    }
    if running and shown in ("running", "stalled"):
        services_section(conn, report)
    if shown == "starting":
        report.data["daemon"].update(pid=holder, status_text="starting: checking and migrating the state database")
        report.problems.append(f"daemon (pid {holder}) is starting: checking and migrating the state database")
    if shown == "stalled":
        why = ""
        if shutil.disk_usage(config.state_dir).free < config.storage.min_free_bytes:
            # alive but unable to write: not a hung loop, a full disk (it resumes once space is freed)
            why = ": the state disk is full, so the daemon cannot record it; free space and it resumes by itself"
        report.problems.append(f"daemon heartbeat is {age:.0f} s old (expected every {interval:g} s){why}")
    elif shown == "crashed":
        report.problems.append(f"daemon is not running and did not stop cleanly (last heartbeat {iso(beat)})")
    elif shown == "stopped":
        report.problems.append(f"daemon is stopped ({text})")
    elif shown == "failed":
        report.problems.append(f"daemon stopped after a failure ({text}); see the errors below")


SERVICE_FAILURE_RECENT_S = 3_600.0


def services_section(conn: sqlite3.Connection, report: Report) -> None:
    """``daemon.services``: services of the running daemon that failed and were restarted in place. One
    restarting, or restarted within the hour, is a problem (something made it fail; it may again)."""
    raw = kv_get(conn, SERVICES_KEY) if table_exists(conn, "kv") else None
    try:
        services = json.loads(raw) if raw else {}
    except ValueError:
        services = {}
    if not isinstance(services, dict):
        return
    report.data["daemon"]["services"] = services
    now = time.time()
    for name, rec in sorted(services.items()):
        if not isinstance(rec, dict) or not rec.get("restarts"):
            continue
        failed_at = rec.get("last_failed_at") or 0.0
        if rec.get("state") == "restarting" or now - failed_at <= SERVICE_FAILURE_RECENT_S:
            report.problems.append(
                f"service '{name}' failed and was restarted {rec['restarts']} time(s), last {iso(failed_at)} "
                f"({rec.get('last_error', '')[:160]}); the daemon kept running"
                + (": it is waiting to restart" if rec.get("state") == "restarting" else ""))


def storage_section(conn: sqlite3.Connection, config: AgentConfig, report: Report) -> None:
    db_bytes = sum(p.stat().st_size for p in config.state_dir.glob("agent.db*") if p.is_file())
    usage = shutil.disk_usage(config.state_dir)
    report.data["agent"] = {
        **_agent_basics(config), "db_bytes": db_bytes,
        "disk_free_bytes": usage.free, "disk_total_bytes": usage.total,
        "schema": applied_versions_ro(conn),
    }
    wear = conn.execute("SELECT value FROM kv WHERE key = 'daemon.wear'").fetchone() if table_exists(
        conn, "kv") else None
    if wear is not None:
        report.data["agent"]["wear"] = json.loads(wear[0])
    if usage.free < config.storage.min_free_bytes:
        budget = config.outbox.disk_budget_bytes
        mine = "the agent's own state" if db_bytes > usage.total / 2 else "something other than the agent"
        report.problems.append(
            f"only {usage.free // (1024 * 1024)} MiB free on the state disk ({config.state_dir}): it is filled by "
            f"{mine} (agent state {db_bytes // (1024 * 1024)} MiB, outbox budget {budget // (1024 * 1024)} MiB). "
            "Free space on that disk; if it fills up completely new decisions cannot be recorded and actuation "
            "stops (fails closed) until space is freed; everything resumes by itself")


def applied_versions_ro(conn: sqlite3.Connection) -> dict[str, int]:
    if not table_exists(conn, "schema_migrations"):
        return {}
    return applied_versions(conn)


def links_section(conn: sqlite3.Connection, config: AgentConfig, report: Report) -> None:
    rows = conn.execute("SELECT name, state, detail, since, updated_at FROM links ORDER BY name").fetchall()
    report.data["links"] = [
        {"name": n, "state": s, "detail": d, "since": iso(since), "updated_at": iso(upd)}
        for n, s, d, since, upd in rows
    ]


def errors_section(conn: sqlite3.Connection, config: AgentConfig, report: Report) -> None:
    rows = conn.execute("SELECT at, component, code, message FROM errors ORDER BY id DESC LIMIT 10").fetchall()
    report.data["errors"] = [{"at": iso(at), "component": c, "code": code, "message": m}
                             for at, c, code, m in rows]


REJECTS_RECENT_S = 86_400.0
HANDLER_FAILURE_RECENT_S = 3_600.0


def rejects_section(conn: sqlite3.Connection, config: AgentConfig, report: Report) -> None:
    """``rejected_input``: outside input refused (and message handlers that failed), per source and code.

    Refused input is the agent doing its job, so it is a warning while recent (someone should look at
    the sensor or sender); a handler that raised is a bug that dropped a message: a problem for an hour.
    """
    if not table_exists(conn, "input_rejects"):
        return
    now = time.time()
    rows = conn.execute("SELECT source, code, count, first_at, last_at, last_detail FROM input_rejects"
                        " ORDER BY last_at DESC").fetchall()
    report.data["rejected_input"] = [
        {"source": s, "code": c, "count": int(n), "first_at": iso(first), "last_at": iso(last), "last": d[:200]}
        for s, c, n, first, last, d in rows]
    refused: list[tuple[str, str, int]] = []
    for source, code, n, _, last, detail in rows:
        if code == HANDLER_FAILED and now - last <= HANDLER_FAILURE_RECENT_S:
            report.problems.append(f"a {source} message handler failed ({n} times in all; last: {detail[:160]}); "
                                   "the daemon kept running and dropped that message: report this bug")
        elif code != HANDLER_FAILED and now - last <= REJECTS_RECENT_S:
            refused.append((source, code, int(n)))
    if refused:
        total = sum(n for _, _, n in refused)
        kinds = ", ".join(f"{s} {c} ×{n}" for s, c, n in refused[:6])
        report.warnings.append(f"input refused recently ({kinds}; {total} in all): acknowledged and dropped, "
                               "nothing stored was affected (see rejected_input)")


SECTIONS: list[Section] = [daemon_section, storage_section, links_section, errors_section, releases_section,
                           outbox_section, audit_section, kubeedge_section, pipeline_section, modules_section,
                           fleet_section, rejects_section]


def collect(config: AgentConfig) -> dict[str, Any]:
    """The whole report as a JSON-ready dict. Never raises for a missing, locked or corrupt database:
    a technician needs the report most exactly then."""
    report = Report()
    conn: sqlite3.Connection | None = None
    if not config.db_path.exists():
        report.problems.append(f"no state database at {config.db_path}: the daemon has never run here")
    else:
        try:
            conn = connect_reader(config.db_path)
        except (StorageError, sqlite3.Error) as exc:
            report.problems.append(f"cannot read the state database {config.db_path}: {exc}")
    if conn is None:
        report.data["daemon"] = {"running": daemon_holds_lock(config.state_dir), "state": "never_started"
                                 if not config.db_path.exists() else "unknown"}
        report.data["agent"] = _agent_basics(config)
    else:
        try:
            for section in SECTIONS:
                try:
                    section(conn, config, report)
                except sqlite3.Error as exc:
                    # a section of a database still being created/migrated: report, keep going
                    report.problems.append(f"status section '{section.__name__}' unavailable: {exc}")
        finally:
            conn.close()
    return {"schema": SCHEMA, "healthy": not report.problems, "problems": report.problems,
            "warnings": report.warnings, **report.data}


def _agent_basics(config: AgentConfig) -> dict[str, Any]:
    return {"version": __version__, "node_id": config.node_id, "state_dir": str(config.state_dir),
            "db_path": str(config.db_path)}
