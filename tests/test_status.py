"""``edge-agent status``: never started, running, stalled, stopped; exit codes; read-only; the schema."""

from __future__ import annotations

import os
import re
import signal
import time
from pathlib import Path
from typing import Any

from agent.storage.lock import StateLock
from agent_devkit import REPO
from agent_devkit.procs import agent_process, run_agent, status_json


def test_never_started_state_dir(tmp_path: Path) -> None:
    state = tmp_path / "empty"
    code, report = status_json(state)
    assert code == 1
    assert report["healthy"] is False
    daemon: Any = report["daemon"]
    assert daemon == {"running": False, "state": "never_started"}
    assert any("never run" in p for p in report["problems"])  # type: ignore[attr-defined]
    assert not (state / "agent.db").exists()  # status never creates anything
    text = run_agent("status", "--state-dir", str(state))
    assert text.returncode == 1
    assert "UNHEALTHY" in text.stdout and "never_started" in text.stdout


def test_status_is_read_only_and_readable_as_a_table(tmp_path: Path) -> None:
    state = tmp_path / "state"
    with agent_process(state) as agent:
        agent.wait_ready()
        assert agent.stop() == 0
    before = {p.name: p.read_bytes() for p in state.iterdir() if p.is_file()}
    text = run_agent("status", "--state-dir", str(state))
    assert text.returncode == 1
    assert "UNHEALTHY" in text.stdout
    assert re.search(r"state\s+stopped", text.stdout)
    after = {p.name: p.read_bytes() for p in state.iterdir() if p.is_file()}
    # a read-only SQLite reader may create empty WAL side files; the data itself is untouched
    assert after["agent.db"] == before["agent.db"]
    assert set(after) - set(before) <= {"agent.db-wal", "agent.db-shm"}


def test_a_frozen_daemon_is_reported_stalled(tmp_path: Path) -> None:
    state = tmp_path / "state"
    config = tmp_path / "agent.toml"
    config.write_text("[agent]\nheartbeat_interval_s = 0.1\n")
    with agent_process(state, config) as agent:
        agent.wait_ready()
        agent.signal(signal.SIGSTOP)
        try:
            deadline = time.monotonic() + 60
            while True:
                code, report = status_json(state, config)
                daemon: Any = report["daemon"]
                if daemon["state"] == "stalled":
                    break
                assert daemon["state"] == "running" and time.monotonic() < deadline, report
                time.sleep(0.5)
            assert code == 1 and daemon["running"] is True
            assert any("heartbeat" in p for p in report["problems"])  # type: ignore[attr-defined]
        finally:
            agent.signal(signal.SIGCONT)
        assert agent.stop() == 0


def _documented_fields() -> list[str]:
    readme = (REPO / "docs" / "operating.md").read_text()
    start = readme.index("## Status: `edge-agent status`")
    return re.findall(r"^\| `([a-z_.\[\]]+)` \|", readme[start:], re.M)


def _has(report: dict[str, Any], dotted: str) -> bool:
    node: Any = report
    for part in dotted.split("."):
        if part.endswith("[]"):
            node = node.get(part[:-2]) if isinstance(node, dict) else None
            if not isinstance(node, list):
                return False
            if not node:
                return True  # an empty list documents nothing to check
            node = node[0]
            continue
        if not isinstance(node, dict) or part not in node:
            return False
        node = node[part]
    return True


def test_the_docs_document_the_json_fields_a_running_agent_reports(tmp_path: Path) -> None:
    state = tmp_path / "state"
    with agent_process(state) as agent:
        agent.wait_ready()
        code, report = status_json(state)
        assert agent.stop() == 0
    assert code == 0, report
    assert report["schema"] == "edge-agent.status/v1"
    fields = _documented_fields()
    core = ["schema", "healthy", "problems", "daemon.running", "daemon.state", "daemon.pid", "daemon.heartbeat_at",
            "agent.version", "agent.state_dir", "agent.disk_free_bytes", "links[]", "errors[]"]
    assert set(core) <= set(fields), "docs/operating.md status section lost core fields"
    missing = [f for f in fields if f.split(".")[0] in ("schema", "healthy", "problems", "daemon", "agent")
               and not _has(report, f)]
    assert not missing, f"documented in docs/operating.md but absent from the report: {missing}"
    undocumented = [f"daemon.{k}" for k in report["daemon"] if f"daemon.{k}" not in fields]  # type: ignore[attr-defined]
    undocumented += [f"agent.{k}" for k in report["agent"] if f"agent.{k}" not in fields]  # type: ignore[attr-defined]
    assert not undocumented, f"reported but not documented in docs/operating.md: {undocumented}"


def test_a_daemon_still_checking_its_database_is_reported_starting(tmp_path: Path) -> None:
    state = tmp_path / "state"
    with agent_process(state) as agent:
        agent.wait_ready()
        assert agent.stop() == 0
    # a new daemon has taken the lock but not yet written its row (long integrity check / migration)
    lock = StateLock(state)
    lock.acquire()
    try:
        code, report = status_json(state)
    finally:
        lock.release()
    daemon: Any = report["daemon"]
    assert code == 1
    assert daemon["state"] == "starting" and daemon["pid"] == os.getpid() and daemon["running"] is True
