"""Draining the outbox to a real Mosquitto: priority order, pipelining, resume after SIGKILL and broker restarts."""

from __future__ import annotations

import asyncio
import contextlib
import select
import sqlite3
from pathlib import Path

import pytest

from agent.clock import Stamp
from agent.config.sync import OutboxSettings
from agent.storage import Store
from agent.sync import codec
from agent.sync.drain import Drainer, parse_url
from agent.sync.outbox import OutboxError, enqueue_job, make_record
from agent_devkit.broker import Broker
from agent_devkit.uplink import Consumer
from tests.test_sync_support import kill, start_drain_child

WALL0 = 1_780_000_000.0


def fill(store: Store, n: int, classes: tuple[str, ...] = ("telemetry", "events", "audit", "control")) -> set[str]:
    keys: set[str] = set()
    recs = []
    for i in range(n):
        cls = classes[i % len(classes)]
        key = f"{cls}/{i}"
        keys.add(key)
        recs.append(make_record(cls, {"i": i, "v": 20.0 + i % 7}, key, Stamp(WALL0 + i, "boot-a", float(i))))
        if len(recs) == 5000:
            store.writer.run_sync(enqueue_job(recs, 10**9))
            recs = []
    store.writer.run_sync(enqueue_job(recs, 10**9))
    return keys


def backlog(store: Store) -> int:
    conn = store.reader()
    try:
        return int(conn.execute("SELECT count(*) FROM outbox").fetchone()[0])
    finally:
        conn.close()


def test_parse_url_rejects_garbage() -> None:
    assert parse_url("mqtt://10.0.0.1:1884") == ("10.0.0.1", 1884, False)
    assert parse_url("mqtts://h") == ("h", 8883, True)
    with pytest.raises(OutboxError.__mro__[1], match="uplink_url"):
        parse_url("http://x")


def test_drain_delivers_everything_once_in_priority_order(broker: Broker, tmp_path: Path) -> None:
    store = Store.open(tmp_path / "state")
    keys = fill(store, 4000)

    async def main() -> None:
        consumer = await Consumer(broker.host, broker.port).start()
        order: list[str] = []
        settings = OutboxSettings(uplink_url=broker.url, jitter_max_s=0.2, batch_records=100, inflight=8)
        drainer = Drainer(store, settings, "gw-1")
        task = asyncio.create_task(drainer.run())
        try:
            await consumer.wait_for(keys)
            await asyncio.wait_for(drainer.idle.wait(), 30)
        finally:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
            await consumer.stop()
        assert consumer.duplicates == 0
        assert consumer.unique == keys
        assert drainer.peak_inflight > 1  # pipelined, not one by one
        del order

    try:
        asyncio.run(main())
        assert backlog(store) == 0
        conn = store.reader()
        sent = dict(conn.execute("SELECT cls, sent FROM outbox_classes").fetchall())
        conn.close()
        assert sent == {0: 1000, 1: 1000, 2: 1000, 3: 1000}
    finally:
        store.close()


def test_priority_classes_drain_first(broker: Broker, tmp_path: Path) -> None:
    """With a slow rate limit, the first batches on the wire are control, then audit, then events."""
    store = Store.open(tmp_path / "state")
    fill(store, 400, ("telemetry", "events"))
    fill_ctrl = [make_record("control", {"c": i}, f"ctrl/{i}", Stamp(WALL0, "boot-a", 1.0)) for i in range(20)]
    store.writer.run_sync(enqueue_job(fill_ctrl, 10**9))
    classes: list[str] = []

    async def main() -> None:

        import aiomqtt
        async with aiomqtt.Client(broker.host, broker.port, identifier="watch") as client:
            await client.subscribe("edge/+/outbox/#", qos=1)
            settings = OutboxSettings(uplink_url=broker.url, jitter_max_s=0, batch_records=10, inflight=1)
            task = asyncio.create_task(Drainer(store, settings, "gw-1").run())
            try:
                async with asyncio.timeout(30):
                    async for msg in client.messages:
                        body = codec.decode_message(msg.payload if isinstance(msg.payload, bytes) else b"{}")
                        classes.append(body["class"])
                        if len(classes) == 10:
                            break
            finally:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task

    try:
        asyncio.run(main())
    finally:
        store.close()
    assert classes[:2] == ["control", "control"]
    assert classes[2] == "events"


