"""Local telemetry: sensor readings, latest property values, and the persisted decision log.

Contracts other components rely on (add columns only by new migrations):
- ``properties``: latest value per (device, name) — read by ``status`` and the KubeEdge twin sync.
- ``decisions``: every policy decision with input/result/reason — read by hot-swap shadow evaluation
  (the last N inputs) and forwarded to the cloud through the outbox.
- ``actuations``: what was published on the local broker for an allowed/modified decision.
- ``events``: events/alerts emitted by modules; ``rejects``: malformed bus messages (acknowledged).

v2, the bounded audit trail (``agent/control/audit.py``, ``docs/design.md``): ``decisions`` holds the
decisions kept in full (``kept`` says why, ``win`` is their rollup window); every decision is counted in
``audit_rollups`` (per open window and key) in the same transaction, sealed windows add to ``audit_keys``.
v3, telemetry tiers: ``telemetry_rollups`` (1-minute and 1-hour buckets on the boot clock).
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
    """
    ALTER TABLE decisions ADD COLUMN kept TEXT NOT NULL DEFAULT 'legacy';
    ALTER TABLE decisions ADD COLUMN win INTEGER;
    CREATE INDEX decisions_win ON decisions (win) WHERE win IS NOT NULL;
    CREATE TABLE audit_keys (
        id INTEGER PRIMARY KEY,
        policy TEXT NOT NULL,
        version INTEGER NOT NULL,
        subject TEXT NOT NULL,
        outcome TEXT NOT NULL,
        reason TEXT NOT NULL,
        made INTEGER NOT NULL DEFAULT 0,
        full INTEGER NOT NULL DEFAULT 0,
        rolled INTEGER NOT NULL DEFAULT 0,
        shed INTEGER NOT NULL DEFAULT 0,
        UNIQUE (policy, version, subject, outcome, reason)
    );
    CREATE TABLE audit_windows (
        id INTEGER PRIMARY KEY,
        boot INTEGER NOT NULL,
        width_s REAL NOT NULL,
        idx INTEGER NOT NULL,
        part INTEGER NOT NULL DEFAULT 0,
        state INTEGER NOT NULL DEFAULT 0,
        sealed_id INTEGER NOT NULL DEFAULT 0,
        first_wall REAL NOT NULL,
        first_mono REAL NOT NULL,
        last_wall REAL NOT NULL,
        last_mono REAL NOT NULL,
        UNIQUE (boot, width_s, idx)
    );
    CREATE INDEX audit_windows_state ON audit_windows (state, id);
    CREATE TABLE audit_rollups (
        win INTEGER NOT NULL,
        key INTEGER NOT NULL,
        full INTEGER NOT NULL DEFAULT 0,
        rolled INTEGER NOT NULL DEFAULT 0,
        first_wall REAL NOT NULL,
        first_mono REAL NOT NULL,
        last_wall REAL NOT NULL,
        last_mono REAL NOT NULL,
        d1 INTEGER NOT NULL DEFAULT 0,
        d2 INTEGER NOT NULL DEFAULT 0,
        PRIMARY KEY (win, key)
    ) WITHOUT ROWID;
    CREATE TABLE audit_subjects (
        subject TEXT PRIMARY KEY,
        outcome TEXT NOT NULL,
        signature TEXT NOT NULL,
        decision INTEGER NOT NULL,
        wall REAL NOT NULL
    );
    CREATE TABLE audit_policies (
        policy TEXT NOT NULL,
        version INTEGER NOT NULL,
        boot INTEGER NOT NULL,
        mono REAL NOT NULL,
        wall REAL NOT NULL,
        PRIMARY KEY (policy, version)
    );
    """,
    """
    CREATE TABLE telemetry_rollups (
        res INTEGER NOT NULL,
        boot INTEGER NOT NULL,
        bucket INTEGER NOT NULL,
        device TEXT NOT NULL,
        metric TEXT NOT NULL,
        n INTEGER NOT NULL,
        vmin REAL NOT NULL,
        vmax REAL NOT NULL,
        vsum REAL NOT NULL,
        vlast REAL NOT NULL,
        wall REAL NOT NULL,
        packed INTEGER NOT NULL DEFAULT 0,
        PRIMARY KEY (res, boot, bucket, device, metric)
    ) WITHOUT ROWID;
    CREATE INDEX telemetry_rollups_unpacked ON telemetry_rollups (res, boot, bucket) WHERE packed = 0;
    """,
]
