"""A reboot while offline, with the real daemon: a signed scheduled module installed through the normal
release path, the daemon stopped, the offline gap faked in its SQLite state, the daemon restarted —
exactly one catch-up run, and none more after another restart."""

from __future__ import annotations

import json
import time
from pathlib import Path

from agent.storage import Store
from agent_devkit.broker import Broker
from agent_devkit.examples import example
from agent_devkit.procs import AgentProcess, agent_process, status_json
from agent_devkit.releases import Signer, install
from tests.modules.support import rows

HOUR = 3600.0


def wait_for_log(agent: AgentProcess, needle: str, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if needle in agent.output():
            return
        time.sleep(0.05)
    raise AssertionError(f"no {needle!r} in the agent log:\n{agent.output()[-3000:]}")


def module_runs(state: Path) -> list[tuple[str, dict[str, object]]]:
    store = Store.open(state)
    try:
        return [(o, json.loads(t)) for o, t in rows(store, "SELECT outcome, trigger FROM module_runs ORDER BY id")]
    finally:
        store.close()


def test_daemon_restart_after_offline_gap_runs_one_catch_up(tmp_path: Path, broker: Broker) -> None:
    state = tmp_path / "state"
    config = tmp_path / "agent.toml"
    config.write_text(f'[local_broker]\nhost = "127.0.0.1"\nport = {broker.port}\n')
    signer = Signer.create()
    signer.trust(state, kinds=("module",))
    wasm = example("counter")
    install(state, wasm, signer.sign(wasm, "module", "tick", 1,
                                     trigger={"type": "schedule", "schedule": {"interval_s": HOUR}}))

    with agent_process(state, config) as agent:
        agent.wait_ready()
        wait_for_log(agent, "module_scheduled")
        assert agent.stop() == 0
    assert module_runs(state) == []  # the first run is an hour away

    # the gateway ran the module ~3 h ago, then lost power: record that, as the daemon would have
    last = time.time() - 3 * HOUR - 100
    store = Store.open(state)
    try:
        store.writer.run_sync(lambda db: db.execute(
            "INSERT INTO module_schedules (name, spec, last_run_wall, runs, updated_wall) VALUES (?, ?, ?, 1, ?)",
            ("tick", "interval:3600", last, last)))
    finally:
        store.close()

    with agent_process(state, config) as agent:
        agent.wait_ready()
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and not module_runs(state):
            time.sleep(0.1)
        time.sleep(1.0)  # a duplicate catch-up would land here
        assert agent.stop() == 0
    got = module_runs(state)
    assert len(got) == 1, got
    outcome, trigger = got[0]
    assert outcome == "ok"
    assert (trigger["kind"], trigger["catch_up"], trigger["missed"]) == ("schedule", True, 3)
    _, report = status_json(state, config)
    modules: list[dict[str, object]] = report["modules"]  # type: ignore[assignment]
    (mod,) = modules
    assert (mod["name"], mod["last_outcome"], mod["runs_24h"], mod["schedule"]) == ("tick", "ok", 1, "interval:3600")

    with agent_process(state, config) as agent:  # and a plain restart runs nothing again
        agent.wait_ready()
        wait_for_log(agent, "module_scheduled")
        time.sleep(1.0)
        assert agent.stop() == 0
    assert len(module_runs(state)) == 1


def test_daemon_loads_and_swaps_modules_installed_while_running(tmp_path: Path, broker: Broker) -> None:
    state = tmp_path / "state"
    config = tmp_path / "agent.toml"
    config.write_text(f'[local_broker]\nhost = "127.0.0.1"\nport = {broker.port}\n')
    signer = Signer.create()
    signer.trust(state, kinds=("module",))
    counter, avg = example("counter"), example("moving_avg")
    with agent_process(state, config) as agent:
        agent.wait_ready()
        install(state, counter, signer.sign(counter, "module", "m", 1, trigger={"type": "manual"}))
        wait_for_log(agent, '"module_loaded"')
        install(state, avg, signer.sign(avg, "module", "m", 2, trigger={"type": "schedule",
                                                                         "schedule": {"cron": "0 3 * * *"}}))
        wait_for_log(agent, '"previous": 1')  # module_activated v2, replacing v1 without a restart
        wait_for_log(agent, "module_scheduled")
        log = agent.output()
        assert agent.stop() == 0
    loaded = [json.loads(line[line.index("{"):]) for line in log.splitlines() if '"module_loaded"' in line]
    assert [(e["module"], e["version"], e["trigger"]) for e in loaded] == [("m", 1, "manual"), ("m", 2, "schedule")]
