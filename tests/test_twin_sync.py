"""KubeEdge twin sync against the strict EdgeCore peer on a real Mosquitto."""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import Awaitable, Callable
from dataclasses import replace
from typing import Any

import aiomqtt
import pytest

from agent.config.sync import KubeEdgeDevice, KubeEdgeSettings
from agent.storage import Store
from agent.sync import twins
from agent.sync.kubeedge import TwinSync
from agent_devkit.broker import Broker
from agent_devkit.edgecore import ERROR_TOPIC, EdgeCorePeer

FAST = KubeEdgeSettings(enabled=True, node_name="demo-node", poll_interval_s=0.05, answer_timeout_s=0.5,
                        max_messages_s=1000, reconnect_max_s=0.5, resync_interval_s=3600)




def set_props(store: Store, device: str, values: dict[str, tuple[str, str]]) -> None:
    def job(db: Any) -> None:
        for name, (value, ptype) in values.items():
            db.conn.execute("INSERT INTO properties (device, name, value, type, wall, boot_id, mono) "
                            "VALUES (?, ?, ?, ?, 0, 'b', 0) ON CONFLICT(device, name) DO UPDATE SET "
                            "value = excluded.value, type = excluded.type", (device, name, value, ptype))
    store.writer.run_sync(job)


async def until(cond: Callable[[], bool], timeout: float = 20) -> None:
    async with asyncio.timeout(timeout):
        while not cond():
            await asyncio.sleep(0.02)


def run_with(store: Store, broker: Broker, settings: KubeEdgeSettings, peer: EdgeCorePeer,
             body: Callable[[TwinSync, EdgeCorePeer], Awaitable[None]]) -> None:
    async def main() -> None:
        await peer.start()
        sync = TwinSync(store, settings, "gw-1", broker.host, broker.port)
        task = asyncio.create_task(sync.run())
        try:
            await body(sync, peer)
        finally:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
            await peer.stop()
    asyncio.run(main())


# ------------------------------------------------------------------ the peer itself is strict

def test_peer_enforces_edgecore_rules(broker: Broker) -> None:
    """Raw messages straight at the peer: each broken rule gets EdgeCore's exact answer (or none)."""
    async def main() -> None:
        peer = await EdgeCorePeer(broker.host, broker.port, bound={"default/press-1"}, wedge_s=1.5).start()
        answers: list[tuple[str, dict[str, Any]]] = []
        try:
            async with aiomqtt.Client(broker.host, broker.port, identifier="raw") as client:
                await client.subscribe("$hw/events/device/#", qos=1)

                async def send(dev: str, body: Any, suffix: str = "twin/update") -> tuple[str, dict[str, Any]] | None:
                    text = body if isinstance(body, str) else json.dumps(body)
                    await client.publish(f"$hw/events/device/{dev}/{suffix}", text, qos=1)
                    try:
                        async with asyncio.timeout(1.0):
                            async for m in client.messages:
                                t = str(m.topic)
                                if t.endswith("/result"):
                                    b = json.loads(m.payload if isinstance(m.payload, bytes) else b"{}")
                                    answers.append((t, b))
                                    return t, b
                    except TimeoutError:
                        return None
                    return None

                ok = {"event_id": "e1", "timestamp": 1717000000000,
                      "twin": {"temperature": {"actual": {"value": "23.5"}, "metadata": {"type": "float"}}}}
                assert await send("default/press-1", ok) == (
                    "$hw/events/device/default/press-1/twin/update/result",
                    {"event_id": "e1", "timestamp": answers[-1][1]["timestamp"],
                     "twin": {"temperature": {"actual": {"value": "23.5"}, "metadata": {"type": "float"}}}})
                t, b = await send("default/press-1", {"event_id": "g1", "timestamp": 1}, "twin/get") or ("", {})
                assert t.endswith("default/press-1/twin/get/result") and b["event_id"] == "g1"
                assert b["twin"] == {"temperature": {"actual": {"value": "23.5"}, "metadata": {"type": "float"}}}
                bad_ts = {**ok, "event_id": "e2", "timestamp": 1717000000000.5}
                t, b = await send("default/press-1", bad_ts) or ("", {})
                assert t == ERROR_TOPIC and b["event_id"] == "" and b["code"] == 400 and "Unmarshal" in b["reason"]
                num = {**ok, "event_id": "e3", "twin": {"temperature": {"actual": {"value": 23.5}}}}
                t, b = await send("default/press-1", num) or ("", {})
                assert t == ERROR_TOPIC and b["event_id"] == ""
                for bad_value in ("12.5 C", "1e+5", '{"a":1}', "température"):
                    body = {**ok, "event_id": "e4", "twin": {"label": {"actual": {"value": bad_value}}}}
                    t, b = await send("default/press-1", body) or ("", {})
                    assert t == ERROR_TOPIC and b["event_id"] == "" and "value of twin" in b["reason"], bad_value
                body = {**ok, "event_id": "e5", "twin": {"bad key": {"actual": {"value": "1"}}}}
                t, b = await send("default/press-1", body) or ("", {})
                assert t == ERROR_TOPIC and "key of twin" in b["reason"]
                body = {**ok, "event_id": "e6", "twin": {"temperature": {"actual": {"value": "hot"}}}}
                t, b = await send("default/press-1", body) or ("", {})
                assert t.endswith("default/press-1/twin/update/result") and b == {
                    "event_id": "e6", "timestamp": b["timestamp"], "code": 400, "reason": "the value is not float"}
                body = {**ok, "event_id": "e7", "twin": {"mode": {"actual": {"value": "x"},
                                                                  "metadata": {"type": "Float"}}}}
                t, b = await send("default/press-1", body) or ("", {})
                assert b["code"] == 400 and b["reason"] == "the value type is not allowed"
                t, b = await send("default/press-9", {**ok, "event_id": "e8"}) or ("", {})
                assert t.endswith("default/press-9/twin/update/result") and b["code"] == 404 and b["event_id"] == "e8"
                # v1.15 shape on a v1.17 EdgeCore: the device does not exist
                t, b = await send("press-1", {**ok, "event_id": "e9"}) or ("", {})
                assert b["code"] == 404
                # a bad state update, or one for an unknown device: no answer at all
                assert await send("default/press-1", {"event_id": "s1", "timestamp": 1, "state": "happy"},
                                  "state/update") is None
                assert await send("default/press-9", {"event_id": "s2", "timestamp": 1, "state": "online"},
                                  "state/update") is None
                t, b = await send("default/press-1", {"event_id": "s3", "timestamp": 1, "state": "online"},
                                  "state/update") or ("", {})
                assert t.endswith("/state/update/result") and b["event_id"] == "s3"
                # an empty actual object wedges the twin module: no answer, not even to a good message
                assert await send("default/press-1", {**ok, "event_id": "w1", "twin": {"t": {"actual": {}}}}) is None
                assert await send("default/press-1", {**ok, "event_id": "w2"}) is None
                t, b = await send("default/press-1", {**ok, "event_id": "w3"}) or ("", {})
                assert b["event_id"] == "w3" and "code" not in b
        finally:
            await peer.stop()
        assert peer.values("default/press-1") == {"temperature": "23.5"}

    asyncio.run(main())


