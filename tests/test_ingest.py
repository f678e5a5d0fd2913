"""Durable ingest against a real Mosquitto and a real SQLite file: store first, then acknowledge.

The fault tests compare what the *publisher* got PUBACKs for with the rows in SQLite: every
acknowledged reading must be stored (duplicates from redelivery are allowed, loss is not).
"""

from __future__ import annotations

import asyncio
import json
import sqlite3
import time
from pathlib import Path

import aiomqtt
import pytest

from agent.clock import Stamp, boot_id, now
from agent.config.model import LocalBrokerSettings
from agent.config.pipeline import PipelineSettings
from agent.messaging.bus import LocalBus, PublishRefused
from agent.messaging.ingest import Ingest, store_batch_job
from agent.messaging.readings import Reading
from agent.messaging.retention import run_retention
from agent.storage import Store
from agent_devkit.broker import Broker
from agent_devkit.localbus import persistent_broker, publish_counted

# the broker saves its state after every change, so a SIGKILL of the *broker* loses nothing it acked
DURABLE_BROKER = "autosave_on_changes true\n"




def seqs_in(db: Path) -> list[int]:
    conn = sqlite3.connect(f"file:{db}?mode=ro", uri=True)
    try:
        rows = conn.execute("SELECT json_extract(payload, '$.seq') FROM readings WHERE payload IS NOT NULL")
        return [int(r[0]) for r in rows if r[0] is not None]
    finally:
        conn.close()


def items(start: int, stop: int) -> list[tuple[str, bytes]]:
    return [(f"factory/l1/s{i % 7}/temp", json.dumps({"value": i * 0.5, "seq": i}).encode())
            for i in range(start, stop)]


class Agentlet:
    """The daemon's ingest path in-process: bus + ingest on a real Store (no modules, no policy)."""

    def __init__(self, broker: Broker, store: Store, client_id: str = "t-ingest") -> None:
        settings = LocalBrokerSettings(host=broker.host, port=broker.port, client_id=client_id,
                                       reconnect_min_s=0.05, reconnect_max_s=0.5)
        self.bus = LocalBus(settings, "node")
        self.ingest = Ingest(store, batch_max=256, on_store_failure=self.bus.request_reconnect)
        self.bus.subscribe("factory/#", self.ingest.handle, manual_ack=True)
        self.tasks: list[asyncio.Task[None]] = []

    async def __aenter__(self) -> Agentlet:
        self.tasks = [asyncio.create_task(self.bus.run()), asyncio.create_task(self.ingest.run())]
        assert await self.bus.wait_connected(10)
        return self

    async def __aexit__(self, *exc: object) -> None:
        for t in self.tasks:
            t.cancel()
        await asyncio.gather(*self.tasks, return_exceptions=True)


async def wait_for(cond: object, within: float, what: str) -> None:
    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        if cond():  # type: ignore[operator]
            return
        await asyncio.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


def test_readings_are_stored_then_acked_and_malformed_ones_are_kept_as_rejects(tmp_path: Path,
                                                                               store: Store) -> None:
    bad = [("factory/l1/s1/temp", b"hot"), ("factory/l1/s1/temp", b"\xff"), ("factory/oops", b"1"),
           ("factory/l1/s1/temp", b'{"v": 2}')]

    async def scenario(broker: Broker) -> None:
        async with Agentlet(broker, store) as a:
            acked = await publish_counted(broker.host, broker.port, items(0, 1500) + bad, client_id="t-pub")
            assert len(acked) == 1504
            await wait_for(lambda: a.ingest.stored >= 1500 and a.ingest.rejected >= 4, 20, "ingest")
            await wait_for(lambda: a.bus.acked >= 1504, 10, "acks")
        # everything was acked: a new session under the same id gets nothing redelivered
        async with Agentlet(broker, store) as b:
            await asyncio.sleep(1.0)
            assert b.bus.received == 0

    with persistent_broker(tmp_path / "mq") as broker:
        asyncio.run(scenario(broker))
    assert sorted(seqs_in(store.path)) == list(range(1500))
    conn = store.reader()
    rejects = conn.execute("SELECT topic, error FROM rejects ORDER BY id").fetchall()
    row = conn.execute("SELECT device, metric, value FROM readings ORDER BY id LIMIT 1").fetchone()
    conn.close()
    assert [t for t, _ in rejects] == [t for t, _ in bad]
    assert "neither a number nor JSON" in rejects[0][1] and "not UTF-8" in rejects[1][1]
    assert "no 'value' key" in rejects[3][1]
    assert row == ("l1/s0", "temp", 0.0)


def test_broker_killed_mid_stream_loses_nothing_it_acknowledged(tmp_path: Path, store: Store) -> None:
    total = 4000
    all_items = items(0, total)

    async def scenario(broker: Broker) -> set[int]:
        acked: set[int] = set()
        async with Agentlet(broker, store) as a:
            killed = False
            pending = list(range(total))
            deadline = time.monotonic() + 60
            while pending and time.monotonic() < deadline:
                chunk = pending[:500]
                got = await publish_counted(broker.host, broker.port, [all_items[i] for i in chunk],
                                            client_id="t-pub", in_flight=40)
                acked.update(chunk[j] for j in got)
                pending = [i for i in pending if i not in acked]
                if not killed and len(acked) >= total // 3:
                    # kill the broker while the agent is consuming, restart it on the same port
                    broker.kill()
                    killed = True
                    await asyncio.sleep(0.3)
                    await asyncio.to_thread(broker.start)
            assert killed and not pending
            await wait_for(lambda: set(seqs_in(store.path)) >= acked, 60, "every acked reading in SQLite")
            assert a.bus.connects >= 2
        return acked

    with persistent_broker(tmp_path / "mq", DURABLE_BROKER) as broker:
        acked = asyncio.run(scenario(broker))
    stored = seqs_in(store.path)
    assert acked <= set(stored)
    assert len(acked) == total


