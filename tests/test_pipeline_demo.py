"""The demo's pipeline steps (scripts/demo.d/*/50-*.sh): signed releases installed, the simulated line
publishing, actuations flowing, denials logged, and `status` showing it — on a free port, temp dirs."""

from __future__ import annotations

import os
import re
import sqlite3
import subprocess
from pathlib import Path

import pytest

from tests.support.broker import free_port
from tests.support.procs import REPO


@pytest.mark.slow
def test_demo_shows_readings_actuations_and_denials(tmp_path: Path) -> None:
    port = free_port()
    config = tmp_path / "demo.toml"
    config.write_text((REPO / "configs" / "demo.toml").read_text()
                      .replace("port = 1883", f"port = {port}")
                      .replace('state_dir = "../var/demo/state"', f'state_dir = "{tmp_path / "state"}"'))
    env = {**os.environ, "DEMO_CONFIG": str(config), "DEMO_DIR": str(tmp_path / "demo"), "DEMO_SECONDS": "14",
           "DEMO_SKIP_SETUP": "1"}
    proc = subprocess.run(["bash", str(REPO / "scripts" / "demo.sh")], capture_output=True, text=True,
                          timeout=300, env=env, cwd=REPO)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-6000:]
    assert re.search(r"installed module thermostat v1 .* state=active", out), out[-6000:]
    assert re.search(r"installed policy gate v1 .* state=active", out), out[-6000:]
    assert "Control loop" in out and "Last readings" in out and "Properties" in out
    conn = sqlite3.connect(f"file:{tmp_path / 'state' / 'agent.db'}?mode=ro", uri=True)
    try:
        outcomes = dict(conn.execute("SELECT outcome, count(*) FROM decisions GROUP BY outcome").fetchall())
        published = conn.execute("SELECT count(*) FROM actuations WHERE state = 'published'").fetchone()[0]
        denied = conn.execute("SELECT DISTINCT subject, reason FROM decisions WHERE outcome = 'deny'").fetchall()
        rejects = conn.execute("SELECT count(*) FROM rejects").fetchone()[0]
    finally:
        conn.close()
    assert published >= 1 and outcomes.get("modify", 0) >= 1, outcomes
    assert denied == [("actuators/line1/press2/fan", "device is locked out for maintenance")], denied
    assert rejects >= 1
    assert "Last denials" in out
