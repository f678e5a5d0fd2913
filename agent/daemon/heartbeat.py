"""Write jobs for the daemon row that ``status`` reads to tell alive, stopped and crashed apart."""

from __future__ import annotations

import os
import time
from collections.abc import Callable

import sqlite_utils

from agent import __version__
from agent.storage.writer import WriteJob


def started_job(interval_s: float) -> Callable[[sqlite_utils.Database], str | None]:
    """Mark this start; the job returns how the previous run ended (``stopped`` = cleanly, ``failed``,
    anything else = it died without stopping; None = first start), before it is overwritten."""
    def job(db: sqlite_utils.Database) -> str | None:
        row = db.execute("SELECT state FROM daemon WHERE id = 1").fetchone()
        now = time.time()
        db.execute(
            "INSERT INTO daemon (id, pid, version, started_at, heartbeat_at, heartbeat_interval_s, state,"
            " status_text, stopped_at) VALUES (1, ?, ?, ?, ?, ?, 'starting', 'starting', NULL)"
            " ON CONFLICT(id) DO UPDATE SET pid = excluded.pid, version = excluded.version,"
            " started_at = excluded.started_at, heartbeat_at = excluded.heartbeat_at,"
            " heartbeat_interval_s = excluded.heartbeat_interval_s, state = 'starting',"
            " status_text = 'starting', stopped_at = NULL",
            (os.getpid(), __version__, now, now, interval_s))
        return str(row[0]) if row else None
    return job


def beat_job(state: str, status_text: str) -> WriteJob:
    def job(db: sqlite_utils.Database) -> None:
        db.execute("UPDATE daemon SET heartbeat_at = ?, state = ?, status_text = ? WHERE id = 1",
                   (time.time(), state, status_text))
    return job


def stopped_job(reason: str, state: str = "stopped") -> WriteJob:
    """The last write of a daemon: ``stopped`` after a requested stop, ``failed`` after a failure."""
    def job(db: sqlite_utils.Database) -> None:
        now = time.time()
        db.execute("UPDATE daemon SET heartbeat_at = ?, stopped_at = ?, state = ?, status_text = ?"
                   " WHERE id = 1", (now, now, state, reason))
        # with the daemon gone no link is up, whatever its service last wrote
        db.execute("UPDATE links SET state = 'down', detail = 'daemon stopped', since = ?, updated_at = ?"
                   " WHERE state != 'down'", (now, now))
    return job
