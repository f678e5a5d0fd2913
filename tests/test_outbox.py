"""Outbox storage: idempotent enqueue, the degradation order, TTLs across clock jumps, the decision cursor."""

from __future__ import annotations

import asyncio
import json
import sqlite3
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest

from agent.clock import Stamp
from agent.config import AgentConfig
from agent.config.sync import DAY, OutboxSettings
from agent.storage import Store
from agent.storage.report import Report
from agent.sync import codec
from agent.sync.auditwin import seal_legacy_job
from agent.sync.outbox import (
    Outbox,
    OutboxClass,
    OutboxError,
    enqueue_job,
    expire_job,
    held_bytes,
    make_record,
)
from agent.sync.status import outbox_section

WALL0 = 1_780_000_000.0  # a plausible wall time (2026)




def rows(store: Store, sql: str, *args: object) -> list[tuple[Any, ...]]:
    conn = store.reader()
    try:
        return [tuple(r) for r in conn.execute(sql, args).fetchall()]
    finally:
        conn.close()


def counts(store: Store) -> dict[str, int]:
    return {OutboxClass(int(c)).label: int(n) for c, n in rows(store, "SELECT cls, count(*) FROM outbox GROUP BY cls")}


def test_enqueue_is_idempotent_by_key_and_rejects_bad_input(store: Store) -> None:
    ob = Outbox(store.writer, OutboxSettings())
    assert asyncio.run(ob.enqueue("events", {"alarm": "high"}, key="alarm/1")) is True
    assert asyncio.run(ob.enqueue("events", {"alarm": "high"}, key="alarm/1")) is False
    assert counts(store) == {"events": 1}
    (dups,) = rows(store, "SELECT duplicates FROM outbox_classes WHERE cls = 2")[0]
    assert dups == 1
    with pytest.raises(OutboxError, match="unknown outbox class"):
        asyncio.run(ob.enqueue("gossip", {}, key="x"))
    with pytest.raises(OutboxError, match="not JSON"):
        make_record("events", "{not json", "k", Stamp(WALL0, "b", 1.0))
    with pytest.raises(OutboxError, match="key"):
        make_record("events", {}, "", Stamp(WALL0, "b", 1.0))


def test_budget_degrades_telemetry_first_then_events_never_audit_or_control(store: Store) -> None:
    budget = 60_000
    stamp = Stamp(WALL0, "boot-a", 10.0)
    payload = {"v": "x" * 100}
    recs = [make_record("control", payload, f"c/{i}", stamp) for i in range(20)]
    recs += [make_record("audit", payload, f"a/{i}", stamp) for i in range(50)]
    store.writer.run_sync(enqueue_job(recs, budget))
    held_max = 0
    for i in range(400):
        store.writer.run_sync(enqueue_job([make_record("telemetry", payload, f"t/{i}", stamp),
                                           make_record("events", payload, f"e/{i}", stamp)] if i % 4 == 0 else
                                          [make_record("telemetry", payload, f"t/{i}", stamp)], budget))
        conn = sqlite3.connect(store.path)
        held_max = max(held_max, held_bytes(conn))
        conn.close()
    assert held_max <= budget
    c = counts(store)
    assert c["control"] == 20  # never dropped
    gaps = rows(store, "SELECT key, kind FROM outbox WHERE cls = 1 AND kind = 'gap'")
    assert c["audit"] == 50 + len(gaps) and gaps  # never dropped; every shed range became a gap record
    stats = {OutboxClass(int(r[0])).label: r[1:] for r in rows(
        store, "SELECT cls, thinned, dropped FROM outbox_classes")}
    assert stats["telemetry"][1] > 0  # dropped, oldest first
    assert stats["control"] == (0, 0) and stats["audit"] == (0, 0)
    shed = dict(rows(store, "SELECT what, records FROM outbox_gaps"))
    assert shed["telemetry"] == stats["telemetry"][1]  # the gap records count exactly what went
    # newest telemetry survives (oldest goes first)
    keys = {str(r[0]) for r in rows(store, "SELECT key FROM outbox WHERE cls = 3")}
    assert "t/399" in keys and "t/0" not in keys
    # the accounting matches the rows
    (acc,) = rows(store, "SELECT sum(bytes) FROM outbox_classes")[0]
    (real,) = rows(store, "SELECT sum(bytes) FROM outbox")[0]
    assert acc == real


