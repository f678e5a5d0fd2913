"""Sealing audit windows into the outbox: one compressed document per finished window.

A window (``agent/control/audit.py``) is finished when its span on the boot clock has passed (plus a
grace for jobs still queued) or its boot has ended. Sealing it is ONE write job: read its counts and
full records, store the document in the outbox (audit class), add its counts to the running totals
(``audit_keys``), delete its count rows and mark it sealed. A crash leaves either the open window or
the sealed document, never both and never neither; a decision committed into a sealed window (a late
job) reopens it as its next ``part``, sealed again later under its own key.

The document format is the consumer contract (``docs/design.md``, type ``audit_window``).
"""

from __future__ import annotations

import json
from typing import Any

import sqlite_utils

from agent import clock
from agent.clock import Stamp
from agent.control.audit import digest_hex
from agent.sync.outbox import OutboxClass, get_cursor, insert_records, make_record, set_cursor

#: A window is sealed this long after its end on the boot clock, so jobs already queued with a stamp
#: inside it still land in it (a later one reopens it as a new part: correct, only less tidy).
SEAL_GRACE_S = 5.0
LEGACY_CURSOR = "outbox.decisions_cursor"  # the per-row cursor of agents before the audit trail
LEGACY_CHUNK = 500


def _record(row: tuple[Any, ...]) -> dict[str, Any]:
    rid, wall, mono, policy, version, entry, inp, result, outcome, reason, subject, kept = row
    return {"id": int(rid), "wall": wall, "mono": mono, "policy": policy, "version": int(version),
            "entrypoint": entry, "input": inp, "result": result, "outcome": outcome, "reason": reason,
            "subject": subject, "kept": kept}


RECORD_COLUMNS = ("id, wall, mono, policy_name, policy_version, entrypoint, input, result, outcome, reason, subject, "
                  "kept")


def window_document(conn: Any, window: tuple[int, str, float, int, int, int],
                    now: Stamp) -> tuple[dict[str, Any], list[tuple[int, int, int]], int]:
    """(document, [(key id, full, rolled)], last record id) of one open window, given as
    (id, boot id, width, index, part, id of the last record already sealed)."""
    win, boot_id, width, idx, part, after_id = window
    counts = []
    totals = []
    lo: tuple[float, float] | None = None
    hi: tuple[float, float] | None = None
    for kid, policy, version, subject, outcome, reason, full, rolled, fw, fm, lw, lm, d1, d2 in conn.execute(
            "SELECT k.id, k.policy, k.version, k.subject, k.outcome, k.reason, r.full, r.rolled, r.first_wall, "
            "r.first_mono, r.last_wall, r.last_mono, r.d1, r.d2 FROM audit_rollups r JOIN audit_keys k ON "
            "k.id = r.key WHERE r.win = ? ORDER BY k.id", (win,)):
        first = clock.best_wall(Stamp(fw, boot_id, fm), now)
        last = clock.best_wall(Stamp(lw, boot_id, lm), now)
        counts.append({"policy": policy, "version": int(version), "subject": subject, "outcome": outcome,
                       "reason": reason, "full": int(full), "rolled": int(rolled), "first": first, "last": last,
                       "mono": [fm, lm], "digest": digest_hex(int(d1), int(d2))})
        totals.append((int(kid), int(full), int(rolled)))
        lo = (fm, fw) if lo is None else min(lo, (fm, fw))
        hi = (lm, lw) if hi is None else max(hi, (lm, lw))
    records = [_record(r) for r in conn.execute(
        f"SELECT {RECORD_COLUMNS} FROM decisions WHERE win = ? AND id > ? ORDER BY id", (win, after_id))]
    last_id = records[-1]["id"] if records else after_id
    lo = lo if lo is not None else (idx * width, 0.0)
    hi = hi if hi is not None else lo
    doc = {"type": "audit_window", "boot": boot_id, "window_s": width, "index": [idx, idx], "part": part,
           "mono": [lo[0], hi[0]], "wall_est": [clock.best_wall(Stamp(lo[1], boot_id, lo[0]), now),
                                                clock.best_wall(Stamp(hi[1], boot_id, hi[0]), now)],
           "counts": counts, "records": records}
    return doc, totals, last_id


