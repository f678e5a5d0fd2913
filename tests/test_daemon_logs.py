"""Logs: JSON lines with the journald ``<N>`` prefix when not on a TTY, readable on one, never secrets."""

from __future__ import annotations

import json
import os
import pty
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

from agent_devkit import REPO
from agent_devkit.procs import agent_process, run_agent

SECRET = "Pa55-w0rd-do-not-log-7f3a"
UPLINK_SECRET = "uplink-s3cret-91bc"


def test_logs_are_prefixed_json_lines_without_secrets(tmp_path: Path) -> None:
    state = tmp_path / "state"
    config = tmp_path / "agent.toml"
    config.write_text(f"[agent]\nlog_level = 'debug'\nheartbeat_interval_s = 0.2\n\n"
                      f"[local_broker]\nusername = 'gw'\npassword = '{SECRET}'\n\n"
                      f"[outbox]\nuplink_password = '{UPLINK_SECRET}'\n")
    with agent_process(state, config) as agent:
        agent.wait_ready()
        agent.signal(signal.SIGHUP)  # a reload logs the config path and service reloads too
        agent.notify.wait_for("RELOADING=1")
        assert agent.stop() == 0
        output = agent.log_path.read_text()
    lines = [line for line in output.splitlines() if line.strip()]
    events = []
    for line in lines:
        match = re.fullmatch(r"<([0-7])>(\{.*\})", line)
        assert match, f"not a <N>-prefixed JSON line: {line!r}"
        event = json.loads(match.group(2))
        assert re.fullmatch(r"[a-z][a-z0-9_]*", event["event"]), event
        assert {"level", "ts", "component"} <= event.keys()
        events.append((int(match.group(1)), event))
    names = [e["event"] for _, e in events]
    assert "daemon_ready" in names and "daemon_stopped" in names
    assert all(p == 6 for p, e in events if e["level"] == "info")
    status = run_agent("status", "--json", "--config", str(config), "--state-dir", str(state))
    for text in (output, status.stdout, status.stderr):
        assert SECRET not in text
        assert UPLINK_SECRET not in text


def test_error_events_carry_the_error_priority(tmp_path: Path) -> None:
    state = tmp_path / "state"
    config = tmp_path / "agent.toml"
    config.write_text("[agent]\nlog_level = 'info'\n")
    with agent_process(state, config) as agent:
        agent.wait_ready()
        config.write_text("[agent]\nlog_level = 42\n")
        agent.signal(signal.SIGHUP)
        deadline = time.monotonic() + 30
        while "config_reload_rejected" not in agent.output():
            assert time.monotonic() < deadline
            time.sleep(0.05)
        assert agent.stop() == 0
        line = next(ln for ln in agent.log_path.read_text().splitlines() if "config_reload_rejected" in ln)
    assert line.startswith("<3>{")


def test_logs_are_readable_on_a_tty(tmp_path: Path) -> None:
    state = tmp_path / "state"
    main_fd, child_fd = pty.openpty()
    proc = subprocess.Popen([sys.executable, "-m", "agent", "run", "--state-dir", str(state)], cwd=REPO,
                            stdin=subprocess.DEVNULL, stdout=child_fd, stderr=child_fd,
                            env={**os.environ, "NOTIFY_SOCKET": ""})
    os.close(child_fd)
    seen = b""
    try:
        deadline = time.monotonic() + 60
        while b"daemon_ready" not in seen and time.monotonic() < deadline:
            try:
                chunk = os.read(main_fd, 4096)
            except OSError:
                break
            if not chunk:
                break
            seen += chunk
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(30) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(30)
        os.close(main_fd)
    text = seen.decode(errors="replace")
    ready = next(line for line in text.splitlines() if "daemon_ready" in line)
    assert not ready.lstrip().startswith(("<", "{")), ready
    assert "[info" in ready


def test_a_closed_log_stream_never_breaks_the_caller() -> None:
    import io

    from agent.logs import configure, get_logger

    stream = io.StringIO()
    configure("info", "json", stream=stream)
    try:
        log = get_logger("test")
        log.info("before_close", n=1)
        assert stream.getvalue().startswith("<6>{")
        stream.close()
        log.error("after_close", n=2)  # dropped, not raised: the writer thread logs too
    finally:
        configure("info", "auto")
