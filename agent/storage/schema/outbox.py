"""Schema of the outbox (store-and-forward to the cloud), owned by ``agent.sync``.

- ``outbox``: one row per record still to deliver; a row is deleted in the same transaction that
  records its broker acknowledgement, so what remains *is* the resumable drain position.
- ``outbox_boots``: boots seen (a small integer per boot id keeps rows short) with one recent
  (wall, mono) pair each, so ages of older-boot records survive wall-clock jumps.
- ``outbox_classes``: running totals per class (rows/bytes held; enqueued, sent, expired, dropped, thinned).
- ``outbox_daily``: bytes written per day, for the bytes/day rate and the time-to-full forecast.

v2: ``outbox.enc`` (0 = JSON text, 1 = zstandard-compressed JSON), ``kind`` (payload type) and
``records`` (how many events, readings or decisions one row packs);
``outbox_classes.handed_id`` (rows up to it were handed to the broker: never merged or dropped while
in flight), ``plain_bytes`` / ``stored_bytes`` (payload bytes enqueued before / after compression, for
the ratio); ``outbox_gaps``: what was shed under disk pressure, per kind.
"""

MIGRATIONS: list[str] = [
    """
    CREATE TABLE outbox_boots (
        seq INTEGER PRIMARY KEY AUTOINCREMENT,
        boot_id TEXT NOT NULL UNIQUE,
        first_wall REAL NOT NULL,
        last_wall REAL NOT NULL,
        last_mono REAL NOT NULL
    );
    CREATE TABLE outbox (
        id INTEGER PRIMARY KEY AUTOINCREMENT,
        cls INTEGER NOT NULL,
        key TEXT NOT NULL,
        payload TEXT NOT NULL,
        wall REAL NOT NULL,
        boot INTEGER NOT NULL,
        mono REAL NOT NULL,
        bytes INTEGER NOT NULL,
        thinned INTEGER NOT NULL DEFAULT 0
    );
    CREATE UNIQUE INDEX outbox_key ON outbox (key);
    CREATE INDEX outbox_cls ON outbox (cls, id);
    CREATE TABLE outbox_classes (
        cls INTEGER PRIMARY KEY,
        rows INTEGER NOT NULL DEFAULT 0,
        bytes INTEGER NOT NULL DEFAULT 0,
        enqueued INTEGER NOT NULL DEFAULT 0,
        sent INTEGER NOT NULL DEFAULT 0,
        expired INTEGER NOT NULL DEFAULT 0,
        dropped INTEGER NOT NULL DEFAULT 0,
        thinned INTEGER NOT NULL DEFAULT 0,
        duplicates INTEGER NOT NULL DEFAULT 0,
        acked_id INTEGER NOT NULL DEFAULT 0
    );
    INSERT INTO outbox_classes (cls) VALUES (0), (1), (2), (3);
    CREATE TABLE outbox_daily (
        day TEXT PRIMARY KEY,
        bytes INTEGER NOT NULL DEFAULT 0,
        rows INTEGER NOT NULL DEFAULT 0
    );
    """,
    """
    ALTER TABLE outbox ADD COLUMN enc INTEGER NOT NULL DEFAULT 0;
    ALTER TABLE outbox ADD COLUMN kind TEXT NOT NULL DEFAULT '';
    ALTER TABLE outbox ADD COLUMN records INTEGER NOT NULL DEFAULT 1;
    ALTER TABLE outbox_classes ADD COLUMN handed_id INTEGER NOT NULL DEFAULT 0;
    ALTER TABLE outbox_classes ADD COLUMN plain_bytes INTEGER NOT NULL DEFAULT 0;
    ALTER TABLE outbox_classes ADD COLUMN stored_bytes INTEGER NOT NULL DEFAULT 0;
    CREATE TABLE outbox_gaps (
        what TEXT PRIMARY KEY,
        ranges INTEGER NOT NULL DEFAULT 0,
        records INTEGER NOT NULL DEFAULT 0
    );
    """,
]
