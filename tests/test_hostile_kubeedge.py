"""Hostile messages on EdgeCore's topics: refused, counted, and never the end of the twin sync or of the
daemon (issue 11, defect 1: one retained message crash-looped the daemon; it needs no key, only the
right to publish on the local broker)."""

from __future__ import annotations

import asyncio
import json
import sqlite3
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any, cast

import aiomqtt
import pytest
from hypothesis import given
from hypothesis import strategies as st

from agent.config.sync import KubeEdgeSettings
from agent.jsonsafe import JsonRejected
from agent.storage import Store
from agent.sync import twins
from agent.sync.kubeedge import ERROR_TOPIC, Pending, TwinSync
from agent_devkit.broker import Broker
from agent_devkit.edgecore import EdgeCorePeer
from agent_devkit.hostile import deep, json_values, render, with_hostile_leaf
from agent_devkit.procs import agent_process, status_json

NODE = "demo-node"
MEMBERSHIP = f"$hw/events/node/{NODE}/membership/get/result"
PRESS_RESULT = "$hw/events/device/default/press-1/twin/update/result"

HOSTILE_RETAINED = [
    (MEMBERSHIP, b'{"devices": 5}'),
    (PRESS_RESULT, deep(5000, "{").encode()),
    (f"$hw/events/node/{NODE}/membership/updated", b"[" * 5000 + b"]" * 5000),
    (ERROR_TOPIC, b'{"event_id": "", "code": {}, "reason": NaN}'),
]


def config(tmp: Path, broker: Broker) -> Path:
    path = tmp / "agent.toml"
    path.write_text(f"""
[agent]
node_id = "gw-1"
heartbeat_interval_s = 1.0

[local_broker]
host = "{broker.host}"
port = {broker.port}

[kubeedge]
enabled = true
node_name = "{NODE}"
poll_interval_s = 0.2
answer_timeout_s = 1.0
reconnect_max_s = 1.0

[kubeedge.devices."line1/press"]
name = "press-1"
properties = {{ temp = "temperature" }}
""")
    return path


async def retain(broker: Broker, items: list[tuple[str, bytes]]) -> None:
    async with aiomqtt.Client(broker.host, broker.port, identifier="t-hostile-retain") as client:
        for topic, payload in items:
            await client.publish(topic, payload, qos=1, retain=True)


def test_retained_hostile_answers_neither_stop_the_daemon_nor_the_twin_sync(broker: Broker, tmp_path: Path) -> None:
    state = tmp_path / "state"
    cfg = config(tmp_path, broker)

    async def main() -> None:
        await retain(broker, HOSTILE_RETAINED)
        with agent_process(state, cfg) as agent:
            agent.wait_ready()
            # the retained messages arrive on every (re)subscribe: wait until all four were counted
            async with asyncio.timeout(30):
                while True:
                    assert agent.proc.poll() is None, f"the daemon died:\n{agent.output()[-3000:]}"
                    report = cast(dict[str, Any], (await asyncio.to_thread(status_json, state, cfg))[1])
                    got = {(r["source"], r["code"]): r["count"] for r in report.get("rejected_input", [])}
                    if sum(n for (s, _), n in got.items() if s == "kubeedge") >= len(HOSTILE_RETAINED):
                        break
                    await asyncio.sleep(0.2)
            assert {c for s, c in got if s == "kubeedge"} == {"json_shape", "json_too_deep", "json_non_finite"}
            assert any("input refused recently" in w for w in report["warnings"])
            # and the sync works: a real answer binds the device and its twin is confirmed
            peer = await EdgeCorePeer(broker.host, broker.port, bound={"default/press-1"}).start()
            try:
                conn = sqlite3.connect(state / "agent.db", timeout=10)
                conn.execute("INSERT INTO properties (device, name, value, type, wall, boot_id, mono) "
                             "VALUES ('line1/press', 'temp', '41.5', 'float', ?, 'b', 1)", (time.time(),))
                conn.commit()
                conn.close()
                async with asyncio.timeout(30):
                    while peer.values("default/press-1") != {"temperature": "41.5"}:
                        await asyncio.sleep(0.05)
            finally:
                await peer.stop()
            assert agent.proc.poll() is None
            assert agent.stop() == 0
            assert "kubeedge_handler_failed" not in agent.log_path.read_text()

    asyncio.run(main())


