"""The local bus against a real Mosquitto: manual ack, persistent session, reconnect, readings parsing."""

from __future__ import annotations

import asyncio
import random
from pathlib import Path

import aiomqtt
import pytest

from agent.clock import now
from agent.config.model import LocalBrokerSettings
from agent.messaging.backoff import Backoff
from agent.messaging.bus import BusMessage, BusUnavailable, LocalBus
from agent.messaging.connection import open_connection
from agent.messaging.readings import MalformedReading, parse
from agent.messaging.wire import Publish
from agent_devkit.broker import Broker
from agent_devkit.localbus import persistent_broker


async def _publish(broker: Broker, items: list[tuple[str, bytes]]) -> None:
    async with aiomqtt.Client(broker.host, broker.port, identifier="test-pub") as pub:
        for topic, payload in items:
            await pub.publish(topic, payload, qos=1)


async def _receive(broker: Broker, cid: str, n: int, ack: bool, within: float = 10.0) -> list[str]:
    """Connect with a persistent session; take ``n`` messages, PUBACK them or not."""
    got: list[Publish] = []
    conn, _ = await open_connection(broker.host, broker.port, got.append, client_id=cid,
                                    clean_session=False, keepalive_s=30)
    try:
        await conn.subscribe([("factory/#", 1)], timeout_s=5)
        async with asyncio.timeout(within):
            while len(got) < n:
                await asyncio.sleep(0.02)
        for p in got:
            assert not ack or conn.ack(p.packet_id)
        await asyncio.sleep(0.3 if n == 0 else 0.1)
    finally:
        conn.close()
    return [p.payload.decode() for p in got]


def test_connection_redelivers_unacked_and_forgets_acked(broker: Broker) -> None:
    async def scenario() -> None:
        await _receive(broker, "t-sub", 0, ack=False)  # create the persistent session
        await _publish(broker, [("factory/l1/s1/t", str(i).encode()) for i in range(5)])
        first = await _receive(broker, "t-sub", 5, ack=False)
        assert first == [str(i) for i in range(5)]
        again = await _receive(broker, "t-sub", 5, ack=True)  # not acked → redelivered
        assert sorted(again) == [str(i) for i in range(5)]
        await _publish(broker, [("factory/l1/s1/t", b"99")])
        after = await _receive(broker, "t-sub", 1, ack=True)
        assert after == ["99"]  # the acked five are gone for good
    asyncio.run(scenario())


def test_backoff_is_capped_jittered_and_growing() -> None:
    backoff = Backoff(0.5, 8.0, rng=random.Random(1))
    delays = [backoff.next() for _ in range(10)]
    assert all(0.25 <= d <= 8.0 for d in delays)
    assert delays[0] <= 0.5 and delays[-1] >= 4.0
    assert len(set(delays)) == len(delays)
    # equal jitter: never below half the current ceiling
    assert all(d >= backoff.ceiling(i) / 2 for i, d in enumerate(delays))


def test_backoff_starts_again_after_a_connection_that_held() -> None:
    backoff = Backoff(1.0, 30.0, rng=random.Random(2))
    for _ in range(8):
        backoff.next()
    assert backoff.ceiling(backoff.attempt) == 30.0
    backoff.reset(to=1)  # a connection that failed soon after connecting: the second delay again
    assert backoff.attempt == 1 and backoff.next() <= 2.0
    backoff.reset()
    assert backoff.next() <= 1.0
    backoff.reset(to=5)  # never moves forward
    assert backoff.attempt == 1


@pytest.mark.parametrize(("topic", "payload", "expected"), [
    ("factory/l1/press/temp", b"21.5", [("l1/press", "temp", 21.5, None)]),
    ("factory/l1/press/temp", b" 3 ", [("l1/press", "temp", 3.0, None)]),
    ("factory/l1/press/on", b"true", [("l1/press", "on", 1.0, None)]),
    ("factory/l1/press/temp", b'{"value": 7, "unit": "C"}',
     [("l1/press", "temp", 7.0, '{"unit":"C","value":7}')]),
    ("factory/l1/press/mode", b'"auto"', [("l1/press", "mode", None, '"auto"')]),
    ("factory/l1/press/temp", b"[1, 2]", [("l1/press", "temp", 1.0, None), ("l1/press", "temp", 2.0, None)]),
    ("factory/l1/press", b'{"temp": 1, "rpm": 2}', [("l1/press", "temp", 1.0, None), ("l1/press", "rpm", 2.0, None)]),
])
def test_parse_accepts_the_documented_shapes(topic: str, payload: bytes,
                                             expected: list[tuple[str, str, float | None, str | None]]) -> None:
    got = [(r.device, r.metric, r.value, r.payload) for r in parse(topic, payload, now())]
    assert got == expected


