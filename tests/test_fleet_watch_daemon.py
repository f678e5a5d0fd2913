"""Health windows survive the process: the real daemon (``edge-agent run``) SIGKILLed inside a release's
health window resumes the window after the restart, and a crash loop is rolled back at start before the
release is loaded again. Real Mosquitto (mutual TLS + ACL), really-signed releases, real policies."""

from __future__ import annotations

import asyncio
import json
import sqlite3
from pathlib import Path
from typing import Any

import aiomqtt
import pytest

from agent.fleet.watches import Watch, all_watches
from agent_devkit.broker import Broker
from agent_devkit.fleet import (
    NAME,
    FleetWorld,
    Manager,
    async_test,
    custom_section,
    fleet_world,
    gateway_config,
    manager,
    sandbox_wasm,
)
from agent_devkit.procs import AgentProcess, agent_process, status_json
from agent_devkit.releases import install

pytestmark = pytest.mark.timeout(120)
NODE = "gw-watch"


@pytest.fixture
def world(tmp_path: Path) -> Any:
    with fleet_world(tmp_path) as w:
        yield w


def write_config(world: FleetWorld, broker: Broker, tmp: Path, **fleet: object) -> Path:
    return gateway_config(world, tmp / "agent.toml", node=NODE, local_port=broker.port, fleet=fleet)


def events(agent: AgentProcess) -> list[dict[str, Any]]:
    """The structlog events of one agent run (JSON lines, maybe behind a journald ``<N>`` prefix)."""
    out = []
    for raw in agent.output().splitlines():
        line = raw[3:] if raw.startswith("<") and raw[2:3] == ">" else raw
        try:
            doc = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(doc, dict) and "event" in doc:
            out.append(doc)
    return out


def named(agent: AgentProcess, event: str, **fields: Any) -> list[dict[str, Any]]:
    return [e for e in events(agent) if e["event"] == event and all(e.get(k) == v for k, v in fields.items())]


def probation_of(report: dict[str, Any]) -> list[dict[str, Any]]:
    """The open health windows as ``edge-agent status --json`` reports them."""
    items = report["fleet_watches"]
    assert isinstance(items, list)
    return items


def watches_in(state: Path) -> list[Watch]:
    conn = sqlite3.connect(f"file:{state / 'agent.db'}?mode=ro", uri=True, timeout=5)
    try:
        return all_watches(conn)
    finally:
        conn.close()


async def until(pred: Any, limit_s: float, what: str) -> None:
    async with asyncio.timeout(limit_s):
        while not await asyncio.to_thread(pred):
            await asyncio.sleep(0.1)
    assert await asyncio.to_thread(pred), what


def prepare(world: FleetWorld, state: Path) -> bytes:
    """v1 installed offline (``edge-agent install`` path) before the daemon ever runs: the previous release."""
    world.signer.trust(state, kinds=("policy",))
    wasm = sandbox_wasm()
    install(state, wasm, world.sign(wasm, 1, entrypoints=["ok/echo"]))
    return custom_section(wasm, "v", b"2")


async def activate_v2(agent: AgentProcess, mgr: Manager, world: FleetWorld, v2: bytes) -> None:
    """The running agent gets v2 from the fleet manager and activates it: its health window opens."""
    await asyncio.to_thread(agent.wait_ready)
    await mgr.wait_for(lambda: mgr.presence.get(NODE) == "online", 30)
    await mgr.push("all", v2, world.sign(v2, 2, entrypoints=["ok/echo"]), "policy", NAME, 2)
    await mgr.wait_state(NODE, 2, "active", limit_s=60)


