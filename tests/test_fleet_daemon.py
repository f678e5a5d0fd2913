"""The fleet service inside the real daemon (``edge-agent run`` subprocess): push → active, link in status."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path
from typing import Any

import aiomqtt
import pytest

from agent_devkit.broker import Broker
from agent_devkit.demo import THERMOSTAT_PREDICATE
from agent_devkit.examples import example
from agent_devkit.fleet import NAME, FleetWorld, async_test, fleet_world, gateway_config, manager, sandbox_wasm
from agent_devkit.procs import agent_process, status_json
from agent_devkit.releases import install
from tests.test_pipeline_daemon import query

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
    config = gateway_config(world, tmp_path / "agent.toml", node="gw-daemon", local_port=broker.port,
                            fleet={"site": "plant-9", "health_window_s": 1.0})
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


async def _decisions_after_a_reading(broker: Broker, db: Path, temp: bytes) -> set[tuple[int, str]]:
    """Publish one hot reading (the thermostat asks for the fan, or reports it on: each put to the gate)
    and return the (policy version, raw result set) of the gate decisions it caused."""
    before = query(db, "SELECT coalesce(max(id), 0) FROM decisions")[0][0]
    async with aiomqtt.Client(broker.host, broker.port, identifier="t-line") as pub:
        await pub.publish("factory/line1/press1/temp", temp, qos=1)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        rows = query(db, f"SELECT policy_version, result FROM decisions WHERE id > {int(before)}")
        if rows:
            await asyncio.sleep(0.5)  # the run's other decisions commit with the first
            rows = query(db, f"SELECT policy_version, result FROM decisions WHERE id > {int(before)}")
            return {(int(v), str(r)) for v, r in rows}
        await asyncio.sleep(0.1)
    raise AssertionError("the reading caused no gate decisions within 30 s")


@async_test
async def test_a_hot_swapped_policy_and_the_same_release_after_a_restart_evaluate_the_same_entrypoint(
        world: FleetWorld, broker: Broker, tmp_path: Path) -> None:
    """The signed predicate's first ``entrypoints`` entry is the policy's default entrypoint. The gate
    evaluates the default (``[pipeline] policy_entrypoint = ""``), so it must be the same whether the
    release arrived by a fleet hot swap or was loaded when the daemon started again.

    The sandbox policy's entrypoint id 0 is ``ok/echo`` (the input back); the release names ``ok/null``."""
    state = tmp_path / "gw-state"
    db = state / "agent.db"
    world.signer.trust(state, kinds=("policy", "module"))
    thermostat = example("thermostat")
    install(state, thermostat, world.signer.sign(thermostat, "module", "thermostat", 1, **THERMOSTAT_PREDICATE))
    config = gateway_config(world, tmp_path / "agent.toml", node="gw-ep", local_port=broker.port,
                            tables=f'[policy]\ndecision_policy = "{NAME}"\n[pipeline]\npolicy_entrypoint = ""\n',
                            fleet={"health_window_s": 0.5})
    wasm = sandbox_wasm()
    async with manager(world) as mgr:
        with agent_process(state, config) as agent:
            await asyncio.to_thread(agent.wait_ready)
            await asyncio.to_thread(agent.notify.wait_for_status, "modules: 1 loaded", "local_bus: connected")
            await mgr.wait_for(lambda: mgr.presence.get("gw-ep") == "online", 30)
            await mgr.push("gw/gw-ep", wasm, world.sign(wasm, 1, entrypoints=["ok/null"]), "policy", NAME, 1)
            await mgr.wait_state("gw-ep", 1, "active", limit_s=60)
            hot_swapped = await _decisions_after_a_reading(broker, db, b"35")
            assert await asyncio.to_thread(agent.stop) == 0
        with agent_process(state, config) as agent:
            await asyncio.to_thread(agent.wait_ready)
            # the releases load after READY: wait for both, and for the local broker, before the reading
            await asyncio.to_thread(agent.notify.wait_for_status, "modules: 1 loaded", "policies: 1 active",
                                    "local_bus: connected")
            restarted = await _decisions_after_a_reading(broker, db, b"36")
            log = agent.output()
            assert await asyncio.to_thread(agent.stop) == 0
    assert hot_swapped == {(1, '[{"result":null}]')}, hot_swapped
    assert restarted == hot_swapped, (restarted, log[-3000:])
