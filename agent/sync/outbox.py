"""The outbox: everything the cloud must eventually see, stored in SQLite within a disk budget.

One mechanism for what the control loop already stores: the outbox *pulls* rows of the decision
log (``decisions``, audit class) and of the module ``events`` table (events class) by a cursor
kept in ``kv`` and advanced in the same transaction as the copy (:func:`pull_decisions_job`,
:func:`pull_events_job`): every row reaches the outbox exactly once, whatever crashes, and its
writer need not know about us. Anything else (control state, telemetry summaries) is *pushed* with
:meth:`Outbox.enqueue` or, atomically with the producer's own row, :meth:`Outbox.job` inside its job.

Classes, highest priority first:

==========  ===========================================  ============================
class       what                                         under disk pressure
==========  ===========================================  ============================
control     control state the cloud must converge on    never dropped
audit       decision log, audit records                  never dropped
events      alarms, lifecycle events                     dropped (oldest first) 2nd
telemetry   telemetry summaries                          downsampled, then dropped 1st
==========  ===========================================  ============================

Byte accounting is per row (payload + key + a fixed overhead calibrated against ``dbstat``), kept
in ``outbox_classes`` by the same transactions that insert or delete rows, so it cannot drift.
"""

from __future__ import annotations

import asyncio
import json
import sqlite3
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from enum import IntEnum
from typing import Any

import sqlite_utils

from agent import clock
from agent.clock import BootSpan, Stamp
from agent.config.sync import OutboxSettings
from agent.errors import AgentError
from agent.logs import get_logger
from agent.storage.writer import Writer

log = get_logger("outbox")

#: Bytes a row costs on disk beyond its payload and key (row header, ids, stamps, two index entries).
ROW_OVERHEAD = 72
#: Real pages per accounted byte assumed until measured (b-tree pages are never full; deletes fragment them).
DEFAULT_PAGE_RATIO = 1.5
#: Safety margin on top of the measured ratio (fragmentation grows between two measurements).
PAGE_RATIO_MARGIN = 1.1
PAGE_RATIO_KEY = "outbox.page_ratio"
#: When degrading, free this fraction of the budget beyond the excess, so we do not degrade per insert.
DEGRADE_SLACK = 0.02
#: Keys longer than this are refused (they are repeated in an index and in every drained batch).
MAX_KEY = 200


class OutboxClass(IntEnum):
    CONTROL = 0
    AUDIT = 1
    EVENTS = 2
    TELEMETRY = 3

    @property
    def label(self) -> str:
        return self.name.lower()

    @property
    def droppable(self) -> bool:
        return self in (OutboxClass.EVENTS, OutboxClass.TELEMETRY)

    @classmethod
    def parse(cls, value: OutboxClass | str | int) -> OutboxClass:
        if isinstance(value, OutboxClass):
            return value
        if isinstance(value, int):
            return cls(value)
        try:
            return cls[value.upper()]
        except KeyError:
            raise OutboxError(f"unknown outbox class {value!r}; use one of "
                              f"{', '.join(c.label for c in cls)}") from None


class OutboxError(AgentError):
    code = "outbox_error"


@dataclass(frozen=True)
class Record:
    """One thing to deliver. ``key`` is its idempotency key: unique per gateway, stable across retries."""

    cls: OutboxClass
    payload: str  # JSON text
    key: str
    stamp: Stamp


def make_record(cls: OutboxClass | str | int, payload: Any, key: str, stamp: Stamp) -> Record:
    """Validate and encode one record; raises :class:`OutboxError` with what is wrong."""
    klass = OutboxClass.parse(cls)
    if not key or len(key) > MAX_KEY:
        raise OutboxError(f"outbox key must be 1..{MAX_KEY} characters (got {len(key)})")
    text = payload if isinstance(payload, str) else json.dumps(payload, separators=(",", ":"))
    if isinstance(payload, str):
        try:
            json.loads(text)
        except ValueError as exc:
            raise OutboxError(f"outbox payload for key {key!r} is not JSON text: {exc}") from None
    return Record(klass, text, key, stamp)


def record_bytes(payload: str, key: str) -> int:
    return len(payload.encode()) + len(key.encode()) + ROW_OVERHEAD


def day_of(wall: float) -> str:
    if not clock.wall_plausible(wall):
        return "unsynced"
    return datetime.fromtimestamp(wall, UTC).strftime("%Y-%m-%d")


# ---------------------------------------------------------------- write jobs (run on the one writer)

