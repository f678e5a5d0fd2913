"""scripts/demo/edgecore_sim.py (the demo's simulated EdgeCore) as a process on a real Mosquitto: it binds the
Devices of configs/kubeedge/device.yaml on its node, types twins by the DeviceModel, answers as EdgeCore
does (404 for a device on another node, 400 for a value of the wrong type), writes the twins it holds
and prints them when stopped."""

from __future__ import annotations

import asyncio
import json
import signal
import subprocess
import time
import uuid
from pathlib import Path
from typing import Any

import aiomqtt

from agent_devkit import REPO
from agent_devkit.broker import Broker


def config_for(tmp_path: Path, broker: Broker) -> Path:
    demo = (REPO / "configs" / "demo.toml").read_text()
    config = tmp_path / "demo.toml"
    config.write_text(demo.replace("port = 1883", f"port = {broker.port}")
                      .replace("mqtt://127.0.0.1:1883", f"mqtt://127.0.0.1:{broker.port}")
                      .replace('state_dir = "../var/demo/state"', f'state_dir = "{tmp_path / "state"}"'))
    return config


async def exchange(broker: Broker) -> dict[str, Any]:
    """Ask membership, send a good, a mistyped and an unbound-device update; collect the answers."""
    answers: dict[str, Any] = {}
    async with aiomqtt.Client(broker.host, broker.port, identifier="sim-test") as client:
        await client.subscribe([("$hw/events/#", 1)])

        async def ask(key: str, topic: str, body: dict[str, Any], result: str) -> None:
            await client.publish(topic, json.dumps(body), qos=1)
            async with asyncio.timeout(10):
                async for msg in client.messages:
                    if str(msg.topic) == result:
                        answers[key] = json.loads(bytes(msg.payload) if isinstance(msg.payload, bytes | bytearray)
                                                  else str(msg.payload))
                        return

        def update(twins: dict[str, tuple[str, str]]) -> dict[str, Any]:
            return {"event_id": str(uuid.uuid4()), "timestamp": int(time.time() * 1000),
                    "twin": {n: {"actual": {"value": v}, "metadata": {"type": t}} for n, (v, t) in twins.items()}}

        dev = "$hw/events/device/default"
        await ask("membership", "$hw/events/node/demo-node/membership/get",
                  {"event_id": "m1", "timestamp": 1}, "$hw/events/node/demo-node/membership/get/result")
        good = update({"temperature": ("31.5", "float"), "fan": ("on", "string")})
        await ask("good", f"{dev}/press-1/twin/update", good, f"{dev}/press-1/twin/update/result")
        # the DeviceModel says FLOAT: a first update may not re-type the twin as a non-number
        await ask("mistyped", f"{dev}/press-2/twin/update", update({"temperature": ("hot", "string")}),
                  f"{dev}/press-2/twin/update/result")
        await ask("unbound", f"{dev}/press-3/twin/update", update({"temperature": ("20", "float")}),
                  f"{dev}/press-3/twin/update/result")
    return answers


def test_the_simulated_edgecore_binds_types_answers_and_reports(tmp_path: Path, broker: Broker) -> None:
    config = config_for(tmp_path, broker)
    state = tmp_path / "twins.json"
    log = (tmp_path / "sim.log").open("w")
    proc = subprocess.Popen([str(REPO / ".venv" / "bin" / "python"), str(REPO / "scripts" / "demo" / "edgecore_sim.py"),
                             "serve", "--config", str(config), "--state", str(state)],
                            stdout=log, stderr=subprocess.STDOUT, cwd=REPO)
    try:
        for _ in range(200):
            if "connected to" in (tmp_path / "sim.log").read_text() or proc.poll() is not None:
                break
            time.sleep(0.05)
        assert proc.poll() is None, (tmp_path / "sim.log").read_text()
        answers = asyncio.run(exchange(broker))
        for _ in range(100):  # the state file follows within ~0.5 s
            if state.exists() and json.loads(state.read_text())["twins"].get("default/press-1"):
                break
            time.sleep(0.05)
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)
        log.close()
    out = (tmp_path / "sim.log").read_text()
    assert [d["id"] for d in answers["membership"]["devices"]] == ["default/press-1", "default/press-2"]
    assert "code" not in answers["good"] and answers["good"]["twin"]["temperature"]["actual"]["value"] == "31.5"
    assert answers["mistyped"]["code"] == 400 and answers["mistyped"]["reason"] == "the value is not float"
    assert answers["unbound"]["code"] == 404
    held = json.loads(state.read_text())
    assert held["twins"] == {"default/press-1": {"fan": "on", "temperature": "31.5"}, "default/press-2": {}}
    assert held["unbound"] == {"default/press-3": "other-node"}
    assert "NOT bound to demo-node: default/press-3" in out
    assert "holds (at stop)" in out and "default/press-1  temperature  31.5" in out, out