@pytest.mark.parametrize(("topic", "payload", "why"), [
    ("factory/l1/press/temp", b"", "empty payload"),
    ("factory/l1/press/temp", b"hot", "neither a number nor JSON"),
    ("factory/l1/press/temp", b"\xff\xfe", "not UTF-8"),
    ("factory/l1/press/temp", b"NaN", "not a finite number"),
    ("factory/l1/press/temp", b'{"v": 1}', "no 'value' key"),
    ("factory/l1/press/temp", b"null", "not a reading value"),
    ("factory/l1/press/temp", b"[]", "empty JSON array"),
    ("factory/l1/press/temp", b"[[1]]", "nested JSON arrays"),
    ("factory/l1", b"1", "is not <root>/<line>/<sensor>/<metric>"),
    ("factory/l1//temp", b"1", "is not <root>"),
    ("factory/l1/press", b"5", "needs a JSON object"),
    ("factory/l1/press/temp", b"1" * 70000, "exceeds the 65536-byte limit"),
])
def test_parse_rejects_malformed_messages_with_a_specific_reason(topic: str, payload: bytes, why: str) -> None:
    with pytest.raises(MalformedReading, match=why.replace("(", r"\(").replace("<", "<")) as info:
        parse(topic, payload, now())
    assert info.value.code == "malformed_reading"


def test_bus_reconnects_resubscribes_and_acks_only_on_the_receiving_connection(tmp_path: Path) -> None:
    async def scenario(broker: Broker) -> None:
        settings = LocalBrokerSettings(host=broker.host, port=broker.port, client_id="t-bus",
                                       reconnect_min_s=0.1, reconnect_max_s=0.5)
        links: list[str] = []

        async def on_link(state: str, _detail: str) -> None:
            links.append(state)
        bus = LocalBus(settings, "node", on_link=on_link)
        held: list[BusMessage] = []
        bus.subscribe("factory/#", held.append, manual_ack=True)
        task = asyncio.create_task(bus.run())
        try:
            assert await bus.wait_connected(10)
            await _publish(broker, [("factory/l/s/m", b"1"), ("factory/l/s/m", b"2")])
            async with asyncio.timeout(10):
                while len(held) < 2:
                    await asyncio.sleep(0.02)
            # not acked: the broker restarts, the bus reconnects, the broker redelivers both
            old = list(held)
            await asyncio.to_thread(broker.restart)
            async with asyncio.timeout(20):
                while len(held) < 4:
                    await asyncio.sleep(0.05)
            assert not old[0].ack()  # the connection that received it is gone: no stray PUBACK
            for m in held[2:]:
                assert m.ack()
            assert sorted(m.payload for m in held[2:]) == [b"1", b"2"]
            await bus.publish("factory/l/s/echo", b"3")
            assert bus.connects >= 2 and "down" in links and links[-1] == "up"
        finally:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
        with pytest.raises(BusUnavailable):
            await bus.publish("x/y", b"1")
    with persistent_broker(tmp_path / "mq") as broker:
        asyncio.run(scenario(broker))


def test_sighup_reload_reconnects_with_the_new_settings_and_drops_removed_subscriptions(tmp_path: Path) -> None:
    """A changed [local_broker] table takes effect without a restart; a removed filter is unsubscribed
    on the broker (the persistent session would otherwise keep delivering it)."""
    from agent.config.model import AgentConfig

    async def scenario(broker: Broker) -> None:
        first = LocalBrokerSettings(host=broker.host, port=broker.port, client_id="t-reload",
                                    subscriptions=["factory/a/#"], reconnect_min_s=0.1, reconnect_max_s=0.3)
        bus = LocalBus(first, "node")
        got: list[str] = []

        def take(msg: BusMessage) -> None:
            got.append(msg.topic)
            msg.ack()
        bus.subscribe_sensors(take)
        task = asyncio.create_task(bus.run())
        try:
            assert await bus.wait_connected(10)
            await _publish(broker, [("factory/a/s/m", b"1"), ("factory/b/s/m", b"2")])
            async with asyncio.timeout(10):
                while not got:
                    await asyncio.sleep(0.02)
            await asyncio.sleep(0.3)
            assert got == ["factory/a/s/m"] and bus.received == 1
            second = LocalBrokerSettings(host=broker.host, port=broker.port, client_id="t-reload",
                                         subscriptions=["factory/b/#"], keepalive_s=20,
                                         reconnect_min_s=0.1, reconnect_max_s=0.3)
            await bus.reload(AgentConfig(local_broker=second))
            async with asyncio.timeout(10):
                while bus.connects < 2 or not bus.connected:
                    await asyncio.sleep(0.02)
            await _publish(broker, [("factory/a/s/m", b"3"), ("factory/b/s/m", b"4")])
            async with asyncio.timeout(10):
                while len(got) < 2:
                    await asyncio.sleep(0.02)
            await asyncio.sleep(0.3)
            assert got == ["factory/a/s/m", "factory/b/s/m"]
            assert bus.received == 2  # 'factory/a/#' is gone from the broker's session, not just unrouted
            await bus.reload(AgentConfig(local_broker=second))  # unchanged: no reconnect
            await asyncio.sleep(0.3)
            assert bus.connects == 2
        finally:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
    with persistent_broker(tmp_path / "mq") as broker:
        asyncio.run(scenario(broker))