def boot_seq(db: sqlite_utils.Database, stamp: Stamp) -> int:
    """The small integer of ``stamp``'s boot, registering the boot and refreshing its last (wall, mono)."""
    conn = db.conn
    row = conn.execute("SELECT seq, last_mono FROM outbox_boots WHERE boot_id = ?", (stamp.boot_id,)).fetchone()
    if row is None:
        cur = conn.execute("INSERT INTO outbox_boots (boot_id, first_wall, last_wall, last_mono) VALUES (?, ?, ?, ?)",
                           (stamp.boot_id, stamp.wall, stamp.wall, stamp.mono))
        return int(cur.lastrowid or 0)
    if stamp.mono >= row[1]:
        conn.execute("UPDATE outbox_boots SET last_wall = ?, last_mono = ? WHERE seq = ?",
                     (stamp.wall, stamp.mono, row[0]))
    return int(row[0])


def insert_records(db: sqlite_utils.Database, records: Sequence[Record], budget: int) -> int:
    """Insert (idempotently by key), update the totals, then keep the budget. Returns rows inserted."""
    if not records:
        return 0
    conn = db.conn
    boots: dict[str, int] = {}
    per_class: dict[int, list[int]] = {}
    per_day: dict[str, list[int]] = {}
    inserted = 0
    for rec in records:
        seq = boots.get(rec.stamp.boot_id)
        if seq is None:
            seq = boots[rec.stamp.boot_id] = boot_seq(db, rec.stamp)
        size = record_bytes(rec.payload, rec.key)
        cur = conn.execute(
            "INSERT OR IGNORE INTO outbox (cls, key, payload, wall, boot, mono, bytes) VALUES (?, ?, ?, ?, ?, ?, ?)",
            (int(rec.cls), rec.key, rec.payload, rec.stamp.wall, seq, rec.stamp.mono, size))
        agg = per_class.setdefault(int(rec.cls), [0, 0, 0])
        if cur.rowcount == 1:
            inserted += 1
            agg[0] += 1
            agg[1] += size
            d = per_day.setdefault(day_of(rec.stamp.wall), [0, 0])
            d[0] += size
            d[1] += 1
        else:
            agg[2] += 1
    # refresh the boot's (wall, mono) with the newest stamp of this batch
    last = records[-1].stamp
    boot_seq(db, last)
    for cls, (rows, size, dups) in per_class.items():
        conn.execute("UPDATE outbox_classes SET rows = rows + ?, bytes = bytes + ?, enqueued = enqueued + ?, "
                     "duplicates = duplicates + ? WHERE cls = ?", (rows, size, rows, dups, cls))
    for day, (size, rows) in per_day.items():
        conn.execute("INSERT INTO outbox_daily (day, bytes, rows) VALUES (?, ?, ?) ON CONFLICT(day) DO UPDATE SET "
                     "bytes = bytes + excluded.bytes, rows = rows + excluded.rows", (day, size, rows))
    enforce_budget(conn, budget)
    return inserted


def enqueue_job(records: Sequence[Record], budget: int) -> Any:
    """A write job inserting ``records``; compose it into your own job to commit atomically with it."""
    def job(db: sqlite_utils.Database) -> int:
        return insert_records(db, records, budget)
    return job


def held_bytes(conn: sqlite3.Connection) -> int:
    return int(conn.execute("SELECT coalesce(sum(bytes), 0) FROM outbox_classes").fetchone()[0])


def _delete_rows(conn: sqlite3.Connection, cls: int, ids: list[int], column: str) -> int:
    """Delete ``ids`` of class ``cls`` and account for them under ``column``; returns bytes freed."""
    freed = 0
    for i in range(0, len(ids), 500):
        chunk = ids[i:i + 500]
        marks = ",".join("?" * len(chunk))
        got = conn.execute(f"SELECT count(*), coalesce(sum(bytes), 0) FROM outbox WHERE id IN ({marks})",
                           chunk).fetchone()
        conn.execute(f"DELETE FROM outbox WHERE id IN ({marks})", chunk)
        conn.execute(f"UPDATE outbox_classes SET rows = rows - ?, bytes = bytes - ?, {column} = {column} + ? "
                     "WHERE cls = ?", (got[0], got[1], got[0], cls))
        freed += int(got[1])
    return freed


def page_ratio(conn: sqlite3.Connection) -> float:
    row = conn.execute("SELECT value FROM kv WHERE key = ?", (PAGE_RATIO_KEY,)).fetchone()
    return float(row[0]) if row else DEFAULT_PAGE_RATIO


def measure_pages(path: Any) -> tuple[int, int]:
    """(bytes of the pages the outbox table and its indexes occupy, accounted bytes): run off the loop."""
    conn = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
    try:
        pages = int(conn.execute("SELECT coalesce(sum(pgsize), 0) FROM dbstat WHERE aggregate = TRUE AND name IN "
                                 "('outbox', 'outbox_key', 'outbox_cls')").fetchone()[0])
        return pages, held_bytes(conn)
    finally:
        conn.close()


