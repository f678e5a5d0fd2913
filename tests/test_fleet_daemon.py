"""The fleet service inside the real daemon (``edge-agent run`` subprocess): push → active, link in status."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import pytest

from agent_devkit.broker import Broker
from agent_devkit.fleet import NAME, FleetWorld, async_test, fleet_world, manager, sandbox_wasm
from agent_devkit.procs import agent_process, status_json

pytestmark = pytest.mark.timeout(120)


@pytest.fixture
def world(tmp_path: Path) -> Any:
    with fleet_world(tmp_path) as w:
        yield w


@async_test
async def test_daemon_installs_a_pushed_policy_and_reports_it(world: FleetWorld, broker: Broker,
                                                                tmp_path: Path) -> None:
    state = tmp_path / "gw-state"
    world.signer.trust(state, kinds=("policy",))
    files = world.pki.client("gw-daemon")
    config = tmp_path / "agent.toml"
    config.write_text(f"""
[agent]
node_id = "gw-daemon"
heartbeat_interval_s = 0.5

[local_broker]
host = "127.0.0.1"
port = {broker.port}

[fleet]
enabled = true
url = "{world.url}"
tls_ca = "{world.pki.ca}"
tls_cert = "{files.cert}"
tls_key = "{files.key}"
site = "plant-9"
reconnect_min_s = 0.1
reconnect_max_s = 1.0
health_window_s = 1.0
""")
    wasm = sandbox_wasm()
    with agent_process(state, config) as agent:
        await asyncio.to_thread(agent.wait_ready)
        async with manager(world) as mgr:
            await mgr.wait_for(lambda: mgr.presence.get("gw-daemon") == "online", 30)
            await mgr.push("site/plant-9", wasm, world.sign(wasm, 3, entrypoints=["ok/echo"]), "policy", NAME, 3)
            st = await mgr.wait_state("gw-daemon", 3, "active", limit_s=60)
            assert st["scope"] == "site/plant-9" and st["active_version"] == 3
            _code, report = await asyncio.to_thread(status_json, state, config)
            links = {link["name"]: link["state"] for link in report["links"]}  # type: ignore[attr-defined]
            assert links.get("fleet") == "up", (report, agent.output()[-3000:])
            fleet = {(f["kind"], f["name"]): f for f in report["fleet"]}  # type: ignore[attr-defined]
            assert fleet[("policy", NAME)]["state"] == "active" and fleet[("policy", NAME)]["version"] == 3
            assert await asyncio.to_thread(agent.stop) == 0
            await mgr.wait_for(lambda: mgr.presence.get("gw-daemon") == "offline", 30)
