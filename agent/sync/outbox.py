"""The outbox: everything the cloud must eventually see, stored in SQLite within a disk budget.

What the control loop already stores is *packed* into the outbox by jobs that advance a cursor in
the same transaction as the copy, so every source row is enqueued exactly once whatever crashes:
sealed audit windows (``auditwin.py``), module events in chunks (:func:`pull_events_job`), telemetry
rollups and recent raw readings (``telemetry.py``). Packed records are stored zstandard-compressed
(``codec.py``). Anything else (control state) is *pushed* with :meth:`Outbox.enqueue` or, atomically
with the producer's own row, :meth:`Outbox.job` inside its job.

Classes, highest priority first, and what the disk budget may shed (:func:`enforce_budget`, in this
order; every shed range becomes a *gap record* in the audit class, delivered like any record):

==========  ==============================================  =========================================
class       what                                            under disk pressure
==========  ==============================================  =========================================
control     control state the cloud must converge on       never shed
audit       audit windows (counts + full records), gaps    1) windows widened (exemplars beyond the
                                                            first per key rolled into the counts),
                                                            2) extra full records rolled into counts;
                                                            counts, transitions and gaps never shed
events      module events (chunks)                          oldest dropped
telemetry   raw readings, 1-minute and 1-hour rollups,     raw first, then pushed records, then
            records pushed by producers                     1-minute (1-hour stays), then (after
                                                            events) 1-hour, oldest first
==========  ==============================================  =========================================

Rows the drain has handed to the broker (``outbox_classes.handed_id``) are never merged or dropped:
a record can be delivered, or shed with a gap record, but never both.

Byte accounting is per row (stored payload + key + a fixed overhead calibrated against ``dbstat``),
kept in ``outbox_classes`` by the same transactions that insert or delete rows, so it cannot drift.
"""

from __future__ import annotations

import asyncio
import json
import sqlite3
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from enum import IntEnum
from typing import Any

import sqlite_utils

from agent import clock, jsonsafe
from agent.clock import BootSpan, Stamp
from agent.config.sync import OutboxSettings
from agent.control.audit import P61, digest_hex, input_digest
from agent.errors import AgentError
from agent.logs import get_logger
from agent.storage.store import kv_get, kv_set
from agent.storage.writer import Writer
from agent.sync import codec

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
# records wrap documents that were decoded strictly on the way in (a decision's input holds a module's
# actuation; its result a policy's Rego numbers): generous bounds, only to keep the cloud side strict
RECORD_LIMITS = jsonsafe.Limits(64 * 1024 * 1024, max_depth=2 * jsonsafe.DEFAULT_MAX_DEPTH,
                                max_int_digits=jsonsafe.BIG_INT_DIGITS)


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
    payload: str | bytes  # JSON text, or its zstandard frame (enc = 1)
    key: str
    stamp: Stamp
    enc: int = codec.PLAIN
    kind: str = ""  # payload type (audit_window, gap, events, telemetry_1m, ...): what the budget may shed
    records: int = 1  # events / readings / decisions packed into it (what a gap record counts)
    plain: int = 0  # bytes of the JSON text before compression


def make_record(cls: OutboxClass | str | int, payload: Any, key: str, stamp: Stamp, *, kind: str = "",
                records: int = 1) -> Record:
    """Validate and encode one record (compressed when that pays); raises :class:`OutboxError`."""
    klass = OutboxClass.parse(cls)
    if not key or len(key) > MAX_KEY:
        raise OutboxError(f"outbox key must be 1..{MAX_KEY} characters (got {len(key)})")
    # what the outbox holds is sent to the cloud, whose parser is strict: so is this one (no NaN,
    # no 1e400, no lone surrogates); a record that is not is refused here, not by the cloud, where it
    # would fail a whole batch
    try:
        if isinstance(payload, str):
            jsonsafe.loads(payload, RECORD_LIMITS)
            text = payload
        else:
            text = jsonsafe.dumps(payload)
    except jsonsafe.JsonRejected as exc:
        raise OutboxError(f"outbox payload for key {key!r} is not JSON text (strict RFC 8259): {exc}") from None
    except (TypeError, ValueError) as exc:
        raise OutboxError(f"outbox payload for key {key!r} cannot be encoded as strict JSON: {exc}") from None
    stored, enc = codec.pack(text)
    return Record(klass, stored, key, stamp, enc, kind, records, len(text.encode()))


