"""The demo's steps (scripts/demo/*/*.sh): signed releases installed, the simulated line publishing,
actuations flowing, denials logged (a locked-out press's fan command AND its fan property), the twins
synced to the simulated EdgeCore (equal to the agent's latest properties; press-3 reported as not bound
to demo-node), and `status` showing it — on a free port, temp dirs."""

from __future__ import annotations

import json
import os
import re
import sqlite3
import subprocess
from pathlib import Path

import pytest

from agent.sync.twins import normalise
from agent_devkit import REPO
from agent_devkit.broker import free_port


@pytest.mark.slow
def test_demo_shows_readings_actuations_and_denials(tmp_path: Path) -> None:
    port = free_port()
    config = tmp_path / "demo.toml"
    config.write_text((REPO / "configs" / "demo.toml").read_text()
                      .replace("port = 1883", f"port = {port}")
                      .replace("mqtt://127.0.0.1:1883", f"mqtt://127.0.0.1:{port}")
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
        denied = conn.execute("SELECT DISTINCT subject, reason FROM decisions WHERE outcome = 'deny'"
                              " AND policy_version = 1").fetchall()
        denied_v2 = conn.execute("SELECT DISTINCT subject FROM decisions WHERE outcome = 'deny'"
                                 " AND policy_version = 2").fetchall()
        gate = conn.execute("SELECT version FROM releases WHERE kind = 'policy' AND name = 'gate'"
                            " AND state = 'active'").fetchall()
        rejects = conn.execute("SELECT count(*) FROM rejects").fetchone()[0]
        props = {(d, n): v for d, n, v in conn.execute("SELECT device, name, value FROM properties")}
    finally:
        conn.close()
    assert published >= 1 and outcomes.get("modify", 0) >= 1, outcomes
    # press2 is locked out: its fan command is denied, and so is the fan property that would claim it is on
    assert sorted(denied) == [("actuators/line1/press2/fan", "device is locked out for maintenance"),
                              ("line1/press2/fan", "device is locked out for maintenance: actuated state not changed")
                              ], denied
    assert ("line1/press2", "fan") not in props and ("line1/press2", "temp") in props, props
    assert rejects >= 1
    assert "Last denials" in out

    # fleet: gate v2 (press3 locked out too) pushed over the local broker, verified, shadow-evaluated,
    # swapped in while the line ran, reported active to `edge-fleet rollout`; status shows it
    assert "published policy gate v2" in out and "active: 1  rejected: 0" in out, out[-6000:]
    assert re.search(r"policy\s+gate\s+2\s+active\s+2\s+\d+/\d+ changed", out), out[-6000:]
    assert gate == [(2,)], gate
    assert set(denied_v2) <= {("actuators/line1/press2/fan",), ("line1/press2/fan",),
                              ("actuators/line1/press3/fan",), ("line1/press3/fan",)}, denied_v2

    # KubeEdge: the simulated EdgeCore holds exactly the agent's latest properties of the bound devices
    # (the line was stopped before the check, so they no longer change), nothing of press-3, and no
    # message of the agent broke one of EdgeCore's rules
    assert "EdgeCore's twins == the agent's latest properties (2 bound devices" in out, out[-6000:]
    held = json.loads((tmp_path / "demo" / "edgecore-twins.json").read_text())
    mapped = {"temp": "temperature", "fan": "fan"}
    expected: dict[str, dict[str, str]] = {}
    for (device, name), value in props.items():
        dev_id = "default/press-" + device.removeprefix("line1/press")
        if dev_id != "default/press-3":
            expected.setdefault(dev_id, {})[mapped[name]] = normalise(value, "float" if name == "temp" else "string")
    assert held["twins"] == expected and set(expected) == {"default/press-1", "default/press-2"}, held
    assert "fan" not in held["twins"]["default/press-2"]
    assert held["violations"] == [] and held["unbound"] == {"default/press-3": "other-node"}, held
    assert "KubeEdge device default/press-3 is not bound to node demo-node" in out
    # a cloud-side mistake the agent cannot fix is a warning: the running agent still reads HEALTHY
    # (the second warning: the demo's malformed reading, refused and counted)
    assert "edge-agent status: HEALTHY (2 warnings)\n  ~ KubeEdge device default/press-3 is not bound" in out
    assert "\n  ~ input refused recently (local_bus " in out
    assert re.search(r"default/press-1\s+True\s+synced", out) and re.search(r"default/press-3\s+False\s+unbound", out)
    assert "twin state EdgeCore (node demo-node) holds" in out
