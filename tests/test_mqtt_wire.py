"""The local bus's MQTT 3.1.1 codec and connection: byte-level rules, then a real Mosquitto."""

from __future__ import annotations

import asyncio
import itertools
import os
import random
import signal
import subprocess
from collections.abc import MutableMapping
from pathlib import Path
from typing import Any

import aiomqtt
import pytest
import structlog.testing

from agent.config.model import LocalBrokerSettings
from agent.messaging import topics, wire
from agent.messaging.bus import BusMessage, LocalBus
from agent.messaging.connection import ConnectionLost, ConnectRefused, MqttError, open_connection
from agent_devkit.broker import Broker, running_broker

STREAM = (
    wire.publish_packet("factory/l1/s1/t", b"21.5", qos=1, retain=False, packet_id=7)
    + wire.puback_packet(3)
    + wire.publish_packet("factory/l1/s2/t", b"", qos=0, retain=True)
    + b"\xd0\x00"  # PINGRESP
    + wire.publish_packet("f/" + "x" * 200, b"y" * 20_000, qos=1, retain=False, packet_id=65535, dup=True)
)


def _split(stream: bytes, cuts: list[int]) -> list[bytes]:
    bounds = [0, *sorted(cuts), len(stream)]
    return [stream[a:b] for a, b in itertools.pairwise(bounds)]


def _decode_all(chunks: list[bytes], max_packet: int = 1 << 24) -> list[object]:
    dec = wire.Decoder(max_packet)
    out: list[object] = []
    for c in chunks:
        dec.feed(c)
        out += dec.packets(1 << 30)
    return out


def test_decoder_gives_the_same_packets_however_the_stream_is_cut() -> None:
    whole = _decode_all([STREAM])
    assert [type(p).__name__ for p in whole] == ["Publish", "tuple", "Publish", "tuple", "Publish"]
    first, last = whole[0], whole[4]
    assert isinstance(first, wire.Publish) and isinstance(last, wire.Publish)
    assert (first.topic, first.payload, first.qos, first.packet_id, first.retain) == (
        "factory/l1/s1/t", b"21.5", 1, 7, False)
    assert (last.packet_id, last.dup, last.size, last.truncated) == (65535, True, 20_000, False)
    assert whole[1] == (wire.PUBACK, 0, b"\x00\x03")
    assert _decode_all([bytes([b]) for b in STREAM]) == whole  # one byte at a time
    rng = random.Random(5)
    for _ in range(50):
        cuts = rng.sample(range(1, len(STREAM)), rng.randint(1, 12))
        assert _decode_all(_split(STREAM, cuts)) == whole


def test_an_oversize_message_is_skipped_unbuffered_and_delivered_truncated() -> None:
    big = wire.publish_packet("factory/l/s/blob", b"z" * 300_000, qos=1, retain=False, packet_id=9)
    tail = wire.publish_packet("factory/l/s/t", b"1", qos=1, retain=False, packet_id=10)
    for cuts in ([], [3], [1000, 70_000, 200_000], list(range(5, len(big), 4096))):
        dec = wire.Decoder(max_packet=64 * 1024)
        got: list[object] = []
        for c in _split(big + tail, cuts):
            dec.feed(c)
            got += dec.packets(100)
            assert len(dec._buf) < 64 * 1024 + 4096  # never held the whole message
        blob, small = got
        assert isinstance(blob, wire.Publish) and isinstance(small, wire.Publish)
        assert (blob.packet_id, blob.size, blob.truncated, len(blob.payload)) == (
            9, 300_000, True, wire.KEEP_OF_OVERSIZE)
        assert (small.payload, small.packet_id) == (b"1", 10)


@pytest.mark.parametrize("stream, why", [
    (b"\x30\xff\xff\xff\xff\x01", "longer than four bytes"),
    (b"\x34\x05\x00\x01tab", "QoS 2"),
    (b"\x32\x05\x00\x01t\x00\x00", "packet id 0"),
    (b"\x32\x03\x00\x09t", "shorter than its topic"),
    (b"\x30\x04\x00\x02\xff\xfe", "not UTF-8"),
    (b"\x90\xff\xff\xff\x7f", "control packet"),
])
def test_decoder_rejects_what_a_broker_must_never_send(stream: bytes, why: str) -> None:
    with pytest.raises(wire.ProtocolViolation, match=why):
        _decode_all([stream], max_packet=1 << 20)