def record_bytes(payload: str | bytes, key: str) -> int:
    size = len(payload.encode()) if isinstance(payload, str) else len(payload)
    return size + len(key.encode()) + ROW_OVERHEAD


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


def insert_records(db: sqlite_utils.Database, records: Sequence[Record], budget: int, *, enforce: bool = True) -> int:
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
            "INSERT OR IGNORE INTO outbox (cls, key, payload, wall, boot, mono, bytes, enc, kind, records) "
            "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
            (int(rec.cls), rec.key, rec.payload, rec.stamp.wall, seq, rec.stamp.mono, size, rec.enc, rec.kind,
             rec.records))
        agg = per_class.setdefault(int(rec.cls), [0, 0, 0, 0, 0])
        if cur.rowcount == 1:
            inserted += 1
            agg[0] += 1
            agg[1] += size
            agg[3] += rec.plain or size - ROW_OVERHEAD - len(rec.key)
            agg[4] += size - ROW_OVERHEAD - len(rec.key)
            d = per_day.setdefault(day_of(rec.stamp.wall), [0, 0])
            d[0] += size
            d[1] += 1
        else:
            agg[2] += 1
    # refresh the boot's (wall, mono) with the newest stamp of this batch
    last = records[-1].stamp
    boot_seq(db, last)
    for cls, (rows, size, dups, plain, stored) in per_class.items():
        conn.execute("UPDATE outbox_classes SET rows = rows + ?, bytes = bytes + ?, enqueued = enqueued + ?, "
                     "duplicates = duplicates + ?, plain_bytes = plain_bytes + ?, stored_bytes = stored_bytes + ? "
                     "WHERE cls = ?", (rows, size, rows, dups, plain, stored, cls))
    for day, (size, rows) in per_day.items():
        conn.execute("INSERT INTO outbox_daily (day, bytes, rows) VALUES (?, ?, ?) ON CONFLICT(day) DO UPDATE SET "
                     "bytes = bytes + excluded.bytes, rows = rows + excluded.rows", (day, size, rows))
    if enforce:
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
    value = kv_get(conn, PAGE_RATIO_KEY)
    return float(value) if value is not None else DEFAULT_PAGE_RATIO


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
        kv_set(db.conn, PAGE_RATIO_KEY, str(ratio))
        return ratio
    return job


def _gap(conn: sqlite3.Connection, what: str, records: int, first: Stamp, last: Stamp, *,
         detail: dict[str, Any]) -> None:
    """Store one gap record (audit class, never shed) for detail shed under disk pressure."""
    n = int(conn.execute("INSERT INTO outbox_gaps (what, ranges, records) VALUES (?, 1, ?) ON CONFLICT(what) DO "
                         "UPDATE SET ranges = ranges + 1, records = records + excluded.records RETURNING ranges",
                         (what, records)).fetchone()[0])
    payload = {"type": "gap", "what": what, "records": records,
               "from": {"boot": first.boot_id, "mono": round(first.mono, 3), "wall": round(first.wall, 3)},
               "to": {"boot": last.boot_id, "mono": round(last.mono, 3), "wall": round(last.wall, 3)},
               "detail": detail}
    insert_records(sqlite_utils.Database(conn), [make_record(OutboxClass.AUDIT, payload, f"gap/{what}/{n}", last,
                                                             kind="gap")], 0, enforce=False)
    log.warning("outbox_shed", what=what, records=records, **{k: v for k, v in detail.items() if k != "keys"})


def handed(conn: sqlite3.Connection, cls: OutboxClass) -> int:
    """Rows of ``cls`` up to this id were handed to the broker: never merge or drop them."""
    return int(conn.execute("SELECT handed_id FROM outbox_classes WHERE cls = ?", (int(cls),)).fetchone()[0])