def page_ratio_job(pages: int, accounted: int) -> Any:
    """Remember how many real page bytes one accounted byte costs, so the budget bounds the real pages."""
    def job(db: sqlite_utils.Database) -> float:
        ratio = DEFAULT_PAGE_RATIO if accounted < 256 * 1024 else max(1.0, pages / accounted) * PAGE_RATIO_MARGIN
        db.conn.execute("INSERT INTO kv (key, value, updated_at) VALUES (?, ?, ?) ON CONFLICT(key) DO UPDATE SET "
                        "value = excluded.value, updated_at = excluded.updated_at", (PAGE_RATIO_KEY, str(ratio),
                                                                                     time.time()))
        return ratio
    return job


def enforce_budget(conn: sqlite3.Connection, disk_budget: int) -> int:
    """Degrade until the held bytes fit the budget; returns bytes freed.

    The budget is on disk pages: accounted bytes times the measured page ratio (see ``page_ratio_job``).

    Order: 1) downsample telemetry (drop every second not-yet-thinned row, oldest first),
    2) drop the oldest telemetry, 3) drop the oldest events. Control and audit are never touched:
    if they alone exceed the budget, the excess stays and ``status`` reports it.
    """
    budget = int(disk_budget / page_ratio(conn))
    held = held_bytes(conn)
    if held <= budget:
        return 0
    need = held - budget + int(budget * DEGRADE_SLACK)
    freed = 0
    # 1) thin the oldest telemetry: keep every other row, mark the kept ones as thinned
    last_id = 0
    while freed < need:
        rows = conn.execute("SELECT id FROM outbox WHERE cls = ? AND id > ? AND thinned = 0 ORDER BY id LIMIT 1000",
                            (int(OutboxClass.TELEMETRY), last_id)).fetchall()
        if not rows:
            break
        ids = [int(r[0]) for r in rows]
        last_id = ids[-1]
        drop = ids[1::2]
        keep = ids[0::2]
        freed += _delete_rows(conn, int(OutboxClass.TELEMETRY), drop, "thinned")
        marks = ",".join("?" * len(keep))
        conn.execute(f"UPDATE outbox SET thinned = 1 WHERE id IN ({marks})", keep)
    # 2) and 3) drop the oldest of the droppable classes, lowest priority first
    for cls in (OutboxClass.TELEMETRY, OutboxClass.EVENTS):
        while freed < need:
            rows = conn.execute("SELECT id FROM outbox WHERE cls = ? ORDER BY id LIMIT 500", (int(cls),)).fetchall()
            if not rows:
                break
            freed += _delete_rows(conn, int(cls), [int(r[0]) for r in rows], "dropped")
    if freed:
        log.warning("outbox_degraded", freed_bytes=freed, budget_bytes=disk_budget, held_bytes=held - freed)
    return freed


def boots_of(conn: sqlite3.Connection) -> tuple[dict[int, BootSpan], dict[str, int]]:
    spans: dict[int, BootSpan] = {}
    seqs: dict[str, int] = {}
    for seq, boot_id, wall, mono in conn.execute("SELECT seq, boot_id, last_wall, last_mono FROM outbox_boots"):
        spans[int(seq)] = BootSpan(str(boot_id), float(wall), float(mono))
        seqs[str(boot_id)] = int(seq)
    return spans, seqs


def ttls(settings: OutboxSettings) -> dict[OutboxClass, int]:
    return {OutboxClass.CONTROL: settings.ttl_control_s, OutboxClass.AUDIT: settings.ttl_audit_s,
            OutboxClass.EVENTS: settings.ttl_events_s, OutboxClass.TELEMETRY: settings.ttl_telemetry_s}


def expire_job(settings: OutboxSettings, now: Stamp) -> Any:
    """Delete records older than their class TTL, measuring age by monotonic time (see ``clock.age``).

    Rows are in insertion order and insertion order is time order, so expiry walks each class from
    its oldest row and stops at the first one still young: no index on time needed.
    """
    limits = ttls(settings)

    def job(db: sqlite_utils.Database) -> int:
        conn = db.conn
        boot_seq(db, now)
        spans, _ = boots_of(conn)
        by_id = {span.boot_id: span for span in spans.values()}
        total = 0
        for cls, ttl in limits.items():
            if ttl <= 0:
                continue
            last_id = 0
            while True:
                rows = conn.execute("SELECT id, wall, boot, mono FROM outbox WHERE cls = ? AND id > ? "
                                    "ORDER BY id LIMIT 1000", (int(cls), last_id)).fetchall()
                if not rows:
                    break
                old: list[int] = []
                young = False
                for rid, wall, boot, mono in rows:
                    span = spans.get(int(boot))
                    stamp = Stamp(float(wall), span.boot_id if span else f"unknown-{boot}", float(mono))
                    if clock.age(stamp, now, by_id) > ttl:
                        old.append(int(rid))
                    else:
                        young = True
                        break
                if old:
                    _delete_rows(conn, int(cls), old, "expired")
                    total += len(old)
                if young:
                    break
                last_id = int(rows[-1][0])
        if total:
            log.info("outbox_expired", records=total)
        return total
    return job


