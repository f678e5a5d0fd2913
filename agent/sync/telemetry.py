"""Packing telemetry for the cloud: rollups for the whole outage, raw readings for the recent past.

Rollup rows (``agent/messaging/tiers.py``) not yet packed go into compressed outbox records (telemetry
class), marked packed in the same transaction: a 1-minute record covers up to ``ROLLUP_ROWS`` rows
(about ten minutes of 200 series), a 1-hour record the same. Under disk pressure the budget drops
1-minute records before 1-hour ones (``outbox.enforce_budget``), which is how the resolution of an
outage that outgrew the disk degrades from minutes to hours, with a gap record saying so.

Raw readings are packed only while the uplink is up: at reconnect those younger than
``[telemetry] raw_recent_s`` are sent, then every new one, by a cursor in ``kv``.
"""

from __future__ import annotations

from collections.abc import Callable

import sqlite_utils

from agent import clock
from agent.clock import Stamp
from agent.storage.boots import boot_ids
from agent.sync.outbox import OutboxClass, get_cursor, insert_records, make_record, set_cursor

ROLLUP_ROWS = 2000
RAW_ROWS = 2000
#: Pack a partial record once its oldest row has waited this long (boot clock): the cloud is never
#: more than this behind on what is already final.
MAX_WAIT_S = 600.0
RAW_MAX_WAIT_S = 10.0
GRACE_S = 5.0
RAW_CURSOR = "outbox.raw_cursor"
COLUMNS = ["boot", "bucket", "device", "metric", "n", "min", "max", "mean", "last", "wall"]


def pack_rollups_job(res: int, now: Stamp, budget: int) -> Callable[[sqlite_utils.Database], int]:
    """One outbox record of unpacked, closed buckets of resolution ``res``; returns rows packed."""
    def job(db: sqlite_utils.Database) -> int:
        conn = db.conn
        row = conn.execute("SELECT seq FROM boots WHERE boot_id = ?", (now.boot_id,)).fetchone()
        boot_now = int(row[0]) if row else -1
        rows = conn.execute(
            "SELECT boot, bucket, device, metric, n, vmin, vmax, vsum, vlast, wall FROM telemetry_rollups "
            "WHERE res = ? AND packed = 0 AND NOT (boot = ? AND (bucket + 1) * res + ? > ?) "
            "ORDER BY boot, bucket LIMIT ?", (res, boot_now, GRACE_S, now.mono, ROLLUP_ROWS)).fetchall()
        if not rows:
            return 0
        first_boot, first_bucket = int(rows[0][0]), int(rows[0][1])
        if len(rows) < ROLLUP_ROWS and first_boot == boot_now and now.mono - (first_bucket + 1) * res < MAX_WAIT_S:
            return 0  # wait for a fuller record (compresses better), at most MAX_WAIT_S
        boots = boot_ids(conn)
        data = [[boots.get(int(b), str(b)), int(k), d, m, int(n), lo, hi, s / n if n else None, last, wall]
                for b, k, d, m, n, lo, hi, s, last, wall in rows]
        last_row = rows[-1]
        last_boot = boots.get(int(last_row[0]), str(last_row[0]))
        stamp = Stamp(float(last_row[9]), last_boot, float((int(last_row[1]) + 1) * res))
        kind = "telemetry_1m" if res == 60 else "telemetry_1h"
        key = f"tele/{res}/{first_boot}.{first_bucket}-{int(last_row[0])}.{int(last_row[1])}/{len(rows)}"
        key += f"/{get_cursor(conn, f'outbox.tele{res}_records') + 1}"
        insert_records(db, [make_record(OutboxClass.TELEMETRY, {"type": "telemetry_rollups", "res_s": res,
                                                                 "columns": COLUMNS, "rows": data},
                                        key, stamp, kind=kind, records=len(rows))], budget)
        set_cursor(conn, f"outbox.tele{res}_records", get_cursor(conn, f"outbox.tele{res}_records") + 1)
        conn.executemany("UPDATE telemetry_rollups SET packed = 1 WHERE res = ? AND boot = ? AND bucket = ? AND "
                         "device = ? AND metric = ?", [(res, int(r[0]), int(r[1]), r[2], r[3]) for r in rows])
        return len(rows)
    return job


def pack_raw_job(now: Stamp, recent_s: float, budget: int) -> Callable[[sqlite_utils.Database], int]:
    """While the uplink is up: one outbox record of raw readings after the cursor that are younger than
    ``recent_s`` (older ones are covered by the rollups); returns readings packed."""
    def job(db: sqlite_utils.Database) -> int:
        conn = db.conn
        if recent_s <= 0:
            return 0
        link = conn.execute("SELECT state FROM links WHERE name = 'uplink'").fetchone()
        if link is None or link[0] != "up":
            return 0
        cursor = get_cursor(conn, RAW_CURSOR)
        rows = conn.execute("SELECT id, device, metric, value, payload, wall, boot_id, mono FROM readings "
                            "WHERE id > ? ORDER BY id LIMIT ?", (cursor, RAW_ROWS)).fetchall()
        if not rows:
            return 0
        fresh = [r for r in rows if clock.age(Stamp(float(r[5]), str(r[6]), float(r[7])), now, {}) <= recent_s]
        if not fresh:
            set_cursor(conn, RAW_CURSOR, int(rows[-1][0]))  # all older than the recent past: skip them
            return 0
        oldest = fresh[0]
        if len(rows) < RAW_ROWS and oldest[6] == now.boot_id and now.mono - float(oldest[7]) < RAW_MAX_WAIT_S:
            return 0
        readings = [{"id": rid, "device": d, "metric": m, "value": v, **({"payload": p} if p is not None else {}),
                     "wall": w, "boot": b, "mono": mono} for rid, d, m, v, p, w, b, mono in fresh]
        last = fresh[-1]
        insert_records(db, [make_record(OutboxClass.TELEMETRY, {"type": "telemetry_raw", "readings": readings},
                                        f"raw/{fresh[0][0]}-{last[0]}", Stamp(float(last[5]), str(last[6]),
                                                                               float(last[7])),
                                        kind="telemetry_raw", records=len(fresh))], budget)
        set_cursor(conn, RAW_CURSOR, int(rows[-1][0]))
        return len(fresh)
    return job


