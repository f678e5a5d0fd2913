"""The daemon as systemd runs it: READY on a real notify socket, heartbeat, SIGTERM, status."""

from __future__ import annotations

from pathlib import Path

from agent_devkit.procs import agent_process, status_json


def test_ready_watchdog_and_clean_stop(tmp_path: Path) -> None:
    state = tmp_path / "state"
    with agent_process(state, extra_env={"WATCHDOG_USEC": "400000"}) as agent:
        ready = agent.wait_ready()
        assert "STATUS=" in ready
        agent.notify.wait_for("WATCHDOG=1", timeout=10)
        code, report = status_json(state)
        assert code == 0, report
        assert report["daemon"]["state"] == "running"  # type: ignore[index]
        assert agent.stop() == 0
    fields = [f for m in agent.notify.messages for f in m.split("\n")]
    assert "STOPPING=1" in fields
    assert f"MAINPID={agent.pid}" in ready.split("\n")
    assert "WATCHDOG=1" not in fields[fields.index("STOPPING=1"):]
    code, report = status_json(state)
    assert code == 1
    assert report["daemon"]["state"] == "stopped"  # type: ignore[index]


def test_status_reports_a_killed_daemon_as_crashed(tmp_path: Path) -> None:
    state = tmp_path / "state"
    with agent_process(state) as agent:
        agent.wait_ready()
        agent.kill()
    code, report = status_json(state)
    assert code == 1
    assert report["daemon"]["state"] == "crashed"  # type: ignore[index]
    assert report["daemon"]["running"] is False  # type: ignore[index]