def test_budget_accounting_bounds_the_real_pages(store: Store) -> None:
    """The per-row estimate must not undercount what SQLite really stores (checked with dbstat)."""
    stamp = Stamp(WALL0, "boot-a", 10.0)
    recs = [make_record("telemetry", {"d": "sensor-7", "m": "temp", "avg": 21.5 + i / 100, "n": 60}, f"t/{i}", stamp)
            for i in range(5000)]
    store.writer.run_sync(enqueue_job(recs, 10**9))
    (acc,) = rows(store, "SELECT sum(bytes) FROM outbox_classes")[0]
    (pages,) = rows(store, "SELECT sum(pgsize) FROM dbstat WHERE name IN ('outbox', 'outbox_key', 'outbox_cls')")[0]
    assert isinstance(acc, int) and isinstance(pages, int)
    assert pages <= acc * 1.1, (pages, acc)


def test_ttl_uses_monotonic_time_across_wall_clock_jumps(store: Store) -> None:
    settings = OutboxSettings(ttl_events_s=3600, ttl_telemetry_s=600)
    # boot A: records at mono 100; then the wall clock jumps back a year and forward two
    a = Stamp(WALL0, "boot-a", 100.0)
    store.writer.run_sync(enqueue_job([make_record("events", {}, "e/a", a), make_record("telemetry", {}, "t/a", a),
                                       make_record("audit", {}, "x/a", a)], 10**9))
    jumped_back = Stamp(WALL0 - 365 * DAY, "boot-a", 100.0 + 500)
    store.writer.run_sync(expire_job(settings, jumped_back))
    assert counts(store) == {"audit": 1, "events": 1, "telemetry": 1}  # 500 s old: nothing expired
    jumped_fwd = Stamp(WALL0 + 2 * 365 * DAY, "boot-a", 100.0 + 700)
    store.writer.run_sync(expire_job(settings, jumped_fwd))
    assert counts(store) == {"audit": 1, "events": 1}  # telemetry (600 s) expired, events (1 h) not
    # reboot into 1970 (no RTC): downtime unknown -> counted as 0, so nothing expires early
    b = Stamp(12.0, "boot-b", 5.0)
    store.writer.run_sync(expire_job(settings, b))
    assert counts(store) == {"audit": 1, "events": 1}  # age 700 + 0 + 5 < 3600
    # still in 1970 but 3000 s of uptime later: 700 + 3000 + 5 > 3600 -> the event expires
    store.writer.run_sync(expire_job(settings, Stamp(3012.0, "boot-b", 3005.0)))
    assert counts(store) == {"audit": 1}  # audit never expires (ttl 0)
    (expired,) = rows(store, "SELECT sum(expired) FROM outbox_classes")[0]
    assert expired == 2


def test_ttl_counts_downtime_when_both_clocks_are_set(store: Store) -> None:
    settings = OutboxSettings(ttl_events_s=3600)
    store.writer.run_sync(enqueue_job([make_record("events", {}, "e/1", Stamp(WALL0, "boot-a", 100.0))], 10**9))
    store.writer.run_sync(expire_job(settings, Stamp(WALL0 + 200, "boot-a", 300.0)))  # last sign of boot A
    # boot B starts 2 h later (wall set by RTC): 200 s in A + 7200 s down + 10 s uptime > 1 h
    store.writer.run_sync(expire_job(settings, Stamp(WALL0 + 200 + 7200 + 10, "boot-b", 10.0)))
    assert counts(store) == {}