def _stamp(conn: sqlite3.Connection, wall: float, boot: int, mono: float) -> Stamp:
    row = conn.execute("SELECT boot_id FROM outbox_boots WHERE seq = ?", (boot,)).fetchone()
    return Stamp(float(wall), str(row[0]) if row else f"unknown-{boot}", float(mono))


def _drop_oldest(conn: sqlite3.Connection, cls: OutboxClass, kinds: tuple[str, ...] | None, what: str,
                 need: int) -> int:
    """Drop the oldest rows of ``cls`` (of ``kinds``; None = any) until ``need`` bytes are freed; one gap record."""
    floor = handed(conn, cls)
    sql = "SELECT id, wall, boot, mono, records, kind FROM outbox WHERE cls = ? AND id > ?"
    args: list[Any] = [int(cls), floor]
    if kinds is not None:
        sql += f" AND kind IN ({','.join('?' * len(kinds))})"
        args.extend(kinds)
    freed = 0
    dropped: list[tuple[Any, ...]] = []
    last_id = floor
    while freed < need:
        rows = conn.execute(sql + " AND id > ? ORDER BY id LIMIT 200", (*args, last_id)).fetchall()
        if not rows:
            break
        take = []
        for row in rows:
            take.append(row)
            last_id = int(row[0])
        for i in range(0, len(take), 20):
            chunk = take[i:i + 20]
            freed += _delete_rows(conn, int(cls), [int(r[0]) for r in chunk], "dropped")
            dropped.extend(chunk)
            if freed >= need:
                break
    if dropped:
        kinds_seen = sorted({str(r[5]) or cls.label for r in dropped})
        _gap(conn, what, sum(int(r[4]) for r in dropped), _stamp(conn, *dropped[0][1:4]),
             _stamp(conn, *dropped[-1][1:4]), detail={"class": cls.label, "kinds": kinds_seen, "rows": len(dropped)})
    return freed


def _key_of(c: dict[str, Any]) -> tuple[str, int, str, str, str]:
    return (c["policy"], c["version"], c["subject"], c["outcome"], c["reason"])


def _demote(doc: dict[str, Any], keep: Callable[[dict[str, Any], bool], bool]) -> int:
    """Move full records that ``keep(record, key_already_has_one)`` rejects into their key's count."""
    counts = {_key_of(c): c for c in doc["counts"]}
    seen: set[tuple[str, int, str, str, str]] = set()
    kept: list[dict[str, Any]] = []
    moved = 0
    for rec in doc["records"]:
        key = _key_of(rec)
        if keep(rec, key in seen) or key not in counts:
            kept.append(rec)
            seen.add(key)
            continue
        c = counts[key]
        c["full"] -= 1
        c["rolled"] += 1
        x, y = input_digest(rec["input"].encode())
        d1, d2 = int(c["digest"][:16], 16), int(c["digest"][16:], 16)
        c["digest"] = digest_hex((d1 + x) % P61, (d2 + y) % P61)
        moved += 1
    doc["records"] = kept
    return moved


def merge_windows(a: dict[str, Any], b: dict[str, Any]) -> dict[str, Any]:
    """One window document covering both (same boot and width): counts added, records concatenated."""
    counts: dict[tuple[str, int, str, str, str], dict[str, Any]] = {}
    for c in a["counts"] + b["counts"]:
        key = _key_of(c)
        have = counts.get(key)
        if have is None:
            counts[key] = dict(c)
            continue
        have["full"] += c["full"]
        have["rolled"] += c["rolled"]
        have["first"] = min(have["first"], c["first"], key=lambda x: (x is None, x))
        have["last"] = max(have["last"], c["last"], key=lambda x: (x is not None, x))
        have["mono"] = [min(have["mono"][0], c["mono"][0]), max(have["mono"][1], c["mono"][1])]
        have["digest"] = digest_hex((int(have["digest"][:16], 16) + int(c["digest"][:16], 16)) % P61,
                                    (int(have["digest"][16:], 16) + int(c["digest"][16:], 16)) % P61)
    return {**a, "index": [min(a["index"][0], b["index"][0]), max(a["index"][1], b["index"][1])],
            "part": None, "mono": [min(a["mono"][0], b["mono"][0]), max(a["mono"][1], b["mono"][1])],
            "wall_est": [min(a["wall_est"][0], b["wall_est"][0], key=lambda x: (x is None, x)),
                         max(a["wall_est"][1], b["wall_est"][1], key=lambda x: (x is not None, x))],
            "widened": (a.get("widened") or 1) + (b.get("widened") or 1),
            "counts": list(counts.values()), "records": a["records"] + b["records"]}