@async_test
async def test_a_window_open_at_sigkill_resumes_after_the_restart_and_ends_healthy(
        world: FleetWorld, broker: Broker, tmp_path: Path) -> None:
    state = tmp_path / "state"
    v2 = prepare(world, state)
    # a long window for the first run (the SIGKILL must land inside it even on a slow box); the restart
    # reads the config again and runs the window in full with the length configured then
    config = write_config(world, broker, tmp_path, health_window_s=60.0, max_starts_in_health_window=2)
    async with manager(world) as mgr:
        with agent_process(state, config) as agent:
            await activate_v2(agent, mgr, world, v2)
            assert await asyncio.to_thread(agent.kill) == -9
        (watch,) = watches_in(state)
        assert (watch.version, watch.previous_version, watch.state, watch.starts) == (2, 1, "open", 0), \
            "the window must still be open when the agent dies"
        _code, report = await asyncio.to_thread(status_json, state, config)  # a technician, daemon down
        (probation,) = probation_of(report)
        assert (probation["name"], probation["version"], probation["replaced"]) == (NAME, 2, 1)
        assert "runs again at its next start" in probation["left"] and probation["restarts"] == "0 of 2 tolerated"
        write_config(world, broker, tmp_path, health_window_s=3.0, max_starts_in_health_window=2)

        with agent_process(state, config) as agent:
            await asyncio.to_thread(agent.wait_ready)
            (resumed,) = named(agent, "fleet_watch_resumed", release=NAME)
            assert (resumed["version"], resumed["starts"]) == (2, 1)
            _code, report = await asyncio.to_thread(status_json, state, config)
            if probation_of(report):  # still on probation (normally: the window is 3 s)
                (probation,) = probation_of(report)
                assert probation["version"] == 2 and probation["restarts"] == "1 of 2 tolerated"
                assert probation["left_s"] > 0
            await until(lambda: watches_in(state)[-1].state != "open", 30, "the resumed window never closed")
            assert [(w.version, w.state, w.starts, w.window_s) for w in watches_in(state)] == \
                [(2, "healthy", 1, 3.0)]
            assert named(agent, "fleet_release_healthy", release=NAME, version=2)
            assert named(agent, "gate_policy_active", policy=NAME, version=2)  # it ran in the resumed window
            _code, report = await asyncio.to_thread(status_json, state, config)
            assert report["fleet_watches"] == []
            active = [r for r in report["releases"] if r["state"] == "active"]  # type: ignore[attr-defined]
            assert [(r["name"], r["version"]) for r in active] == [(NAME, 2)]
            assert await asyncio.to_thread(agent.stop) == 0
        assert not [s for t, s in mgr.history if s.get("state") == "rolled_back"]


@async_test
async def test_a_crash_loop_inside_the_window_is_rolled_back_before_the_release_runs_again(
        world: FleetWorld, broker: Broker, tmp_path: Path) -> None:
    state = tmp_path / "state"
    v2 = prepare(world, state)
    config = write_config(world, broker, tmp_path, health_window_s=60.0, max_starts_in_health_window=1)
    async with manager(world) as mgr:
        with agent_process(state, config) as agent:
            await activate_v2(agent, mgr, world, v2)
            assert await asyncio.to_thread(agent.stop) == 0  # a planned restart (SIGTERM)...
        with agent_process(state, config) as agent:  # ...does not count: the window just runs again
            await asyncio.to_thread(agent.wait_ready)
            await until(lambda: bool(named(agent, "fleet_watch_resumed", release=NAME, version=2, starts=0)), 30,
                        "the window was not resumed after a clean stop")
            agent.kill()  # "v2 kills the agent"
        with agent_process(state, config) as agent:  # start 1 after a crash: within the limit
            await asyncio.to_thread(agent.wait_ready)
            await until(lambda: bool(named(agent, "fleet_watch_resumed", release=NAME, version=2, starts=1)), 30,
                        "the window was not resumed")
            await until(lambda: bool(named(agent, "gate_policy_active", policy=NAME, version=2)), 30,
                        "v2 was not loaded after the first restart")
            agent.kill()
        assert [(w.version, w.state, w.starts) for w in watches_in(state)] == [(2, "open", 1)]
        with agent_process(state, config) as agent:  # start 2: over the limit
            await asyncio.to_thread(agent.wait_ready)
            st = await mgr.wait_state(NODE, 2, "rolled_back", code="crash_loop", limit_s=30)
            assert st["active_version"] == 1
            assert st["message"] == ("the agent restarted 2 time(s) within the health window of gate v2; "
                                     "rolled back to v1")
            names = [e["event"] for e in events(agent)]
            # rolled back while the services were being built: before READY, before any policy load
            assert names.index("fleet_crash_loop_rollback") < names.index("daemon_ready")
            await until(lambda: bool(named(agent, "gate_policy_active", policy=NAME, version=1)), 30,
                        "v1 was not loaded after the rollback")
            assert not named(agent, "gate_policy_active", policy=NAME, version=2)
            (rb,) = named(agent, "fleet_crash_loop_rollback")
            assert (rb["release"], rb["version"], rb["starts"], rb["restored"]) == (NAME, 2, 2, 1)
            _code, report = await asyncio.to_thread(status_json, state, config)
            assert report["fleet_watches"] == []
            (problem,) = [p for p in report["warnings"] if "rolled back" in p]  # type: ignore[attr-defined]
            assert "gate v2 was rolled back to v1: crash_loop: the agent restarted 2 time(s)" in problem
            # the retained v2 is redelivered on every connect: recognised as handled, never re-installed
            await mgr.wait_for(lambda: mgr.presence.get(NODE) == "online", 30)
            v3 = custom_section(v2, "v", b"3")
            await mgr.push("all", v3, world.sign(v3, 3, entrypoints=["ok/echo"]), "policy", NAME, 3)
            await mgr.wait_state(NODE, 3, "active", limit_s=60)
            assert not named(agent, "gate_policy_active", policy=NAME, version=2)
            assert [(w.version, w.state) for w in watches_in(state)] == [(2, "rolled_back"), (3, "open")]
            assert await asyncio.to_thread(agent.stop) == 0
    rows = watches_in(state)
    assert (rows[0].version, rows[0].state, rows[0].code, rows[0].starts) == (2, "rolled_back", "crash_loop", 2)
    assert [s["state"] for t, s in mgr.history if s.get("version") == 2][-1] == "rolled_back"