def test_decisions_of_an_older_agent_are_packed_once_after_the_upgrade(store: Store) -> None:
    """Rows written before the audit trail (kept = 'legacy') go out in full, by the old cursor, exactly once."""
    def add(n: int, start: int) -> None:
        def job(db: object) -> None:
            conn = db.conn  # type: ignore[attr-defined]
            for i in range(start, start + n):
                conn.execute("INSERT INTO decisions (wall, boot_id, mono, policy_name, policy_version, entrypoint, "
                             "input, result, outcome, reason) VALUES (?, 'boot-a', ?, 'p', 1, 'allow', ?, 'true', "
                             "'allow', '')", (WALL0 + i, float(i), f'{{"i":{i}}}'))
        store.writer.run_sync(job)

    add(1000, 0)
    assert store.writer.run_sync(seal_legacy_job(10**9)) == 500
    assert store.writer.run_sync(seal_legacy_job(10**9)) == 500
    assert store.writer.run_sync(seal_legacy_job(10**9)) == 0
    add(3, 1000)
    assert store.writer.run_sync(seal_legacy_job(10**9)) == 3
    assert counts(store) == {"audit": 3}
    (payload, enc) = rows(store, "SELECT payload, enc FROM outbox WHERE key = 'decision-legacy/1-500'")[0]
    doc = json.loads(codec.unpack(payload, enc))
    assert doc["records"][0]["input"] == '{"i":0}' and len(doc["records"]) == 500
    assert sum(c["full"] for c in doc["counts"]) == 500 and all(c["rolled"] == 0 for c in doc["counts"])
    (made,) = rows(store, "SELECT sum(made) FROM audit_keys")[0]
    assert made == 1003


def test_status_shows_backlog_oldest_rate_and_forecast(store: Store, tmp_path: Path) -> None:
    cfg = AgentConfig()
    cfg = replace(cfg, agent=replace(cfg.agent, state_dir=tmp_path / "state"),
                  outbox=OutboxSettings(disk_budget_bytes=1_000_000))
    for day in range(3):
        stamp = Stamp(WALL0 - (3 - day) * DAY, "boot-old", 10.0 + day)
        recs = [make_record("telemetry", {"x": i}, f"t/{day}/{i}", stamp) for i in range(100)]
        store.writer.run_sync(enqueue_job(recs, cfg.outbox.disk_budget_bytes))
    conn = store.reader()
    report = Report()
    try:
        outbox_section(conn, cfg, report)
    finally:
        conn.close()
    ob = report.data["outbox"]
    tele = next(c for c in ob["classes"] if c["class"] == "telemetry")
    assert tele["backlog"] == 300 and tele["oldest_unsent"] is not None
    assert ob["bytes_per_day"] > 0 and ob["held_bytes"] > 0
    assert ob["time_to_full_s"] == int((1_000_000 - ob["held_bytes"]) / ob["bytes_per_day"] * 86_400) or \
        abs(ob["time_to_full_s"] - (1_000_000 - ob["held_bytes"]) / ob["bytes_per_day"] * 86_400) < 2


def test_events_pulled_by_cursor_and_service_tick(store: Store) -> None:
    from agent.sync.service import OutboxService

    def add_events(n: int) -> None:
        def job(db: Any) -> None:
            for i in range(n):
                db.conn.execute("INSERT INTO events (source, device, severity, name, data, wall, boot_id, mono) "
                                "VALUES ('mod', 'line1/press', 'warning', 'overheat', ?, ?, 'boot-a', ?)",
                                (f'{{"t":{i}}}', WALL0 + i, float(i)))
        store.writer.run_sync(job)

    add_events(5)
    settings = OutboxSettings(ttl_events_s=3600)
    ob = Outbox(store.writer, settings)
    now = [Stamp(WALL0 + 10, "boot-a", 10.0)]
    service = OutboxService(store, settings, ob, now=lambda: now[0])
    asyncio.run(service.tick(expire=True))
    assert counts(store) == {}  # the oldest has waited 10 s of pack_wait_s = 60: not packed yet
    now[0] = Stamp(WALL0 + 61, "boot-a", 61.0)
    asyncio.run(service.tick(expire=True))
    add_events(2)
    asyncio.run(service.tick(expire=False))
    assert {str(r[0]) for r in rows(store, "SELECT key FROM outbox")} == {"events/1-5", "events/6-7"}
    (payload, enc) = rows(store, "SELECT payload, enc FROM outbox WHERE key = 'events/1-5'")[0]
    assert [e["data"] for e in json.loads(codec.unpack(payload, enc))["events"]] == [{"t": i} for i in range(5)]
    (ratio,) = rows(store, "SELECT value FROM kv WHERE key = 'outbox.page_ratio'")[0]
    assert float(ratio) >= 1.0
