"""The agent's state database as one object: integrity check, migrations, the writer, readers.

Open it once per process with :meth:`Store.open`; every write goes through ``store.writer``;
readers come from :meth:`Store.reader` (their own read-only connections).
"""

from __future__ import annotations

import sqlite3
import time
from pathlib import Path

import sqlite_utils

from agent.errors import DatabaseCorrupt
from agent.logs import get_logger
from agent.storage.db import check_integrity, connect_reader, connect_writer, open_checked
from agent.storage.migrations import migrate
from agent.storage.rejects import RejectCounter
from agent.storage.writer import WriteJob, Writer

log = get_logger("storage")

MAX_ERRORS_KEPT = 500


class Store:
    def __init__(self, path: Path, writer: Writer, corrupt: DatabaseCorrupt | None) -> None:
        self.path = path
        self.writer = writer
        self.corrupt = corrupt
        # outside input refused and handlers that failed, counted for `status` (see rejects.py)
        self.rejects = RejectCounter(writer)

    @classmethod
    def open(cls, state_dir: Path, *, synchronous: str = "FULL", batch_max: int = 256,
             owner: bool = False) -> Store:
        """Check, migrate and open the state database of ``state_dir``.

        ``owner=True`` only for the process holding the state-dir lock (the daemon): it moves a corrupt
        file aside and starts fresh. Anyone else (CLI commands, tests) gets :class:`DatabaseCorrupt`
        and the file stays where it is, since a daemon may be using it.
        """
        state_dir.mkdir(parents=True, exist_ok=True, mode=0o750)
        path = state_dir / "agent.db"
        if owner:
            corrupt = open_checked(path)
        else:
            corrupt = None
            problem = check_integrity(path)
            if problem is not None:
                raise DatabaseCorrupt(
                    f"{path}: the database failed its integrity check ({problem}); restart the daemon "
                    "(systemctl restart edge-agent): it moves the file aside and starts a fresh one")
        conn = connect_writer(path, synchronous)
        try:
            migrate(conn)
        finally:
            conn.close()
        writer = Writer(path, synchronous=synchronous, batch_max=batch_max)
        writer.start()
        store = cls(path, writer, corrupt)
        if corrupt is not None:
            store.record_error_sync("storage", corrupt.code, str(corrupt))
        return store

    def close(self) -> None:
        self.rejects.flush_now()  # queued ahead of the writer's stop: the last counts are kept
        self.writer.stop()

    def reader(self) -> sqlite3.Connection:
        return connect_reader(self.path)

    def record_error_sync(self, component: str, code: str, message: str) -> None:
        self.writer.run_sync(error_job(component, code, message))

    async def record_error(self, component: str, code: str, message: str) -> None:
        await self.writer.run(error_job(component, code, message))

    async def set_link(self, name: str, state: str, detail: str = "") -> None:
        await self.writer.run(link_job(name, state, detail))


def error_job(component: str, code: str, message: str) -> WriteJob:
    """A write job that appends to the recent-errors log and keeps it bounded."""
    def job(db: sqlite_utils.Database) -> None:
        db.execute("INSERT INTO errors (at, component, code, message) VALUES (?, ?, ?, ?)",
                   (time.time(), component, code, message[:2000]))
        db.execute("DELETE FROM errors WHERE id <= (SELECT max(id) FROM errors) - ?", (MAX_ERRORS_KEPT,))
    return job


def link_job(name: str, state: str, detail: str) -> WriteJob:
    """A write job that records a link's state; ``since`` changes only when the state does."""
    def job(db: sqlite_utils.Database) -> None:
        now = time.time()
        db.execute(
            "INSERT INTO links (name, state, detail, since, updated_at) VALUES (?, ?, ?, ?, ?) "
            "ON CONFLICT(name) DO UPDATE SET detail = excluded.detail, updated_at = excluded.updated_at, "
            "since = CASE WHEN links.state = excluded.state THEN links.since ELSE excluded.since END, "
            "state = excluded.state",
            (name, state, detail, now, now))
    return job


def kv_set(conn: sqlite3.Connection, key: str, value: str, at: float | None = None) -> None:
    """Inside a write job: set a small persisted fact (a cursor, a measured ratio, a marker), stamped
    ``at`` (default: now)."""
    conn.execute("INSERT INTO kv (key, value, updated_at) VALUES (?, ?, ?) ON CONFLICT(key) DO UPDATE "
                 "SET value = excluded.value, updated_at = excluded.updated_at",
                 (key, value, time.time() if at is None else at))


def kv_set_job(key: str, value: str) -> WriteJob:
    def job(db: sqlite_utils.Database) -> None:
        kv_set(db.conn, key, value)
    return job


def kv_get(conn: sqlite3.Connection, key: str) -> str | None:
    row = conn.execute("SELECT value FROM kv WHERE key = ?", (key,)).fetchone()
    return None if row is None else str(row[0])

