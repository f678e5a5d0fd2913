"""scripts/demo.sh end to end (on a free port and a temp dir, so it never touches the repo's var/demo)."""

from __future__ import annotations

import os
import re
import subprocess
from pathlib import Path

import pytest

from agent_devkit import REPO
from agent_devkit.broker import free_port


@pytest.mark.slow
def test_demo_runs_the_daemon_shows_status_and_stops_everything(tmp_path: Path) -> None:
    port = free_port()
    demo = (REPO / "configs" / "demo.toml").read_text()
    config = tmp_path / "demo.toml"
    config.write_text(demo.replace("port = 1883", f"port = {port}")
                      .replace("mqtt://127.0.0.1:1883", f"mqtt://127.0.0.1:{port}")
                      .replace('state_dir = "../var/demo/state"', f'state_dir = "{tmp_path / "state"}"'))
    env = {**os.environ, "DEMO_CONFIG": str(config), "DEMO_DIR": str(tmp_path / "demo"), "DEMO_SECONDS": "1",
           "DEMO_SKIP_SETUP": "1"}
    proc = subprocess.run(["bash", str(REPO / "scripts" / "demo.sh")], capture_output=True, text=True,
                          timeout=300, env=env, cwd=REPO)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out
    assert re.search(r"state\s+running", out), out  # the status table while it ran
    assert '"schema": "edge-agent.status/v1"' in out
    assert "daemon exited with code 0" in out
    started = re.search(r"started mosquitto \(pid (\d+)", out)
    assert started, out
    pid = int(started.group(1))
    # the broker it started is gone (stopped by pid); waitpid is not ours to call, so probe /proc
    assert not Path(f"/proc/{pid}").exists() or "zombie" in Path(f"/proc/{pid}/status").read_text().lower()
    assert (tmp_path / "state" / "agent.db").exists()