# ---- the handler itself, on a twin sync that has an update waiting ---------------------------------

def waiting_sync(store: Store) -> tuple[TwinSync, str]:
    sync = TwinSync(store, KubeEdgeSettings(enabled=True, node_name=NODE), "gw-1", "127.0.0.1", 1883)
    sync._apply_properties([("line1/press", "temp", "41.5", "float")])
    dev = sync.devices["line1/press"]
    dev.pending = Pending("ev-1", {"temp": ("41.5", "float")}, time.monotonic(), 0)
    return sync, "$hw/events/device/default/line1-press/twin/update/result"


@pytest.mark.parametrize(("payload", "code"), [
    (b'{"event_id": "ev-1", "code": {}}', "json_shape"),
    (b'{"event_id": "ev-1", "code": "404"}', "json_shape"),
    (b'{"event_id": 7}', "json_shape"),
    (b'{"event_id": "ev-1", "code": 1e400}', "json_non_finite"),
    (b'{"event_id": "ev-1", "code": ' + b"4" * 400 + b"}", "json_integer_out_of_range"),
    (b'{"event_id": "ev-1", "event_id": "ev-2"}', "json_duplicate_key"),
    (b"[]", "json_shape"),
    (b"\xff", "json_not_utf8"),
])
def test_a_malformed_result_for_a_waiting_update_is_refused_and_the_update_keeps_waiting(
        store: Store, payload: bytes, code: str) -> None:
    sync, topic = waiting_sync(store)
    sync.handle_answer(topic, payload)
    dev = sync.devices["line1/press"]
    assert dev.pending is not None and dev.state == "new" and sync.rejected == 1
    assert store.rejects.count("kubeedge", code) == 1
    sync.handle_answer(topic, b'{"event_id": "ev-1", "timestamp": 1, "twin": {}}')  # the real answer still counts
    assert dev.pending is None and dev.state == "synced" and dev.acked == {"temp": "41.5"}


def test_typed_answers_read_what_edgecore_sends() -> None:
    m = twins.parse_membership(json.dumps({"event_id": "e", "devices": [
        {"id": "a"}, {"name": "b", "namespace": "ns"}, {"name": "c"}]}).encode())
    assert m.device_ids == {"a", "b", "ns/b", "c"}
    assert twins.parse_membership(b'{"event_id": "e", "devices": null}').device_ids == frozenset()
    r = twins.parse_twin_result(b'{"event_id": "e", "timestamp": 1, "code": 404, "reason": "not existed"}')
    assert (r.event_id, r.code, r.reason) == ("e", 404, "not existed")


ANSWERS = st.one_of(
    json_values(10).map(lambda v: json.dumps(v).encode()),
    st.fixed_dictionaries({"event_id": json_values(1), "code": json_values(1), "reason": json_values(1),
                           "devices": json_values(6)}).map(lambda v: json.dumps(v).encode()),
    with_hostile_leaf(st.fixed_dictionaries({"devices": st.lists(st.fixed_dictionaries(
        {"id": json_values(1), "name": json_values(1)}), max_size=3)})).map(lambda t: render(t).encode()),
    st.binary(max_size=120),
)
TOPICS = st.sampled_from([MEMBERSHIP, PRESS_RESULT, ERROR_TOPIC, f"$hw/events/node/{NODE}/membership/updated",
                          "$hw/events/device/default/line1-press/twin/update/result",
                          "$hw/events/device/default/press-1/state/update/result"])


class _Counts:
    """The reject counter's interface, in memory (Hypothesis runs many examples per test function)."""

    def __init__(self) -> None:
        self.noted: list[str] = []

    def note(self, source: str, code: str, detail: str) -> None:
        self.noted.append(code)


@given(TOPICS, ANSWERS)
def test_the_answer_handler_never_raises_and_never_fails(topic: str, payload: bytes) -> None:
    counts = _Counts()
    sync, _ = waiting_sync(cast(Store, SimpleNamespace(rejects=counts)))
    sync.handle_answer(topic, payload)  # raising here would fail the test
    assert "handler_failed" not in counts.noted


def test_json_rejected_is_what_the_typed_parsers_raise() -> None:
    for bad in (b'{"devices": 5}', b'{"devices": [5]}', b'{"devices": [{"id": 5}]}'):
        with pytest.raises(JsonRejected):
            twins.parse_membership(bad)
