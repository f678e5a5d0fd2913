"""Schema of the fleet component (owned by ``agent.fleet``).

- ``fleet_releases``: every distinct release delivery (kind, name, version, sha256) and what became
  of it — the de-duplication memory (a redelivered retained release is recognised and ignored) and
  the audit trail (scope, reason of a rejection or rollback, shadow-evaluation diff).
- ``fleet_status``: the last status message per kind/name, exactly as published (retained) on the
  gateway's status topic; re-published after a restart so the broker's copy is never stale.
- ``fleet_watches`` (v2): the health window of every activated release, persisted so that a restart
  (or a crash) inside the window resumes it instead of counting the release as good; ``starts``
  counts the agent starts during the window (a crash loop is rolled back before the release runs
  again). At most one ``open`` watch per kind/name; closed ones stay as a bounded history.
- ``fleet_desired`` (v3): per scope, the highest desired-state sequence verified and the manifest
  digest it came from (a replayed older document is refused; an unchanged one is not re-fetched).
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
    """
    CREATE TABLE fleet_watches (
        id INTEGER PRIMARY KEY,
        kind TEXT NOT NULL,
        name TEXT NOT NULL,
        version INTEGER NOT NULL,
        sha256 TEXT NOT NULL,
        previous_version INTEGER,
        scope TEXT NOT NULL DEFAULT '',
        shadow TEXT NOT NULL DEFAULT '',
        window_s REAL NOT NULL,
        opened_at REAL NOT NULL,
        window_started_at REAL NOT NULL,
        starts INTEGER NOT NULL DEFAULT 0,
        state TEXT NOT NULL DEFAULT 'open',
        code TEXT NOT NULL DEFAULT '',
        message TEXT NOT NULL DEFAULT '',
        closed_at REAL
    );
    CREATE UNIQUE INDEX fleet_watches_one_open ON fleet_watches (kind, name) WHERE state = 'open';
    """,
    """
    CREATE TABLE fleet_desired (
        scope TEXT PRIMARY KEY,
        sequence INTEGER NOT NULL,
        digest TEXT NOT NULL,
        signer_key_id TEXT NOT NULL DEFAULT '',
        verified_at REAL NOT NULL
    );
    """,
]
