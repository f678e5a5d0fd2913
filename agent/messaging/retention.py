"""Bounded local telemetry: readings by count and age, decisions/rejects/events by count.

Deletes go through the single writer in chunks (``CHUNK`` rows per job) so a large backlog never
stalls ingest behind one long transaction. Readings are deleted oldest-first by arrival (id order).
Age uses the boot-time clock for rows of the current boot (immune to wall-clock jumps) and the wall
clock only for rows of earlier boots.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable

import sqlite_utils

from agent.clock import Stamp, now
from agent.config.pipeline import PipelineSettings
from agent.errors import AgentError
from agent.logs import get_logger
from agent.storage import Store

log = get_logger("retention")

CHUNK = 20_000


def trim_by_count_job(table: str, keep: int, chunk: int = CHUNK) -> Callable[[sqlite_utils.Database], int]:
    """Delete the oldest rows beyond ``keep`` (at most ``chunk`` per job); return how many went."""
    def job(db: sqlite_utils.Database) -> int:
        row = db.conn.execute(f"SELECT min(id), max(id), count(*) FROM {table}").fetchone()
        lo, _hi, count = row
        if lo is None or count <= keep:
            return 0
        excess = min(count - keep, chunk)
        cut = db.conn.execute(f"SELECT id FROM {table} ORDER BY id LIMIT 1 OFFSET ?", (excess - 1,)).fetchone()[0]
        return db.conn.execute(f"DELETE FROM {table} WHERE id <= ?", (cut,)).rowcount
    return job


def trim_readings_by_age_job(max_age_s: float, stamp: Stamp, chunk: int = CHUNK) -> Callable[
        [sqlite_utils.Database], int]:
    """Delete readings older than ``max_age_s`` among the oldest ``chunk`` (by arrival)."""
    def job(db: sqlite_utils.Database) -> int:
        cut = db.conn.execute(
            "SELECT max(id) FROM (SELECT id, wall, boot_id, mono FROM readings ORDER BY id LIMIT ?)"
            " WHERE (boot_id = ? AND mono < ?) OR (boot_id != ? AND wall < ?)",
            (chunk, stamp.boot_id, stamp.mono - max_age_s, stamp.boot_id, stamp.wall - max_age_s)).fetchone()[0]
        if cut is None:
            return 0
        return db.conn.execute("DELETE FROM readings WHERE id <= ?", (cut,)).rowcount
    return job


async def run_retention(store: Store, settings: PipelineSettings) -> dict[str, int]:
    """One retention pass; returns rows deleted per table."""
    deleted = {"readings": 0, "decisions": 0, "rejects": 0, "events": 0, "actuations": 0}

    async def drain(table: str, make: Callable[[], Callable[[sqlite_utils.Database], int]]) -> None:
        while True:
            n = await store.writer.run(make())
            deleted[table] += n
            if n < CHUNK:
                return

    if settings.readings_max_age_s > 0:
        stamp = now()
        await drain("readings", lambda: trim_readings_by_age_job(settings.readings_max_age_s, stamp))
    if settings.readings_max_rows > 0:
        await drain("readings", lambda: trim_by_count_job("readings", settings.readings_max_rows))
    if settings.decisions_max_rows > 0:
        await drain("decisions", lambda: trim_by_count_job("decisions", settings.decisions_max_rows))
        await drain("actuations", lambda: trim_by_count_job("actuations", settings.decisions_max_rows))
    await drain("rejects", lambda: trim_by_count_job("rejects", settings.rejects_max_rows))
    await drain("events", lambda: trim_by_count_job("events", settings.events_max_rows))
    if any(deleted.values()):
        log.info("retention_trimmed", **deleted)
    return deleted


class Retention:
    """Service ``retention``: one pass at start, then every ``retention_interval_s``."""

    name = "retention"

    def __init__(self, store: Store, settings: Callable[[], PipelineSettings]) -> None:
        self.store = store
        self.settings = settings
        self.passes = 0

    async def run(self) -> None:
        while True:
            s = self.settings()
            try:
                await run_retention(self.store, s)
            except AgentError as exc:
                log.error("retention_failed", error=str(exc), code=exc.code)
            self.passes += 1
            await asyncio.sleep(s.retention_interval_s)
