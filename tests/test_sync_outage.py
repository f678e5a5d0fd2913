"""An accelerated 30-day outage: a month of readings into the store, clock jumps and a reboot, then reconnect.

Ends with the twins equal to the latest local state, every outbox record that the documented policy
kept delivered exactly once after de-duplication, control and audit complete, the budget never exceeded.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import random
import sqlite3
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest

from agent.clock import Stamp
from agent.config.sync import KubeEdgeSettings, OutboxSettings
from agent.storage import Store
from agent.sync import twins
from agent.sync.drain import Drainer
from agent.sync.kubeedge import TwinSync
from agent.sync.outbox import Outbox, enqueue_job, make_record
from agent.sync.service import OutboxService
from agent_devkit.broker import Broker
from agent_devkit.edgecore import EdgeCorePeer
from agent_devkit.uplink import Consumer

WALL0 = 1_780_000_000.0
DAYS = 30
SAMPLE_S = 60  # the configured reading rate: every property once a minute
DEVICES = {"press-1": ("temperature", "pressure", "rpm", "running", "mode"),
           "press-2": ("temperature", "pressure", "rpm", "running", "mode")}
TYPES = {"temperature": "float", "pressure": "float", "rpm": "int", "running": "bool", "mode": "string"}
BUDGET = 1_200_000


class SimClock:
    """True time ``t`` (s since the outage began) → what the gateway's clocks say.

    Boot 1 (days 0-15): NTP mis-steps the wall clock 60 days ahead on day 8 and back on day 9.
    Down for an hour, then boot 2 without RTC: wall starts at 1970 until NTP fixes it on day 16.
    """

    REBOOT = 15 * 86_400
    DOWN = 3600

    def stamp(self, t: float) -> Stamp:
        if t < self.REBOOT:
            wall = WALL0 + t + (60 * 86_400 if 8 * 86_400 <= t < 9 * 86_400 else 0)
            return Stamp(wall, "boot-1", 1000.0 + t)
        mono = t - self.REBOOT - self.DOWN + 5.0
        wall = mono if t < 16 * 86_400 else WALL0 + t
        return Stamp(wall, "boot-2", mono)


def value_of(prop: str, rng: random.Random) -> str:
    kind = TYPES[prop]
    if kind == "float":
        return f"{rng.uniform(10, 90):.2f}"
    if kind == "int":
        return str(rng.randrange(0, 3000))
    if kind == "bool":
        return rng.choice(("true", "false"))
    return rng.choice(("auto", "manual", "maintenance"))


def hour_job(hour: int, clk: SimClock, rng: random.Random, latest: dict[tuple[str, str], str],
             keys: dict[str, set[str]]) -> Any:
    """One simulated hour: readings, latest properties, telemetry summaries, events, decisions, control."""
    readings: list[tuple[Any, ...]] = []
    for minute in range(0, 3600, SAMPLE_S):
        t = hour * 3600 + minute
        st = clk.stamp(t)
        for dev, props in DEVICES.items():
            for prop in props:
                v = value_of(prop, rng)
                latest[(dev, prop)] = v
                num = float(v) if TYPES[prop] in ("float", "int") else None
                readings.append((f"factory/{dev}/{prop}", dev, prop, num, v, st.wall, st.boot_id, st.mono))
    end = clk.stamp(hour * 3600 + 3599)
    recs = []
    for dev in DEVICES:
        for slot in range(6):  # a telemetry summary every 10 minutes
            st = clk.stamp(hour * 3600 + slot * 600)
            key = f"tele/{dev}/{hour}/{slot}"
            recs.append(make_record("telemetry", {"device": dev, "avg": {"temperature": 50.1, "pressure": 3.2},
                                                  "n": 10}, key, st))
            keys["telemetry"].add(key)
        key = f"event/{dev}/{hour}"
        recs.append(make_record("events", {"device": dev, "event": "cycle_done", "hour": hour}, key, end))
        keys["events"].add(key)
    if hour % 24 == 0:
        key = f"control/{hour // 24}"
        recs.append(make_record("control", {"state": "auto", "day": hour // 24}, key, end))
        keys["control"].add(key)

    def job(db: Any) -> None:
        conn: sqlite3.Connection = db.conn
        conn.executemany("INSERT INTO readings (topic, device, metric, value, payload, wall, boot_id, mono) "
                         "VALUES (?, ?, ?, ?, ?, ?, ?, ?)", readings)
        for (dev, prop), v in latest.items():
            conn.execute("INSERT INTO properties (device, name, value, type, wall, boot_id, mono) VALUES "
                         "(?, ?, ?, ?, ?, ?, ?) ON CONFLICT(device, name) DO UPDATE SET value = excluded.value, "
                         "wall = excluded.wall, boot_id = excluded.boot_id, mono = excluded.mono",
                         (dev, prop, v, TYPES[prop], end.wall, end.boot_id, end.mono))
        for slot in range(12):  # a policy decision every 5 minutes
            st = clk.stamp(hour * 3600 + slot * 300)
            conn.execute("INSERT INTO decisions (wall, boot_id, mono, policy_name, policy_version, entrypoint, input, "
                         "result, outcome, reason, subject) VALUES (?, ?, ?, 'interlock', 3, 'allow', ?, 'true', "
                         "'allow', 'guard closed', 'press-1')",
                         (st.wall, st.boot_id, st.mono, json.dumps({"pressure": 3.2, "slot": slot})))
        enqueue_job(recs, BUDGET)(db)
    return job


def outbox_pages(path: Path) -> int:
    conn = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
    try:
        return int(conn.execute("SELECT coalesce(sum(pgsize), 0) FROM dbstat WHERE name IN "
                                "('outbox', 'outbox_key', 'outbox_cls')").fetchone()[0])
    finally:
        conn.close()


@pytest.mark.slow
def test_thirty_day_outage_then_reconnect(broker: Broker, tmp_path: Path) -> None:
    store = Store.open(tmp_path / "state", synchronous="NORMAL")
    settings = OutboxSettings(disk_budget_bytes=BUDGET, uplink_url=broker.url, jitter_max_s=0.5,
                              reconnect_max_s=1.0, rate_limit_records_s=0)
    ke = KubeEdgeSettings(enabled=True, node_name="demo-node", poll_interval_s=0.1, answer_timeout_s=1.0,
                          max_messages_s=30, reconnect_max_s=1.0)
    clk = SimClock()
    rng = random.Random(7)
    latest: dict[tuple[str, str], str] = {}
    keys: dict[str, set[str]] = {"control": set(), "telemetry": set(), "events": set()}
    broker.stop()  # the link is down for the whole month

    async def main() -> None:
        drainer = Drainer(store, settings, "gw-1")
        sync = TwinSync(store, ke, "gw-1", broker.host, broker.port)
        tasks = [asyncio.create_task(drainer.run()), asyncio.create_task(sync.run())]
        now = [clk.stamp(0)]
        service = OutboxService(store, settings, Outbox(store.writer, settings), now=lambda: now[0])
        pages_max = 0
        try:
            for hour in range(DAYS * 24):
                now[0] = clk.stamp(hour * 3600 + 3599)
                await store.writer.run(hour_job(hour, clk, rng, latest, keys))
                await service.tick(expire=hour % 6 == 5)  # decision cursor; every 6 h expiry + budget
                if hour % 3 == 2:
                    pages_max = max(pages_max, await asyncio.to_thread(outbox_pages, store.path))
            assert pages_max <= BUDGET  # the real pages of the outbox table and its indexes
            assert drainer.sent_records == 0 and not sync.connected
            remaining = await asyncio.to_thread(_keys_left, store.path)
            conn = store.reader()
            stats = {int(r[0]): r[1:] for r in conn.execute(
                "SELECT cls, enqueued, expired, dropped, thinned FROM outbox_classes")}
            conn.close()
            # the degradation order held: control/audit complete, telemetry degraded first
            assert stats[0][0] == len(keys["control"]) and stats[0][1:] == (0, 0, 0)
            assert stats[1][1:3] == (0, 0)  # audit: nothing expired or dropped
            assert stats[3][2] > 0  # telemetry was shed, oldest first
            assert stats[2][1] == 0  # no event expired early despite the clock jumps (TTL 45 days)
            for cls, (enq, exp, drop, thin) in stats.items():
                assert enq - exp - drop - thin == len(remaining.get(cls, set())), cls
            # the link returns
            await asyncio.to_thread(broker.start)
            consumer = await Consumer(broker.host, broker.port).start()
            peer = await EdgeCorePeer(broker.host, broker.port, bound={"default/press-1", "default/press-2"}).start()
            try:
                want = set().union(*remaining.values())
                await consumer.wait_for(want, timeout=60)

                def twins_equal() -> bool:
                    return all(peer.values(f"default/{dev}").get(prop) == twins.normalise(v, twins.twin_type(
                        TYPES[prop])) for (dev, prop), v in latest.items())
                async with asyncio.timeout(30):
                    while not twins_equal():
                        await asyncio.sleep(0.05)
                assert consumer.unique == want
                assert consumer.by_class["control"] == keys["control"]
                # every decision arrived in full (written by a producer that predates the audit trail)
                assert sum(len(p["records"]) for p in consumer.payloads.values()
                           if p.get("type") == "audit_window") == DAYS * 24 * 12
                gaps = [p for p in consumer.payloads.values() if p.get("type") == "gap"]
                assert gaps and sum(g["records"] for g in gaps if g["what"] == "telemetry") == stats[3][2]
                assert peer.violations == []
            finally:
                await peer.stop()
                await consumer.stop()
        finally:
            for task in tasks:
                task.cancel()
            for task in tasks:
                with contextlib.suppress(asyncio.CancelledError):
                    await task

    try:
        asyncio.run(main())
    finally:
        store.close()


def _keys_left(path: Path) -> dict[int, set[str]]:
    conn = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
    try:
        out: dict[int, set[str]] = {}
        for cls, key in conn.execute("SELECT cls, key FROM outbox"):
            out.setdefault(int(cls), set()).add(str(key))
        return out
    finally:
        conn.close()


def test_settings_replace_is_frozen() -> None:
    assert replace(OutboxSettings(), ttl_events_s=1).ttl_events_s == 1
