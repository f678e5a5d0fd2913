"""Bounded local telemetry: readings by count and age, decisions/rejects/events by count.

Each pass first rolls the closed minutes up into the telemetry tiers (``tiers.py``) and never deletes a
reading the rollup has not counted yet; rollups are trimmed by their tier's keep time.

Deletes go through the single writer in chunks (``CHUNK`` rows per job) so a large backlog never
stalls ingest behind one long transaction. Readings are deleted oldest-first by arrival (id order).
Age uses the boot-time clock for rows of the current boot (immune to wall-clock jumps) and the wall
clock only for rows of earlier boots.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

import sqlite_utils

from agent.clock import Stamp, now
from agent.config.pipeline import PipelineSettings
from agent.config.telemetry import TelemetrySettings
from agent.errors import AgentError
from agent.logs import get_logger
from agent.messaging.tiers import rollup_cursor, rollup_job, trim_rollups_job
from agent.storage import Store

log = get_logger("retention")

CHUNK = 20_000


def _ceiling(conn: Any, table: str) -> int | None:
    """The highest id of ``table`` retention may delete: readings the rollup has counted; decisions of
    sealed audit windows (and legacy rows already packed for the outbox)."""
    if table == "readings":
        return rollup_cursor(conn)
    if table == "decisions":
        row = conn.execute("SELECT min(d.id) FROM audit_windows w JOIN decisions d ON d.win = w.id "
                           "AND d.id > w.sealed_id WHERE w.state = 0").fetchone()
        legacy = conn.execute("SELECT value FROM kv WHERE key = 'outbox.decisions_cursor'").fetchone()
        limits = [int(row[0]) - 1] if row and row[0] is not None else []
        first_legacy = conn.execute("SELECT min(id) FROM decisions WHERE kept = 'legacy' AND id > ?",
                                    (int(legacy[0]) if legacy else 0,)).fetchone()[0]
        if first_legacy is not None:
            limits.append(int(first_legacy) - 1)
        return min(limits) if limits else None
    return None


def trim_by_count_job(table: str, keep: int, chunk: int = CHUNK,
                      stamp: Stamp | None = None) -> Callable[[sqlite_utils.Database], int]:
    """Delete the oldest rows beyond ``keep`` (at most ``chunk`` per job); return how many went.
    Readings are rolled up first, in the same transaction, whatever their minute."""
    def job(db: sqlite_utils.Database) -> int:
        row = db.conn.execute(f"SELECT min(id), max(id), count(*) FROM {table}").fetchone()
        lo, _hi, count = row
        if lo is None or count <= keep:
            return 0
        excess = min(count - keep, chunk)
        cut = db.conn.execute(f"SELECT id FROM {table} ORDER BY id LIMIT 1 OFFSET ?", (excess - 1,)).fetchone()[0]
        if table == "readings":
            while rollup_cursor(db.conn) < cut and rollup_job(stamp or now(), upto=cut)(db):
                pass
        ceiling = _ceiling(db.conn, table)
        if ceiling is not None:
            cut = min(cut, ceiling)
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
        return db.conn.execute("DELETE FROM readings WHERE id <= ?", (min(cut, rollup_cursor(db.conn)),)).rowcount
    return job


async def run_retention(store: Store, settings: PipelineSettings, telemetry: TelemetrySettings | None = None,
                        clock: Callable[[], Stamp] = now) -> dict[str, int]:
    """One retention pass; returns rows deleted per table."""
    deleted = {"readings": 0, "decisions": 0, "rejects": 0, "events": 0, "actuations": 0, "rollups": 0}
    tiers = telemetry or TelemetrySettings()
    while await store.writer.run(rollup_job(clock())) >= CHUNK:
        pass  # a backlog (after a long stop) is rolled up in chunks before anything is trimmed

    async def drain(table: str, make: Callable[[], Callable[[sqlite_utils.Database], int]]) -> None:
        while True:
            n = await store.writer.run(make())
            deleted[table] += n
            if n < CHUNK:
                return

    if settings.readings_max_age_s > 0:
        stamp = clock()
        await drain("readings", lambda: trim_readings_by_age_job(settings.readings_max_age_s, stamp))
    if settings.readings_max_rows > 0:
        await drain("readings", lambda: trim_by_count_job("readings", settings.readings_max_rows, stamp=clock()))
    if settings.decisions_max_rows > 0:
        await drain("decisions", lambda: trim_by_count_job("decisions", settings.decisions_max_rows))
        await drain("actuations", lambda: trim_by_count_job("actuations", settings.decisions_max_rows))
    await drain("rejects", lambda: trim_by_count_job("rejects", settings.rejects_max_rows))
    await drain("events", lambda: trim_by_count_job("events", settings.events_max_rows))
    deleted["rollups"] = await store.writer.run(trim_rollups_job(tiers, clock(), tiers.cloud_rollups))
    if any(deleted.values()):
        log.info("retention_trimmed", **deleted)
    return deleted


class Retention:
    """Service ``retention``: one pass at start, then every ``retention_interval_s``."""

    name = "retention"

    def __init__(self, store: Store, settings: Callable[[], PipelineSettings],
                 telemetry: Callable[[], TelemetrySettings] = TelemetrySettings) -> None:
        self.store = store
        self.settings = settings
        self.telemetry = telemetry
        self.passes = 0

    async def run(self) -> None:
        while True:
            s = self.settings()
            try:
                await run_retention(self.store, s, self.telemetry())
            except AgentError as exc:
                log.error("retention_failed", error=str(exc), code=exc.code)
            self.passes += 1
            await asyncio.sleep(s.retention_interval_s)
