"""The real daemon with the outbox drain and the twin sync enabled: wiring, status sections, SIGKILL + restart."""

from __future__ import annotations

import asyncio
import sqlite3
import time
from pathlib import Path
from typing import Any

from agent_devkit.broker import Broker
from agent_devkit.edgecore import EdgeCorePeer
from agent_devkit.procs import agent_process, status_json
from agent_devkit.uplink import Consumer


def write(db: Path, sql: str, *args: Any) -> None:
    conn = sqlite3.connect(db, timeout=10)
    try:
        conn.execute(sql, args)
        conn.commit()
    finally:
        conn.close()


def config(tmp: Path, broker: Broker) -> Path:
    path = tmp / "agent.toml"
    path.write_text(f"""
[agent]
node_id = "gw-1"
heartbeat_interval_s = 1.0

[local_broker]
host = "{broker.host}"
port = {broker.port}

[outbox]
uplink_url = "{broker.url}"
jitter_max_s = 0.2
maintenance_interval_s = 1.0
reconnect_max_s = 1.0

[kubeedge]
enabled = true
node_name = "demo-node"
poll_interval_s = 0.2
answer_timeout_s = 1.0
reconnect_max_s = 1.0

[kubeedge.devices."line1/press"]
name = "press-1"
properties = {{ temp = "temperature" }}
""")
    return path


def test_daemon_syncs_twins_drains_decisions_and_reports_status(broker: Broker, tmp_path: Path) -> None:
    state = tmp_path / "state"
    cfg = config(tmp_path, broker)

    async def main() -> None:
        consumer = await Consumer(broker.host, broker.port).start()
        peer = await EdgeCorePeer(broker.host, broker.port, bound={"default/press-1"}).start()
        try:
            with agent_process(state, cfg) as agent:
                agent.wait_ready()
                db = state / "agent.db"
                for dev, name, value in (("line1/press", "temp", "41.5"), ("line2/drill", "rpm", "900")):
                    write(db, "INSERT INTO properties (device, name, value, type, wall, boot_id, mono) "
                              "VALUES (?, ?, ?, 'float', ?, 'b', 1)", dev, name, value, time.time())
                for _ in range(3):
                    write(db, "INSERT INTO decisions (wall, boot_id, mono, policy_name, policy_version, entrypoint, "
                              "input, result, outcome) VALUES (?, 'b', 1, 'gate', 1, 'allow', '{}', 'true', 'allow')",
                          time.time())
                async with asyncio.timeout(30):
                    while peer.values("default/press-1") != {"temperature": "41.5"}:
                        await asyncio.sleep(0.05)
                # rows written without the audit trail (kept = 'legacy') go out in full, in one document
                await consumer.wait_for({"decision-legacy/1-3"}, timeout=30)
                async with asyncio.timeout(30):
                    while True:
                        _, got = await asyncio.to_thread(status_json, state, cfg)
                        report: dict[str, Any] = got
                        devices = {d["device_id"]: d for d in report.get("kubeedge", {}).get("devices", [])}
                        if devices.get("default/line2-drill", {}).get("bound") is False:
                            break
                        await asyncio.sleep(0.2)
                assert any("line2-drill is not bound to node demo-node" in p for p in report["warnings"])
                audit = next(c for c in report["outbox"]["classes"] if c["class"] == "audit")
                assert audit["sent"] == 1
                links = {lk["name"]: lk["state"] for lk in report["links"]}
                assert links["uplink"] == "up" and links["kubeedge"] == "up"
                assert agent.stop() == 0
        finally:
            await peer.stop()
            await consumer.stop()
        assert peer.violations == []

    asyncio.run(main())