def test_encoders_follow_the_spec_and_refuse_what_it_forbids() -> None:
    assert wire.connect_packet("gw-1", clean_session=False, keepalive_s=30) == (
        b"\x10\x10\x00\x04MQTT\x04\x00\x00\x1e\x00\x04gw-1")
    assert wire.connect_packet("c", clean_session=True, keepalive_s=5, username="u", password="p")[9] == 0xC2
    assert wire.subscribe_packet(1, [("a/#", 1)]) == b"\x82\x08\x00\x01\x00\x03a/#\x01"
    assert wire.publish_packet("a", b"x" * 200, qos=0, retain=False)[:3] == b"\x30\xcb\x01"  # 2-byte length
    for bad in ("a/+", "a/#", ""):
        with pytest.raises(ValueError):
            wire.publish_packet(bad, b"", qos=1, retain=False, packet_id=1)
    with pytest.raises(ValueError, match="QoS 0 or 1"):
        wire.publish_packet("a", b"", qos=2, retain=False, packet_id=1)
    with pytest.raises(ValueError, match="user name"):
        wire.connect_packet("c", clean_session=True, keepalive_s=5, password="p")


@pytest.mark.parametrize("topic_filter, topic, expected", [
    ("factory/#", "factory/l1/s1/t", True), ("factory/#", "factory", True),
    ("factory/+/+/t", "factory/l1/s1/t", True), ("factory/+/t", "factory/l1/s1/t", False),
    ("factory/l1", "factory/l1/x", False), ("#", "$SYS/broker/uptime", False),
    ("+/broker/uptime", "$SYS/broker/uptime", False), ("$SYS/#", "$SYS/broker/uptime", True),
    ("a/+", "a/", True), ("a/b", "a/b", True),
])
def test_topic_filters_match_as_mqtt_says(topic_filter: str, topic: str, expected: bool) -> None:
    assert topics.matches(topic_filter, topic) is expected


# ---- against a real Mosquitto ---------------------------------------------------------------------

def test_refused_credentials_get_an_actionable_error(tmp_path: Path) -> None:
    pwfile = tmp_path / "passwd"
    subprocess.run(["mosquitto_passwd", "-b", "-c", str(pwfile), "gw", "right"], check=True,
                   capture_output=True)
    pwfile.chmod(0o600)
    extra = f"password_file {pwfile}\nallow_anonymous false\n"
    with running_broker(tmp_path / "mq2", extra_conf=extra) as broker:
        async def scenario() -> None:
            with pytest.raises(ConnectRefused, match=r"refused the user name or password|not authorised"):
                await open_connection(broker.host, broker.port, lambda p: None, client_id="gw",
                                      clean_session=False, keepalive_s=30, username="gw", password="wrong")
            conn, _ = await open_connection(broker.host, broker.port, lambda p: None, client_id="gw",
                                            clean_session=False, keepalive_s=30, username="gw", password="right")
            conn.close()
        asyncio.run(scenario())


def test_an_unreachable_broker_is_named_in_the_error(broker: Broker) -> None:
    async def scenario() -> None:
        with pytest.raises(MqttError, match=f"cannot reach the local broker 127.0.0.1:{broker.port}"):
            await open_connection("127.0.0.1", broker.port, lambda p: None, client_id="x",
                                  clean_session=True, keepalive_s=30)
    broker.stop()
    asyncio.run(scenario())


def test_keepalive_holds_an_idle_link_and_drops_a_frozen_broker(broker: Broker) -> None:
    """Idle for 3× keepalive: pings keep it up. Broker frozen (SIGSTOP): the link is dropped."""
    async def scenario() -> None:
        conn, _ = await open_connection(broker.host, broker.port, lambda p: None, client_id="ka",
                                        clean_session=True, keepalive_s=1)
        await asyncio.sleep(3.2)
        assert conn.is_open
        assert broker.proc is not None
        os.kill(broker.proc.pid, signal.SIGSTOP)
        try:
            with pytest.raises(ConnectionLost, match="did not answer a ping"):
                async with asyncio.timeout(8):
                    await conn.closed
        finally:
            os.kill(broker.proc.pid, signal.SIGCONT)
    asyncio.run(scenario())


