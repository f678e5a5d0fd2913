"""Write jobs for the daemon row that ``status`` reads to tell alive, stopped and crashed apart."""

from __future__ import annotations

import json
import os
import time
from collections import deque
from collections.abc import Callable
from pathlib import Path

import sqlite_utils

from agent import __version__
from agent.storage.store import kv_set
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


WEAR_KEY = "daemon.wear"


def process_write_bytes() -> int | None:
    """Bytes this process caused to be written to storage (``write_bytes`` of /proc/self/io): SQLite's
    database, WAL and journal writes included, whatever the page cache later merges."""
    try:
        for line in Path("/proc/self/io").read_text().splitlines():
            if line.startswith("write_bytes:"):
                return int(line.split()[1])
    except (OSError, ValueError):
        return None
    return None


class WearMeter:
    """Flash wear: the daemon's bytes written per day, over its whole run and over the last hour."""

    WINDOW_S = 3600.0

    def __init__(self) -> None:
        self.start = (time.monotonic(), process_write_bytes())
        self.samples: deque[tuple[float, int]] = deque()

    def sample(self) -> dict[str, object] | None:
        now, written = time.monotonic(), process_write_bytes()
        t0, w0 = self.start
        if written is None or w0 is None:
            return None
        self.samples.append((now, written))
        while len(self.samples) > 2 and now - self.samples[0][0] > self.WINDOW_S:
            self.samples.popleft()
        elapsed = max(now - t0, 1.0)
        recent_t, recent_w = self.samples[0]
        recent = (written - recent_w) / (now - recent_t) * 86_400 if now - recent_t >= 60 else None
        return {"written_bytes": written - w0, "elapsed_s": round(elapsed, 1),
                "bytes_per_day": int((written - w0) / elapsed * 86_400),
                "recent_bytes_per_day": None if recent is None else int(recent), "at": time.time()}


def beat_job(state: str, status_text: str, wear: dict[str, object] | None = None) -> WriteJob:
    def job(db: sqlite_utils.Database) -> None:
        now = time.time()
        db.execute("UPDATE daemon SET heartbeat_at = ?, state = ?, status_text = ? WHERE id = 1",
                   (now, state, status_text))
        if wear is not None:
            kv_set(db.conn, WEAR_KEY, json.dumps(wear), now)
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