@async_test
async def test_a_resumed_window_rolls_back_a_module_that_fails_only_after_the_restart(
        world: FleetWorld, broker: Broker, tmp_path: Path) -> None:
    """Module v2 runs on readings; none come before the SIGKILL, so its window is clean when the agent
    dies. After the restart the window runs again, the first readings make v2 trap: rolled back to v1."""
    from agent_devkit.examples import example, test_module

    state = tmp_path / "state"
    world.signer.trust(state, kinds=("module",))
    trigger = {"type": "topic", "topics": ["factory/+/+/temp"], "batch_window_ms": 0}
    good, bad = example("counter"), test_module("trap")
    install(state, good, world.signer.sign(good, "module", "counter", 1, trigger=trigger))
    config = write_config(world, broker, tmp_path, health_window_s=30.0, health_min_evals=1)
    async with manager(world) as mgr:
        with agent_process(state, config) as agent:
            await asyncio.to_thread(agent.wait_ready)
            await mgr.wait_for(lambda: mgr.presence.get(NODE) == "online", 30)
            await mgr.push("all", bad, world.signer.sign(bad, "module", "counter", 2, trigger=trigger), "module",
                           "counter", 2)
            await mgr.wait_state(NODE, 2, "active", kind="module", name="counter", limit_s=60)
            agent.kill()
        assert [(w.kind, w.version, w.state) for w in watches_in(state)] == [("module", 2, "open")]
        with agent_process(state, config) as agent:
            await asyncio.to_thread(agent.wait_ready)
            await until(lambda: bool(named(agent, "module_loaded", module="counter", version=2)), 30,
                        "v2 was not loaded after the restart")
            async with aiomqtt.Client(broker.host, broker.port, identifier="t-line") as line:
                def rolled_back() -> bool:
                    st = mgr.status(NODE, "module", "counter") or {}
                    return st.get("version") == 2 and st.get("state") == "rolled_back"
                async with asyncio.timeout(30):
                    while not rolled_back():
                        await line.publish("factory/line1/press1/temp", b"31.5", qos=1)
                        await asyncio.sleep(0.2)
            st = mgr.status(NODE, "module", "counter")
            assert st is not None and st["code"] == "health_traps" and st["active_version"] == 1, st
            assert named(agent, "fleet_watch_running", release="counter", version=2, starts=1)
            await until(lambda: bool(named(agent, "module_loaded", module="counter", version=1)), 30,
                        "v1 was not loaded back")
            assert await asyncio.to_thread(agent.stop) == 0
    assert [(w.version, w.state, w.code, w.starts) for w in watches_in(state)] == \
        [(2, "rolled_back", "health_traps", 1)]