def test_broker_restarts_during_drain_lose_nothing(broker: Broker, tmp_path: Path) -> None:
    store = Store.open(tmp_path / "state")
    keys = fill(store, 6000)

    async def main() -> None:
        consumer = await Consumer(broker.host, broker.port).start()
        settings = OutboxSettings(uplink_url=broker.url, jitter_max_s=0.1, batch_records=50, inflight=8,
                                  rate_limit_records_s=4000, reconnect_max_s=0.5, publish_timeout_s=5)
        drainer = Drainer(store, settings, "gw-1")
        task = asyncio.create_task(drainer.run())
        try:
            for _ in range(3):
                target = drainer.sent_records + 800
                async with asyncio.timeout(30):
                    while drainer.sent_records < target:
                        await asyncio.sleep(0.02)
                await asyncio.to_thread(broker.restart)  # SIGTERM: mosquitto saves its sessions
            await consumer.wait_for(keys, timeout=90)
            async with asyncio.timeout(30):
                while await asyncio.to_thread(backlog, store):  # the last acks may still be on their way
                    await asyncio.sleep(0.05)
        finally:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
            await consumer.stop()
        assert drainer.connects >= 4
        assert consumer.unique == keys

    try:
        asyncio.run(main())
        assert backlog(store) == 0
    finally:
        store.close()


def test_sigkill_during_drain_repeatedly_resumes_without_loss(broker: Broker, tmp_path: Path) -> None:
    state = tmp_path / "state"
    store = Store.open(state)
    keys = fill(store, 5000)
    store.close()

    def left() -> int:
        conn = sqlite3.connect(f"file:{state / 'agent.db'}?mode=ro", uri=True, timeout=10)
        try:
            return int(conn.execute("SELECT count(*) FROM outbox").fetchone()[0])
        finally:
            conn.close()

    async def main() -> Consumer:
        consumer = await Consumer(broker.host, broker.port).start()
        try:
            for _ in range(4):
                proc = start_drain_child(state, broker.url, 3000.0)
                try:
                    assert proc.stdout is not None
                    ready, _, _ = await asyncio.to_thread(select.select, [proc.stdout], [], [], 30)
                    assert ready, "drain child never started sending"
                    await asyncio.sleep(0.3)
                finally:
                    kill(proc)  # SIGKILL mid-drain
                assert 0 < left() < len(keys)  # really killed in the middle
            proc = start_drain_child(state, broker.url, 0.0)
            try:
                await consumer.wait_for(keys, timeout=60)
                async with asyncio.timeout(30):
                    while await asyncio.to_thread(left):  # its last acks
                        await asyncio.sleep(0.05)
            finally:
                kill(proc)
        finally:
            await consumer.stop()
        return consumer

    consumer = asyncio.run(main())
    assert consumer.unique == keys  # every record delivered
    assert consumer.duplicates <= 4 * 8 * 50  # at most the batches in flight at each kill
    assert left() == 0


def test_frozen_broker_times_out_and_drain_resumes(broker: Broker, tmp_path: Path) -> None:
    """A hung broker (SIGSTOP): unacknowledged batches time out, the link is re-established, nothing lost."""
    store = Store.open(tmp_path / "state")
    keys = fill(store, 3000)

    async def main() -> None:
        consumer = await Consumer(broker.host, broker.port).start()
        settings = OutboxSettings(uplink_url=broker.url, jitter_max_s=0, batch_records=50, inflight=4,
                                  rate_limit_records_s=2000, reconnect_max_s=0.5, publish_timeout_s=1.0,
                                  keepalive_s=2)
        drainer = Drainer(store, settings, "gw-1")
        task = asyncio.create_task(drainer.run())
        try:
            async with asyncio.timeout(30):
                while drainer.sent_records < 500:
                    await asyncio.sleep(0.02)
            broker.freeze()
            await asyncio.sleep(2.5)
            broker.thaw()
            await consumer.wait_for(keys, timeout=60)
        finally:
            broker.thaw()
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
            await consumer.stop()
        assert drainer.connects >= 2
        assert consumer.unique == keys

    try:
        asyncio.run(main())
    finally:
        store.close()
