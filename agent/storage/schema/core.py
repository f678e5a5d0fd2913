"""Core tables: the daemon's heartbeat, key/value state, the recent-errors log, counted rejects."""

MIGRATIONS: list[str] = [
    # v1: the daemon row (one per state dir) and small key/value facts
    """
    CREATE TABLE daemon (
        id INTEGER PRIMARY KEY CHECK (id = 1),
        pid INTEGER NOT NULL,
        version TEXT NOT NULL,
        started_at REAL NOT NULL,
        heartbeat_at REAL NOT NULL,
        heartbeat_interval_s REAL NOT NULL,
        state TEXT NOT NULL,
        status_text TEXT NOT NULL DEFAULT '',
        stopped_at REAL
    );
    CREATE TABLE kv (
        key TEXT PRIMARY KEY,
        value TEXT NOT NULL,
        updated_at REAL NOT NULL
    );
    """,
    # v2: errors a technician should see in `status`, bounded by the writer
    """
    CREATE TABLE errors (
        id INTEGER PRIMARY KEY AUTOINCREMENT,
        at REAL NOT NULL,
        component TEXT NOT NULL,
        code TEXT NOT NULL,
        message TEXT NOT NULL
    );
    CREATE INDEX errors_at ON errors (at);
    """,
    # v3: the state of each link (local broker, fleet broker, KubeEdge), for `status`
    """
    CREATE TABLE links (
        name TEXT PRIMARY KEY,
        state TEXT NOT NULL,
        detail TEXT NOT NULL DEFAULT '',
        since REAL NOT NULL,
        updated_at REAL NOT NULL
    );
    """,
    # v4: boots seen, as small integers (rows keyed by boot clock keep a 4-byte number, not a 36-character id)
    """
    CREATE TABLE boots (
        seq INTEGER PRIMARY KEY AUTOINCREMENT,
        boot_id TEXT NOT NULL UNIQUE,
        first_wall REAL NOT NULL,
        first_mono REAL NOT NULL
    );
    """,
    # v5: outside input refused (and handlers that failed), counted per source and code, for `status`
    """
    CREATE TABLE input_rejects (
        source TEXT NOT NULL,
        code TEXT NOT NULL,
        count INTEGER NOT NULL,
        first_at REAL NOT NULL,
        last_at REAL NOT NULL,
        last_detail TEXT NOT NULL DEFAULT '',
        PRIMARY KEY (source, code)
    );
    """,
]