def test_reading_pauses_while_too_many_messages_wait_for_their_ack(tmp_path: Path) -> None:
    """Back-pressure even with an unlimited broker window: no unbounded pile of unacked messages."""
    n, size = 2000, 1024
    with running_broker(tmp_path / "mq", extra_conf="max_inflight_messages 0\n") as broker:
        async def scenario() -> None:
            got: list[wire.Publish] = []
            conn, _ = await open_connection(broker.host, broker.port, got.append, client_id="bp",
                                            clean_session=False, keepalive_s=30)
            conn._max_unacked = 10
            await conn.subscribe([("factory/#", 1)], timeout_s=5)
            async with aiomqtt.Client(broker.host, broker.port, identifier="bp-pub") as pub:
                for i in range(n):
                    await pub.publish(f"factory/l/s/m{i % 7}", b"%05d" % i + b"x" * size, qos=1)
            await asyncio.sleep(0.5)
            assert 0 < len(got) < n // 2 and conn.unacked == len(got)
            acked = 0
            async with asyncio.timeout(20):
                while acked < n:
                    while acked < len(got):
                        assert conn.ack(got[acked].packet_id)
                        acked += 1
                    await asyncio.sleep(0.01)
            assert sorted(int(p.payload[:5]) for p in got) == list(range(n))
            conn.close()
        asyncio.run(scenario())


def test_an_oversize_sensor_message_becomes_an_acked_reject(tmp_path: Path) -> None:
    """A 17 MiB message through a real broker: kept as a reject (head only) and never redelivered."""
    with running_broker(tmp_path / "mq") as broker:
        async def scenario() -> None:
            seen: list[BusMessage] = []

            def handle(msg: BusMessage) -> None:
                seen.append(msg)
                msg.ack()
            bus = LocalBus(LocalBrokerSettings(host=broker.host, port=broker.port, client_id="big"), "n")
            bus.subscribe("factory/#", handle, manual_ack=True)
            task = asyncio.create_task(bus.run())
            try:
                assert await bus.wait_connected(10)
                async with aiomqtt.Client(broker.host, broker.port, identifier="big-pub") as pub:
                    await pub.publish("factory/l/s/blob", b"7" * (17 << 20), qos=1)
                    await pub.publish("factory/l/s/t", b"1", qos=1)
                async with asyncio.timeout(20):
                    while len(seen) < 2:
                        await asyncio.sleep(0.02)
                blob, small = seen
                assert blob.truncated and blob.size == 17 << 20 and len(blob.payload) == wire.KEEP_OF_OVERSIZE
                assert small.payload == b"1" and not small.truncated
            finally:
                task.cancel()
                await asyncio.gather(task, return_exceptions=True)
        asyncio.run(scenario())


def test_a_broker_that_forgot_the_session_is_reported(tmp_path: Path) -> None:
    """A broker restarted without persistence lost the queued readings: say so, with the fix."""
    with running_broker(tmp_path / "mq", extra_conf="persistence false\n") as broker:
        async def scenario() -> list[MutableMapping[str, Any]]:
            settings = LocalBrokerSettings(host=broker.host, port=broker.port, client_id="forgot",
                                           reconnect_min_s=0.1, reconnect_max_s=0.3)
            bus = LocalBus(settings, "n")
            bus.subscribe("factory/#", lambda m: None)
            with structlog.testing.capture_logs() as logs:
                task = asyncio.create_task(bus.run())
                try:
                    assert await bus.wait_connected(10)
                    await asyncio.to_thread(broker.restart)
                    async with asyncio.timeout(15):
                        while bus.connects < 2 or not bus.connected:
                            await asyncio.sleep(0.05)
                finally:
                    task.cancel()
                    await asyncio.gather(task, return_exceptions=True)
            return logs
        events = [e for e in asyncio.run(scenario()) if e["event"] == "local_bus_session_lost"]
        assert len(events) == 1 and "persistence" in str(events[0]["hint"])