def test_store_failure_leaves_messages_unacked_for_redelivery(tmp_path: Path) -> None:
    """The writer is stopped under the ingest: nothing is acked, and after restart all arrive."""
    state = tmp_path / "state"

    async def scenario(broker: Broker) -> None:
        s1 = Store.open(state)
        async with Agentlet(broker, s1) as a:
            s1.writer.stop()  # every commit now fails
            acked = await publish_counted(broker.host, broker.port, items(0, 200), client_id="t-pub")
            assert len(acked) == 200
            await wait_for(lambda: a.ingest.failed_batches > 0, 10, "a failed batch")
            assert a.bus.acked == 0
        s2 = Store.open(state)
        try:
            async with Agentlet(broker, s2) as b:
                await wait_for(lambda: b.ingest.stored >= 200, 20, "redelivered readings stored")
        finally:
            s2.close()

    with persistent_broker(tmp_path / "mq") as broker:
        asyncio.run(scenario(broker))
    assert sorted(set(seqs_in(state / "agent.db"))) == list(range(200))


def test_retention_bounds_readings_by_count_and_age_keeping_the_newest(store: Store) -> None:
    old = Stamp(wall=time.time() - 3600, boot_id=boot_id(), mono=now().mono - 3600)
    fresh = now()
    readings = [Reading(f"factory/l/s/m{i}", "l/s", "m", float(i), None, old) for i in range(3000)]
    readings += [Reading(f"factory/l/s/m{i}", "l/s", "m", float(i), None, fresh) for i in range(3000, 9000)]
    store.writer.run_sync(store_batch_job(readings, []))
    by_age = PipelineSettings(readings_max_rows=0, readings_max_age_s=600)
    deleted = asyncio.run(run_retention(store, by_age))
    assert deleted["readings"] == 3000
    by_count = PipelineSettings(readings_max_rows=2500, readings_max_age_s=0)
    deleted = asyncio.run(run_retention(store, by_count))
    assert deleted["readings"] == 3500
    conn = store.reader()
    lo, hi, n = conn.execute("SELECT min(value), max(value), count(*) FROM readings").fetchone()
    conn.close()
    assert (lo, hi, n) == (6500.0, 8999.0, 2500)


def test_retention_of_a_previous_boot_uses_the_wall_clock(store: Store) -> None:
    earlier = Stamp(wall=time.time() - 7200, boot_id="another-boot", mono=999999.0)
    recent = Stamp(wall=time.time() - 10, boot_id="another-boot", mono=1.0)
    store.writer.run_sync(store_batch_job(
        [Reading("factory/l/s/m", "l/s", "m", 1.0, None, earlier),
         Reading("factory/l/s/m", "l/s", "m", 2.0, None, recent)], []))
    asyncio.run(run_retention(store, PipelineSettings(readings_max_age_s=3600)))
    conn = store.reader()
    assert conn.execute("SELECT value FROM readings").fetchall() == [(2.0,)]
    conn.close()


def test_publisher_api_of_the_bus_delivers_qos1(tmp_path: Path, store: Store) -> None:
    async def scenario(broker: Broker) -> list[bytes]:
        got: list[bytes] = []
        async with Agentlet(broker, store) as a, aiomqtt.Client(broker.host, broker.port) as sub:
            await sub.subscribe("cmd/#", qos=1)
            for bad_topic, bad_qos in (("cmd/+/valve", 1), ("cmd/l1/valve", 2)):
                with pytest.raises(PublishRefused):
                    await a.bus.publish(bad_topic, b"x", qos=bad_qos)
            await a.bus.publish("cmd/l1/valve", b'{"open":true}', qos=1)
            async with asyncio.timeout(10):
                async for m in sub.messages:
                    got.append(bytes(m.payload))  # type: ignore[arg-type,unused-ignore]
                    break
        return got

    with persistent_broker(tmp_path / "mq") as broker:
        assert asyncio.run(scenario(broker)) == [b'{"open":true}']


def test_a_retained_replay_on_subscribe_is_not_stored_twice(tmp_path: Path, store: Store) -> None:
    async def scenario(broker: Broker) -> tuple[int, int]:
        async with aiomqtt.Client(broker.host, broker.port, identifier="t-retained") as pub:
            await pub.publish("factory/l1/s1/temp", b"21.5", qos=1, retain=True)
        async with Agentlet(broker, store) as a:
            await wait_for(lambda: a.ingest.retained_skipped == 1, 10, "the retained replay")
            async with aiomqtt.Client(broker.host, broker.port, identifier="t-live") as pub:
                await pub.publish("factory/l1/s1/temp", b"22.5", qos=1, retain=True)
            await wait_for(lambda: a.ingest.stored == 1, 10, "the live reading")
            return a.ingest.stored, a.ingest.retained_skipped

    with persistent_broker(tmp_path / "mq") as broker:
        assert asyncio.run(scenario(broker)) == (1, 1)
    conn = store.reader()
    assert conn.execute("SELECT value FROM readings").fetchall() == [(22.5,)]
    conn.close()
