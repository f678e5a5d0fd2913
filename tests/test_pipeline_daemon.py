"""The demo's loop in the real daemon: a signed module and a signed gate policy installed through
``edge-agent install`` (keys from ``edge-fleet keygen``, trusted with ``edge-agent trust add``),
readings on a real Mosquitto, actuations published, denials logged, ``status`` showing it all.
"""

from __future__ import annotations

import asyncio
import json
import sqlite3
import time
from pathlib import Path
from typing import Any

import aiomqtt

from agent_devkit.broker import Broker
from agent_devkit.demo import sign_and_install
from agent_devkit.localbus import persistent_broker
from agent_devkit.procs import agent_process, run_agent, status_json


def query(db: Path, sql: str) -> list[tuple[Any, ...]]:
    conn = sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=5)
    try:
        return conn.execute(sql).fetchall()
    finally:
        conn.close()


async def line_and_actuators(broker: Broker, db: Path) -> list[tuple[str, Any]]:
    got: list[tuple[str, Any]] = []
    async with aiomqtt.Client(broker.host, broker.port, identifier="t-actuators") as sub:
        await sub.subscribe("actuators/#", qos=1)
        async with aiomqtt.Client(broker.host, broker.port, identifier="t-line") as pub:
            for topic, payload in (("factory/line1/press1/temp", b"31.5"), ("factory/line1/press2/temp", b"33"),
                                   ("factory/line1/press1", b'{"rpm": 1200, "pressure": 6.1}'),
                                   ("factory/line1/press1/temp", b"garbage")):
                await pub.publish(topic, payload, qos=1)
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and len(query(db, "SELECT 1 FROM actuations")) < 1:
            await asyncio.sleep(0.1)
        try:
            async with asyncio.timeout(1.5):
                async for m in sub.messages:
                    got.append((str(m.topic), json.loads(bytes(m.payload))))  # type: ignore[arg-type,unused-ignore]
        except TimeoutError:
            pass
    return got


def test_signed_module_and_policy_drive_actuations_in_the_daemon(tmp_path: Path) -> None:
    state = tmp_path / "state"
    db = state / "agent.db"
    with persistent_broker(tmp_path / "mq") as broker:
        config = tmp_path / "agent.toml"
        config.write_text(f"""
[agent]
node_id = "pipeline-e2e"
[local_broker]
host = "{broker.host}"
port = {broker.port}
reconnect_min_s = 0.1
[policy]
decision_policy = "gate"
""")
        sign_and_install(tmp_path, state, config)
        with agent_process(state, config) as agent:
            agent.wait_ready()
            deadline = time.monotonic() + 30
            while time.monotonic() < deadline and query(
                    db, "SELECT state FROM links WHERE name = 'local_broker'") != [("up",)]:
                time.sleep(0.1)
            time.sleep(0.5)  # the release loaders run at start; give them a moment
            published = asyncio.run(line_and_actuators(broker, db))
            code, report = status_json(state, config)
            text = run_agent("status", "--config", str(config), "--state-dir", str(state)).stdout
            assert published == [("actuators/line1/press1/fan", {"fan": "on", "device": "line1/press1"})], \
                agent.output()[-4000:]
    denied = query(db, "SELECT subject, reason, policy_name, policy_version FROM decisions WHERE outcome = 'deny'")
    # press2's fan command is denied, and so is its fan property (the gate keeps the module's belief out)
    assert sorted(denied) == [("actuators/line1/press2/fan", "device is locked out for maintenance", "gate", 1),
                              ("line1/press2/fan", "device is locked out for maintenance: actuated state not changed",
                               "gate", 1)]
    pipeline: Any = report["pipeline"]
    assert pipeline["readings"] == 4 and pipeline["rejected_messages"] == 1
    assert pipeline["decisions"]["deny"] == 2 and pipeline["actuations_published"] == 1
    assert {"device": "line1/press1", "name": "fan", "value": "on"}.items() <= report["properties"][0].items()  # type: ignore[index]
    denials_last: Any = report["denials_last"]
    props_now: Any = report["properties"]
    assert {d["reason"] for d in denials_last} == {
        "device is locked out for maintenance", "device is locked out for maintenance: actuated state not changed"}
    assert not any(p["device"] == "line1/press2" and p["name"] == "fan" for p in props_now)
    assert "Last denials" in text and "Control loop" in text and "line1/press2" in text
    assert code in (0, 1)
