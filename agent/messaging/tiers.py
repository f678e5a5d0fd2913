"""Telemetry tiers, the way process historians keep them: raw readings, 1-minute and 1-hour rollups.

Raw readings stay for the raw window (``[pipeline] readings_max_rows`` / ``readings_max_age_s``). Before
retention deletes any, every closed minute is rolled up into ``telemetry_rollups``: count, min, max,
sum (mean = sum / count) and last value per device and metric, at 60 s and 3600 s resolution. Buckets
are counted on the boot clock (bucket ``i`` of a boot covers boot-clock seconds ``[i*res, (i+1)*res)``),
like the audit windows, so a wall-clock step never splits or merges them; each row also keeps the wall
time of its last reading. A cursor in ``kv``, advanced in the same transaction as the rollup rows,
makes every reading count exactly once, and retention never deletes a reading beyond it.

Readings that arrive late for a minute already rolled up (a straggler committed after the minute
closed) update the rollup row and mark it for sending again (``packed = 0``): the cloud replaces a
bucket by its latest version.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import sqlite_utils

from agent.clock import PLAUSIBLE_WALL, Stamp
from agent.config.telemetry import TelemetrySettings
from agent.storage.boots import boot_number
from agent.storage.store import kv_get, kv_set

RESOLUTIONS = (60, 3600)
#: A minute is rolled up this long after it ended (boot clock), so readings already queued land in it.
GRACE_S = 5.0
CURSOR = "telemetry.rollup_cursor"
CHUNK = 20_000


def rollup_cursor(conn: Any) -> int:
    return int(kv_get(conn, CURSOR) or 0)


def rollup_job(now: Stamp, chunk: int = CHUNK, upto: int | None = None) -> Callable[[sqlite_utils.Database], int]:
    """Roll up the readings of closed minutes after the cursor (at most ``chunk``); returns how many.

    ``upto``: also those of open minutes up to that id (retention is about to delete them; their bucket
    gets the rest of its minute later, an upsert like any straggler)."""
    def job(db: sqlite_utils.Database) -> int:
        conn = db.conn
        cursor = rollup_cursor(conn)
        rows = conn.execute("SELECT id, device, metric, value, wall, boot_id, mono FROM readings WHERE id > ? "
                            "ORDER BY id LIMIT ?", (cursor, chunk)).fetchall()
        open_from = math.floor((now.mono - GRACE_S) / 60)
        agg: dict[tuple[int, str, int, str, str], list[float]] = {}
        boots: dict[str, int] = {}
        done = cursor
        for rid, device, metric, value, wall, boot_id, mono in rows:
            if (upto is None or rid > upto) and boot_id == now.boot_id and math.floor(mono / 60) >= open_from:
                break  # this minute is still open: the rest waits for the next pass
            done = int(rid)
            if value is None:
                continue  # text payloads have no min/max/mean
            boot = boots.get(boot_id)
            if boot is None:
                boot = boots[boot_id] = boot_number(conn, Stamp(float(wall), str(boot_id), float(mono)))
            v = float(value)
            for res in RESOLUTIONS:
                key = (res, str(boot_id), math.floor(mono / res), str(device), str(metric))
                a = agg.get(key)
                if a is None:
                    agg[key] = [1, v, v, v, v, float(wall), float(boot)]
                else:
                    a[0] += 1
                    a[1] = min(a[1], v)
                    a[2] = max(a[2], v)
                    a[3] += v
                    a[4] = v
                    a[5] = float(wall)
        conn.executemany(
            "INSERT INTO telemetry_rollups (res, boot, bucket, device, metric, n, vmin, vmax, vsum, vlast, wall) "
            "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?) ON CONFLICT(res, boot, bucket, device, metric) DO UPDATE SET "
            "n = n + excluded.n, vmin = min(vmin, excluded.vmin), vmax = max(vmax, excluded.vmax), "
            "vsum = vsum + excluded.vsum, vlast = excluded.vlast, wall = excluded.wall, packed = 0",
            [(res, int(a[6]), bucket, device, metric, int(a[0]), a[1], a[2], a[3], a[4], a[5])
             for (res, _b, bucket, device, metric), a in agg.items()])
        if done != cursor:
            kv_set(conn, CURSOR, str(done), now.wall)
        return done - cursor if rows and done != cursor else 0
    return job


def trim_rollups_job(settings: TelemetrySettings, now: Stamp, packed_only: bool) -> Callable[
        [sqlite_utils.Database], int]:
    """Delete rollups older than their tier's keep time (boot clock for this boot's buckets, wall clock for
    earlier boots only when both wall clocks look set: never early because of a wrong clock). With
    ``packed_only``, rows not yet packed for the cloud are kept whatever their age."""
    def job(db: sqlite_utils.Database) -> int:
        conn = db.conn
        row = conn.execute("SELECT seq FROM boots WHERE boot_id = ?", (now.boot_id,)).fetchone()
        boot = int(row[0]) if row else -1
        deleted = 0
        for res, keep in ((60, settings.keep_1m_s), (3600, settings.keep_1h_s)):
            wall_ok = now.wall >= PLAUSIBLE_WALL
            sql = ("DELETE FROM telemetry_rollups WHERE res = ? AND ((boot = ? AND (bucket + 1) * res < ?) "
                   "OR (boot != ? AND ? AND wall >= ? AND wall < ?))")
            args: list[Any] = [res, boot, now.mono - keep, boot, int(wall_ok), PLAUSIBLE_WALL, now.wall - keep]
            if keep <= 0:
                sql, args = "DELETE FROM telemetry_rollups WHERE res = ?", [res]
            if packed_only:
                sql += " AND packed = 1"
            deleted += conn.execute(sql, args).rowcount
        return deleted
    return job