# ------------------------------------------------------------------ local validation

def test_values_are_normalised_or_refused_locally() -> None:
    assert twins.normalise("1e+5", "float") == "100000"
    assert twins.normalise("23.50", "float") == "23.5"
    assert twins.normalise("0.000001", "float") == "0.000001"
    assert twins.normalise("7.0", "int") == "7"
    assert twins.normalise("ON", "boolean") == "true"
    for value, ttype in (("12.5 C", "string"), ("nan", "float"), ("7.5", "int"), ("maybe", "boolean"),
                         ('{"a":1}', "string"), ("x" * 513, "string")):
        with pytest.raises(twins.TwinValueError):
            twins.normalise(value, ttype)
    with pytest.raises(twins.TwinValueError):
        twins.check_name("has space")
    ref = twins.resolve(FAST, "line1/Press_A")  # the agent's <line>/<sensor> devices get a valid name
    assert ref is not None and ref.device_id == "default/line1-press-a"
    with pytest.raises(twins.TwinValueError, match="Kubernetes name"):
        twins.resolve(replace(FAST, devices={"x": KubeEdgeDevice(name="Bad_Name")}), "x")
    _, body = twins.twin_update({"t": ("1", "float")})
    assert isinstance(body["timestamp"], int) and isinstance(body["event_id"], str)


# ------------------------------------------------------------------ the sync

