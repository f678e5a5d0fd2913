"""The ``releases`` and ``trust`` sections of ``edge-agent status`` (read-only, from SQLite alone)."""

from __future__ import annotations

import sqlite3
from typing import TYPE_CHECKING

from agent.clock import iso
from agent.storage.db import table_exists
from agent.trust.catalog import SEEN_GENERATION_KEY, generation, list_releases

if TYPE_CHECKING:
    from agent.config import AgentConfig
    from agent.storage.report import Report


def releases_section(conn: sqlite3.Connection, config: AgentConfig, report: Report) -> None:
    if not table_exists(conn, "releases"):
        return
    report.data["releases"] = [
        {"kind": r.kind, "name": r.name, "version": r.version, "state": r.state, "sha256": r.sha256,
         "signer_key": r.signer_key_id[:16], "source": r.source, "installed_at": iso(r.installed_at),
         "activated_at": iso(r.activated_at), "expires": iso(r.predicate.expires)}
        for r in list_releases(conn)
    ]
    seen = conn.execute("SELECT value FROM trust_state WHERE key = ?", (SEEN_GENERATION_KEY,)).fetchone()
    keys = conn.execute("SELECT role, count(*) FROM trust_keys GROUP BY role").fetchall()
    report.data["trust"] = {
        "generation": generation(conn), "daemon_seen_generation": int(seen[0]) if seen else None,
        "keys": {str(role): int(n) for role, n in keys},
    }