def _audit_docs(conn: sqlite3.Connection, after: int, limit: int) -> list[tuple[Any, ...]]:
    return conn.execute("SELECT id, key, payload, enc, wall, boot, mono FROM outbox WHERE cls = ? AND "
                        "kind = 'audit_window' AND id > ? ORDER BY id LIMIT ?",
                        (int(OutboxClass.AUDIT), after, limit)).fetchall()


def _replace_docs(conn: sqlite3.Connection, old: list[tuple[Any, ...]], doc: dict[str, Any], key: str) -> int:
    """Swap stored window documents for ``doc``; returns bytes freed (may be negative)."""
    before = held_bytes(conn)
    _delete_rows(conn, int(OutboxClass.AUDIT), [int(r[0]) for r in old], "thinned")
    last = old[-1]
    rec = make_record(OutboxClass.AUDIT, doc, key, _stamp(conn, last[4], last[5], last[6]), kind="audit_window",
                      records=len(doc["records"]))
    insert_records(sqlite_utils.Database(conn), [rec], 0, enforce=False)
    return before - held_bytes(conn)


def _widen_rule(rec: dict[str, Any], dup: bool) -> bool:
    """Widening keeps the first full record of each key and every non-exemplar."""
    return rec["kept"] != "exemplar" or not dup


def _extra_rule(rec: dict[str, Any], dup: bool) -> bool:
    """The last resort keeps transitions and the first full record of each key."""
    return rec["kept"] == "transition" or not dup


def _account_shed(conn: sqlite3.Connection, moved: dict[tuple[str, int, str, str, str], int]) -> None:
    for key, n in moved.items():
        conn.execute("UPDATE audit_keys SET full = full - ?, rolled = rolled + ?, shed = shed + ? WHERE policy = ? "
                     "AND version = ? AND subject = ? AND outcome = ? AND reason = ?", (n, n, n, *key))


def _shed_audit(conn: sqlite3.Connection, need: int, widen: bool) -> int:
    """Widen windows (merge neighbours, one exemplar per key) or drop extra full records, oldest first."""
    freed = 0
    after = handed(conn, OutboxClass.AUDIT)
    what = "audit_exemplars" if widen else "audit_extra"
    total = 0
    first: Stamp | None = None
    last: Stamp | None = None
    while freed < need:
        rows = _audit_docs(conn, after, 2 if widen else 1)
        if not rows or (widen and len(rows) < 2):
            break
        docs = [json.loads(codec.unpack(r[2], int(r[3]))) for r in rows]
        if widen:
            a, b = docs
            if a.get("legacy") or b.get("legacy") or (a["boot"], a["window_s"]) != (b["boot"], b["window_s"]):
                after = int(rows[0][0])
                continue
            doc = merge_windows(a, b)
            key = f"audit/{doc['boot']}/{doc['window_s']:g}/{doc['index'][0]}-{doc['index'][1]}/{rows[0][0]}"
        else:
            doc = docs[0]
            key = str(rows[0][1])
        before = {_key_of(c): int(c["full"]) for c in doc["counts"]}
        moved = _demote(doc, _widen_rule if widen else _extra_rule)
        if not widen and not moved:
            after = int(rows[0][0])
            continue
        _account_shed(conn, {k: before[k] - int(c["full"]) for c in doc["counts"]
                             if before[(k := _key_of(c))] != c["full"]})
        freed += _replace_docs(conn, rows, doc, key)
        total += moved
        first = first or _stamp(conn, rows[0][4], rows[0][5], rows[0][6])
        last = _stamp(conn, rows[-1][4], rows[-1][5], rows[-1][6])
        if not widen:
            after = int(conn.execute("SELECT id FROM outbox WHERE key = ?", (key,)).fetchone()[0])
    if total and first is not None and last is not None:
        _gap(conn, what, total, first, last, detail={"class": "audit", "moved_to_counts": total})
    return freed


