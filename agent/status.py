"""The status report a field technician reads: built from SQLite alone, read-only, never waiting.

Works when the daemon is running, stopped or killed: liveness comes from the state-dir lock (held
by a live daemon, released by the kernel when it dies) and the heartbeat row, never from asking
the daemon. Each subsystem contributes a *section*; the JSON schema is documented in the README
(``edge-agent.status/v1``) and only grows by adding keys.
"""

from __future__ import annotations

import shutil
import sqlite3
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from agent import __version__
from agent.config import AgentConfig
from agent.daemon.lock import daemon_holds_lock
from agent.storage.db import connect_reader
from agent.storage.migrations import applied_versions

SCHEMA = "edge-agent.status/v1"


@dataclass
class Report:
    data: dict[str, Any] = field(default_factory=dict)
    problems: list[str] = field(default_factory=list)


Section = Callable[[sqlite3.Connection, AgentConfig, Report], None]


def iso(ts: float | None) -> str | None:
    if ts is None:
        return None
    return datetime.fromtimestamp(ts, UTC).isoformat(timespec="seconds").replace("+00:00", "Z")


def _table_exists(conn: sqlite3.Connection, name: str) -> bool:
    return conn.execute("SELECT 1 FROM sqlite_master WHERE type='table' AND name=?", (name,)).fetchone() is not None


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
    if running:
        shown = "running" if age <= 3 * interval + 5 else "stalled"
    elif state == "stopped":
        shown = "stopped"
    else:
        shown = "crashed"
    report.data["daemon"] = {
        "running": running, "state": shown, "pid": pid, "version": version,
        "started_at": iso(started), "heartbeat_at": iso(beat), "heartbeat_age_s": round(age, 1),
        "status_text": text, "stopped_at": iso(stopped),
    }
    if shown == "stalled":
        report.problems.append(f"daemon heartbeat is {age:.0f} s old (expected every {interval:g} s)")
    elif shown == "crashed":
        report.problems.append(f"daemon is not running and did not stop cleanly (last heartbeat {iso(beat)})")
    elif shown == "stopped":
        report.problems.append(f"daemon is stopped ({text})")


def storage_section(conn: sqlite3.Connection, config: AgentConfig, report: Report) -> None:
    db_bytes = sum(p.stat().st_size for p in config.state_dir.glob("agent.db*") if p.is_file())
    usage = shutil.disk_usage(config.state_dir)
    report.data["agent"] = {
        "version": __version__, "node_id": config.node_id, "state_dir": str(config.state_dir),
        "db_path": str(config.db_path), "db_bytes": db_bytes,
        "disk_free_bytes": usage.free, "disk_total_bytes": usage.total,
        "schema": applied_versions_ro(conn),
    }
    if usage.free < config.storage.min_free_bytes:
        report.problems.append(f"only {usage.free // (1024 * 1024)} MiB free on the state disk")


def applied_versions_ro(conn: sqlite3.Connection) -> dict[str, int]:
    if not _table_exists(conn, "schema_migrations"):
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


SECTIONS: list[Section] = [daemon_section, storage_section, links_section, errors_section]


def collect(config: AgentConfig) -> dict[str, Any]:
    """The whole report as a JSON-ready dict; raises StorageError if there is no database."""
    conn = connect_reader(config.db_path)
    report = Report()
    try:
        for section in SECTIONS:
            section(conn, config, report)
    finally:
        conn.close()
    return {"schema": SCHEMA, "healthy": not report.problems, "problems": report.problems, **report.data}