def pull_decisions_job(budget: int, limit: int = 2000) -> Any:
    """Copy decision-log rows after the cursor into the outbox (audit class), advancing the cursor
    in the same transaction: each decision is enqueued exactly once, whatever crashes."""
    def job(db: sqlite_utils.Database) -> int:
        conn = db.conn
        row = conn.execute("SELECT value FROM kv WHERE key = 'outbox.decisions_cursor'").fetchone()
        cursor = int(row[0]) if row else 0
        rows = conn.execute(
            "SELECT id, wall, boot_id, mono, policy_name, policy_version, entrypoint, input, result, outcome, "
            "reason, subject FROM decisions WHERE id > ? ORDER BY id LIMIT ?", (cursor, limit)).fetchall()
        if not rows:
            return 0
        records = []
        for rid, wall, boot_id, mono, name, version, entry, inp, result, outcome, reason, subject in rows:
            payload = json.dumps({"type": "decision", "id": rid, "policy": name, "version": int(version),
                                  "entrypoint": entry, "input": _json_value(inp), "result": _json_value(result),
                                  "outcome": outcome, "reason": reason, "subject": subject}, separators=(",", ":"))
            records.append(Record(OutboxClass.AUDIT, payload, f"decision/{rid}",
                                  Stamp(float(wall), str(boot_id), float(mono))))
        insert_records(db, records, budget)
        conn.execute("INSERT INTO kv (key, value, updated_at) VALUES ('outbox.decisions_cursor', ?, ?) "
                     "ON CONFLICT(key) DO UPDATE SET value = excluded.value, updated_at = excluded.updated_at",
                     (str(rows[-1][0]), time.time()))
        return len(rows)
    return job


def pull_events_job(budget: int, limit: int = 2000) -> Any:
    """Copy rows of the control loop's ``events`` table after the cursor into the outbox (events class)."""
    def job(db: sqlite_utils.Database) -> int:
        conn = db.conn
        if conn.execute("SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = 'events'").fetchone() is None:
            return 0
        row = conn.execute("SELECT value FROM kv WHERE key = 'outbox.events_cursor'").fetchone()
        cursor = int(row[0]) if row else 0
        rows = conn.execute("SELECT id, source, device, severity, name, data, wall, boot_id, mono FROM events "
                            "WHERE id > ? ORDER BY id LIMIT ?", (cursor, limit)).fetchall()
        if not rows:
            return 0
        records = [Record(OutboxClass.EVENTS, json.dumps(
            {"type": "event", "id": rid, "source": source, "device": device, "severity": severity, "name": name,
             "data": _json_value(data)}, separators=(",", ":")), f"event/{rid}",
            Stamp(float(wall), str(boot), float(mono)))
            for rid, source, device, severity, name, data, wall, boot, mono in rows]
        insert_records(db, records, budget)
        conn.execute("INSERT INTO kv (key, value, updated_at) VALUES ('outbox.events_cursor', ?, ?) "
                     "ON CONFLICT(key) DO UPDATE SET value = excluded.value, updated_at = excluded.updated_at",
                     (str(rows[-1][0]), time.time()))
        return len(rows)
    return job


def _json_value(text: str) -> Any:
    try:
        return json.loads(text)
    except (ValueError, TypeError):
        return text


# ---------------------------------------------------------------- the producer-facing object

class Outbox:
    """What producers hold: ``await outbox.enqueue("events", {...}, key="alarm/42")``."""

    def __init__(self, writer: Writer, settings: OutboxSettings, now: clock.Clock = clock.now) -> None:
        self.writer = writer
        self.settings = settings
        self.now = now
        self.changed = asyncio.Event()

    async def enqueue(self, cls: OutboxClass | str, payload: Any, key: str) -> bool:
        """Store one record (idempotent by ``key``); True if it was new. Raises OutboxError on bad input."""
        rec = make_record(cls, payload, key, self.now())
        n: int = await self.writer.run(enqueue_job([rec], self.settings.disk_budget_bytes))
        self.changed.set()
        return n == 1

    async def enqueue_many(self, items: Iterable[tuple[OutboxClass | str, Any, str]]) -> int:
        stamp = self.now()
        recs = [make_record(c, p, k, stamp) for c, p, k in items]
        n: int = await self.writer.run(enqueue_job(recs, self.settings.disk_budget_bytes))
        self.changed.set()
        return n

    def job(self, cls: OutboxClass | str, payload: Any, key: str) -> Any:
        """A write job to run inside a producer's own job (``outbox.job(...)(db)``): atomic with its row."""
        return enqueue_job([make_record(cls, payload, key, self.now())], self.settings.disk_budget_bytes)
