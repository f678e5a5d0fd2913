"""Schema of the fleet component (owned by ``agent.fleet``).

- ``fleet_releases``: every distinct release delivery (kind, name, version, sha256) and what became
  of it — the de-duplication memory (a redelivered retained release is recognised and ignored) and
  the audit trail (scope, reason of a rejection or rollback, shadow-evaluation diff).
- ``fleet_status``: the last status message per kind/name, exactly as published (retained) on the
  gateway's status topic; re-published after a restart so the broker's copy is never stale.
"""

MIGRATIONS: list[str] = [
    """
    CREATE TABLE fleet_releases (
        kind TEXT NOT NULL,
        name TEXT NOT NULL,
        version INTEGER NOT NULL,
        sha256 TEXT NOT NULL,
        scope TEXT NOT NULL,
        state TEXT NOT NULL,
        code TEXT NOT NULL DEFAULT '',
        message TEXT NOT NULL DEFAULT '',
        shadow_evaluated INTEGER,
        shadow_changed INTEGER,
        received_at REAL NOT NULL,
        updated_at REAL NOT NULL,
        PRIMARY KEY (kind, name, version, sha256)
    );
    CREATE TABLE fleet_status (
        kind TEXT NOT NULL,
        name TEXT NOT NULL,
        version INTEGER,
        state TEXT NOT NULL,
        payload TEXT NOT NULL,
        updated_at REAL NOT NULL,
        PRIMARY KEY (kind, name)
    );
    """,
]