def seal_job(now: Stamp, budget: int, to_outbox: bool = True, limit: int = 20) -> Any:
    """Seal up to ``limit`` finished windows; returns how many. ``to_outbox`` false: count them only."""
    def job(db: sqlite_utils.Database) -> int:
        conn = db.conn
        sealed = 0
        rows = conn.execute(
            "SELECT w.id, b.boot_id, w.width_s, w.idx, w.part, w.sealed_id, w.last_wall, w.last_mono FROM "
            "audit_windows w JOIN boots b ON b.seq = w.boot WHERE w.state = 0 ORDER BY w.id LIMIT ?",
            (limit * 4,)).fetchall()
        for win, boot_id, width, idx, part, sealed_id, last_wall, last_mono in rows:
            if boot_id == now.boot_id and now.mono < (idx + 1) * width + SEAL_GRACE_S:
                continue  # still open
            doc, totals, last_id = window_document(
                conn, (int(win), str(boot_id), float(width), int(idx), int(part), int(sealed_id)), now)
            if to_outbox and (doc["counts"] or doc["records"]):
                key = f"audit/{boot_id}/{width:g}/{idx}/{part}"
                insert_records(db, [make_record(OutboxClass.AUDIT, doc, key, Stamp(last_wall, boot_id, last_mono),
                                                kind="audit_window", records=len(doc["records"]))], budget)
            for kid, full, rolled in totals:
                conn.execute("UPDATE audit_keys SET made = made + ?, full = full + ?, rolled = rolled + ? "
                             "WHERE id = ?", (full + rolled, full, rolled, kid))
            conn.execute("DELETE FROM audit_rollups WHERE win = ?", (win,))
            conn.execute("UPDATE audit_windows SET state = 1, sealed_id = ? WHERE id = ?", (last_id, win))
            sealed += 1
            if sealed >= limit:
                break
        return sealed
    return job


def seal_legacy_job(budget: int, to_outbox: bool = True) -> Any:
    """Decisions written before the audit trail existed (``kept = 'legacy'``) and not yet copied to the
    outbox by the old per-row cursor: packed as documents of full records (every one counted in full)."""
    def job(db: sqlite_utils.Database) -> int:
        conn = db.conn
        cursor = get_cursor(conn, LEGACY_CURSOR)
        rows = conn.execute(f"SELECT {RECORD_COLUMNS}, boot_id FROM decisions WHERE kept = 'legacy' AND id > ? "
                            "ORDER BY id LIMIT ?", (cursor, LEGACY_CHUNK)).fetchall()
        if not rows:
            return 0
        records = [_record(r[:-1]) for r in rows]
        counts: dict[tuple[str, int, str, str, str], dict[str, Any]] = {}
        for rec, row in zip(records, rows, strict=True):
            key = (rec["policy"], rec["version"], rec["subject"], rec["outcome"], rec["reason"])
            c = counts.setdefault(key, {"policy": key[0], "version": key[1], "subject": key[2], "outcome": key[3],
                                        "reason": key[4], "full": 0, "rolled": 0, "first": rec["wall"],
                                        "last": rec["wall"], "mono": [rec["mono"], rec["mono"]],
                                        "digest": digest_hex(0, 0), "boot": row[-1]})
            c["full"] += 1
            c["last"] = rec["wall"]
            c["mono"][1] = rec["mono"]
            conn.execute("INSERT INTO audit_keys (policy, version, subject, outcome, reason, made, full) VALUES "
                         "(?, ?, ?, ?, ?, 1, 1) ON CONFLICT(policy, version, subject, outcome, reason) DO UPDATE SET "
                         "made = made + 1, full = full + 1", key)
        first, last = rows[0], rows[-1]
        doc = {"type": "audit_window", "legacy": True, "boot": str(first[-1]), "window_s": None, "index": None,
               "part": None, "mono": [first[2], last[2]], "wall_est": [first[1], last[1]],
               "counts": list(counts.values()), "records": records}
        if to_outbox:
            insert_records(db, [make_record(OutboxClass.AUDIT, json.dumps(doc, separators=(",", ":")),
                                            f"decision-legacy/{first[0]}-{last[0]}",
                                            Stamp(float(last[1]), str(last[-1]), float(last[2])),
                                            kind="audit_window", records=len(records))], budget)
        set_cursor(conn, LEGACY_CURSOR, int(last[0]))
        return len(rows)
    return job
