"""Local telemetry: sensor readings, latest property values, and the persisted decision log.

Contracts other components rely on (add columns only by new migrations):
- ``properties``: latest value per (device, name) — read by ``status`` and the KubeEdge twin sync.
- ``decisions``: every policy decision with input/result/reason — read by hot-swap shadow evaluation
  (the last N inputs) and forwarded to the cloud through the outbox.
- ``actuations``: what was published on the local broker for an allowed/modified decision.
- ``events``: events/alerts emitted by modules; ``rejects``: malformed bus messages (acknowledged).
"""

MIGRATIONS: list[str] = [
    """
    CREATE TABLE readings (
        id INTEGER PRIMARY KEY AUTOINCREMENT,
        topic TEXT NOT NULL,
        device TEXT NOT NULL,
        metric TEXT NOT NULL,
        value REAL,
        payload TEXT,
        wall REAL NOT NULL,
        boot_id TEXT NOT NULL,
        mono REAL NOT NULL
    );
    CREATE INDEX readings_device_metric ON readings (device, metric, id);
    CREATE TABLE properties (
        device TEXT NOT NULL,
        name TEXT NOT NULL,
        value TEXT NOT NULL,
        type TEXT NOT NULL DEFAULT 'string',
        source TEXT NOT NULL DEFAULT '',
        wall REAL NOT NULL,
        boot_id TEXT NOT NULL,
        mono REAL NOT NULL,
        PRIMARY KEY (device, name)
    );
    CREATE TABLE decisions (
        id INTEGER PRIMARY KEY AUTOINCREMENT,
        wall REAL NOT NULL,
        boot_id TEXT NOT NULL,
        mono REAL NOT NULL,
        policy_name TEXT NOT NULL,
        policy_version INTEGER NOT NULL,
        entrypoint TEXT NOT NULL,
        input TEXT NOT NULL,
        result TEXT NOT NULL,
        outcome TEXT NOT NULL,
        reason TEXT NOT NULL DEFAULT '',
        subject TEXT NOT NULL DEFAULT ''
    );
    CREATE INDEX decisions_policy ON decisions (policy_name, id);
    CREATE INDEX decisions_outcome ON decisions (outcome, id);
    CREATE TABLE actuations (
        id INTEGER PRIMARY KEY AUTOINCREMENT,
        decision_id INTEGER NOT NULL,
        topic TEXT NOT NULL,
        payload TEXT NOT NULL,
        qos INTEGER NOT NULL,
        retain INTEGER NOT NULL,
        state TEXT NOT NULL,
        error TEXT NOT NULL DEFAULT '',
        wall REAL NOT NULL
    );
    CREATE TABLE events (
        id INTEGER PRIMARY KEY AUTOINCREMENT,
        source TEXT NOT NULL,
        device TEXT NOT NULL DEFAULT '',
        severity TEXT NOT NULL,
        name TEXT NOT NULL,
        data TEXT NOT NULL,
        wall REAL NOT NULL,
        boot_id TEXT NOT NULL,
        mono REAL NOT NULL
    );
    CREATE TABLE rejects (
        id INTEGER PRIMARY KEY AUTOINCREMENT,
        topic TEXT NOT NULL,
        payload BLOB NOT NULL,
        error TEXT NOT NULL,
        wall REAL NOT NULL
    );
    """,
]