def test_twins_converge_unbound_device_is_reported(store: Store, broker: Broker) -> None:
    settings = replace(FAST, devices={"press1": KubeEdgeDevice(name="press-1",
                                                               properties={"temp_c": "temperature"})})
    set_props(store, "press1", {"temp_c": ("23.5", "float"), "count": ("12", "int"), "running": ("1", "bool"),
                                "label": ("12.5 C", "string"), "mode": ("auto", "string")})
    set_props(store, "press-2", {"temp_c": ("19", "float")})
    peer = EdgeCorePeer(broker.host, broker.port, bound={"default/press-1"})

    async def body(sync: TwinSync, peer: EdgeCorePeer) -> None:
        await until(lambda: peer.values("default/press-1") == {
            "temperature": "23.5", "count": "12", "running": "true", "mode": "auto"})
        await until(lambda: sync.devices["press-2"].bound is False)
        await until(lambda: peer.states.get("default/press-1") == "online")
        set_props(store, "press1", {"temp_c": ("24", "float")})
        await until(lambda: peer.values("default/press-1")["temperature"] == "24")
        await until(sync.in_sync.is_set)

    run_with(store, broker, settings, peer, body)
    assert peer.violations == []
    assert len(peer.event_ids) == len(set(peer.event_ids))  # a fresh event_id every message
    conn = store.reader()
    snap = json.loads(conn.execute("SELECT value FROM kv WHERE key = 'kubeedge.twins'").fetchone()[0])
    links = dict(conn.execute("SELECT name, state FROM links").fetchall())
    conn.close()
    devs = {d["device_id"]: d for d in snap["devices"]}
    assert devs["default/press-2"]["bound"] is False and devs["default/press-2"]["state"] == "unbound"
    assert devs["default/press-1"]["invalid"] and "label" in devs["default/press-1"]["invalid"][0]
    assert links["kubeedge"] == "up"


def test_coalesces_while_edgecore_is_cut_off_and_resyncs_after_reconnect(store: Store, broker: Broker) -> None:
    set_props(store, "press-1", {"temp": ("1", "float"), "count": ("0", "int")})
    peer = EdgeCorePeer(broker.host, broker.port, bound={"default/press-1"})

    async def body(sync: TwinSync, peer: EdgeCorePeer) -> None:
        await until(lambda: peer.values("default/press-1") == {"temp": "1", "count": "0"})
        await peer.go_deaf()  # EdgeCore cut off: clean session, everything meanwhile is lost
        for i in range(200):
            set_props(store, "press-1", {"count": (str(i), "int")})
        await asyncio.sleep(1.5)  # unanswered -> retries with fresh event ids
        before = peer.updates
        await peer.hear_again()
        await until(lambda: peer.values("default/press-1").get("count") == "199")
        # only the latest value travelled: a handful of messages, never 200
        assert peer.updates - before < 10
        # a broker restart: the sync reconnects and republishes the full state
        peer.twins.clear()
        await asyncio.to_thread(broker.restart)
        await until(lambda: peer.values("default/press-1") == {"temp": "1", "count": "199"}, timeout=30)

    run_with(store, broker, FAST, peer, body)
    assert peer.violations == []


def test_full_state_republished_on_timer_and_v115_topics(store: Store, broker: Broker) -> None:
    set_props(store, "pump", {"rpm": ("1500", "int")})
    settings = replace(FAST, topic_style="v1.15", resync_interval_s=1.0)
    peer = EdgeCorePeer(broker.host, broker.port, topic_style="v1.15", bound={"pump"})

    async def body(sync: TwinSync, peer: EdgeCorePeer) -> None:
        await until(lambda: peer.values("pump") == {"rpm": "1500"})
        peer.twins.clear()  # EdgeCore lost its copy (e.g. its cloud link flapped and dropped it)
        await until(lambda: peer.values("pump") == {"rpm": "1500"}, timeout=10)

    run_with(store, broker, settings, peer, body)
    assert peer.violations == []


def test_mute_edgecore_marks_device_failing_then_recovers(store: Store, broker: Broker) -> None:
    set_props(store, "pump", {"rpm": ("10", "int")})
    settings = replace(FAST, max_attempts=2, resync_interval_s=2.0)
    peer = EdgeCorePeer(broker.host, broker.port, bound={"default/pump"})
    peer.mute = True

    async def body(sync: TwinSync, peer: EdgeCorePeer) -> None:
        await until(lambda: "pump" in sync.devices and sync.devices["pump"].state == "failing")
        assert "no answer" in sync.devices["pump"].error
        peer.mute = False
        await until(lambda: peer.values("default/pump") == {"rpm": "10"})
        await until(lambda: sync.devices["pump"].state == "synced")

    run_with(store, broker, settings, peer, body)


def test_uncorrelated_error_is_attributed_and_shown(store: Store, broker: Broker) -> None:
    set_props(store, "pump", {"rpm": ("10", "int")})
    peer = EdgeCorePeer(broker.host, broker.port, bound={"default/pump"})
    peer.force_error = "Unmarshal update request body failed, Please check the request"

    async def body(sync: TwinSync, peer: EdgeCorePeer) -> None:
        await until(lambda: "pump" in sync.devices and sync.devices["pump"].state == "failing")
        assert "Unmarshal" in sync.devices["pump"].error
        assert sync.uncorrelated_errors

    run_with(store, broker, FAST, peer, body)
    conn = store.reader()
    snap = json.loads(conn.execute("SELECT value FROM kv WHERE key = 'kubeedge.twins'").fetchone()[0])
    conn.close()
    assert snap["devices"][0]["state"] == "failing" and "Unmarshal" in snap["devices"][0]["error"]
