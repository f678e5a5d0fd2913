"""Forward-only, per-component schema migrations, applied at start.

Each component owns an ordered list of SQL scripts in ``agent/storage/schema/<component>.py``
(``MIGRATIONS``); version N is the N-th script. Applied versions are recorded in
``schema_migrations``, each script in its own transaction, so an upgrade is all-or-nothing per step
and never loses data. A database written by a *newer* agent is refused rather than guessed at.
"""

from __future__ import annotations

import sqlite3
import time
from collections.abc import Mapping, Sequence

from agent.errors import StorageError
from agent.logs import get_logger
from agent.storage.schema import core, fleet, outbox, runtime, telemetry, trust

log = get_logger("storage")

COMPONENTS: Mapping[str, Sequence[str]] = {
    "core": core.MIGRATIONS,
    "trust": trust.MIGRATIONS,
    "runtime": runtime.MIGRATIONS,
    "telemetry": telemetry.MIGRATIONS,
    "outbox": outbox.MIGRATIONS,
    "fleet": fleet.MIGRATIONS,
}

_BOOKKEEPING = """
CREATE TABLE IF NOT EXISTS schema_migrations (
    component TEXT NOT NULL,
    version INTEGER NOT NULL,
    applied_at REAL NOT NULL,
    PRIMARY KEY (component, version)
)"""


def applied_versions(conn: sqlite3.Connection) -> dict[str, int]:
    conn.execute(_BOOKKEEPING)
    rows = conn.execute("SELECT component, max(version) FROM schema_migrations GROUP BY component")
    return {str(c): int(v) for c, v in rows}


def migrate(conn: sqlite3.Connection, components: Mapping[str, Sequence[str]] = COMPONENTS,
            targets: Mapping[str, int] | None = None) -> list[tuple[str, int]]:
    """Apply pending migrations (up to ``targets`` per component, default all); return what ran."""
    current = applied_versions(conn)
    for component, version in current.items():
        known = len(components.get(component, ()))
        if version > known:
            raise StorageError(
                f"the state database was written by a newer agent (schema '{component}' is at version "
                f"{version}, this agent knows {known}); install that newer agent again or restore a backup")
    ran: list[tuple[str, int]] = []
    for component, scripts in components.items():
        target = len(scripts) if targets is None else targets.get(component, len(scripts))
        for version in range(current.get(component, 0) + 1, target + 1):
            conn.execute("BEGIN IMMEDIATE")
            try:
                for statement in _statements(scripts[version - 1]):
                    conn.execute(statement)
                conn.execute("INSERT INTO schema_migrations VALUES (?, ?, ?)", (component, version, time.time()))
                conn.execute("COMMIT")
            except sqlite3.Error as exc:
                conn.execute("ROLLBACK")
                raise StorageError(f"schema migration {component} v{version} failed: {exc}") from exc
            ran.append((component, version))
            log.info("schema_migrated", schema=component, version=version)
    return ran


def _statements(script: str) -> list[str]:
    """Split a script into statements (``executescript`` would COMMIT our transaction)."""
    out: list[str] = []
    buf = ""
    for line in script.splitlines(keepends=True):
        buf += line
        if sqlite3.complete_statement(buf):
            if buf.strip():
                out.append(buf.strip())
            buf = ""
    if buf.strip():
        raise StorageError(f"incomplete SQL statement in a migration: {buf.strip()[:80]}")
    return out