def enforce_budget(conn: sqlite3.Connection, disk_budget: int) -> int:
    """Shed detail until the held bytes fit the budget; returns bytes freed.

    The budget is on disk pages: accounted bytes times the measured page ratio (see ``page_ratio_job``).
    The order is the module docstring's table; each step writes one gap record for what it shed.
    Control records, audit counts, transitions and gap records are never shed: if they alone exceed
    the budget, the excess stays and ``status`` reports it.
    """
    budget = int(disk_budget / page_ratio(conn))
    held = held_bytes(conn)
    if held <= budget:
        return 0
    need = held - budget + int(budget * DEGRADE_SLACK)
    freed = 0
    steps: list[Callable[[int], int]] = [
        lambda n: _drop_oldest(conn, OutboxClass.TELEMETRY, ("telemetry_raw",), "telemetry_raw", n),
        lambda n: _drop_oldest(conn, OutboxClass.TELEMETRY, ("",), "telemetry", n),  # pushed by producers
        lambda n: _drop_oldest(conn, OutboxClass.TELEMETRY, ("telemetry_1m",), "telemetry_resolution", n),
        lambda n: _drop_oldest(conn, OutboxClass.EVENTS, None, "events", n),
        lambda n: _drop_oldest(conn, OutboxClass.TELEMETRY, None, "telemetry_1h", n),
        lambda n: _shed_audit(conn, n, widen=True),
        lambda n: _shed_audit(conn, n, widen=False),
    ]
    for step in steps:
        if freed >= need:
            break
        freed += step(need - freed)
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


def set_cursor(conn: sqlite3.Connection, name: str, value: int) -> None:
    kv_set(conn, name, str(value))


def get_cursor(conn: sqlite3.Connection, name: str) -> int:
    return int(kv_get(conn, name) or 0)


def pull_events_job(budget: int, now: Stamp, max_wait_s: float, limit: int = 1000) -> Any:
    """Pack rows of the control loop's ``events`` table after the cursor into one outbox record (events
    class, compressed), advancing the cursor in the same transaction: each event is enqueued exactly
    once. Waits until ``limit`` events are pending or the oldest has waited ``max_wait_s`` (boot clock),
    so records are big enough to compress well. Returns how many events were packed."""
    def job(db: sqlite_utils.Database) -> int:
        conn = db.conn
        if conn.execute("SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = 'events'").fetchone() is None:
            return 0
        cursor = get_cursor(conn, "outbox.events_cursor")
        rows = conn.execute("SELECT id, source, device, severity, name, data, wall, boot_id, mono FROM events "
                            "WHERE id > ? ORDER BY id LIMIT ?", (cursor, limit)).fetchall()
        if not rows:
            return 0
        oldest = Stamp(float(rows[0][6]), str(rows[0][7]), float(rows[0][8]))
        if len(rows) < limit and oldest.boot_id == now.boot_id and now.mono - oldest.mono < max_wait_s:
            return 0
        events = [{"id": rid, "source": source, "device": device, "severity": severity, "name": name,
                   "data": _json_value(data), "wall": wall, "boot": boot, "mono": mono}
                  for rid, source, device, severity, name, data, wall, boot, mono in rows]
        last = rows[-1]
        rec = make_record(OutboxClass.EVENTS, {"type": "events", "events": events}, f"events/{rows[0][0]}-{last[0]}",
                          Stamp(float(last[6]), str(last[7]), float(last[8])), kind="events", records=len(rows))
        insert_records(db, [rec], budget)
        set_cursor(conn, "outbox.events_cursor", int(last[0]))
        return len(rows)
    return job


def _json_value(text: str) -> Any:
    """A stored JSON column as a value for a record; text that is not strict JSON (written by an older
    agent, e.g. with Infinity in it) is forwarded as the string it is, never re-encoded non-strictly."""
    try:
        return jsonsafe.loads(text, RECORD_LIMITS)
    except (jsonsafe.JsonRejected, TypeError):
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
