"""The demo's signed releases installed through the real CLI: a fleet key from ``edge-fleet keygen``,
trusted with ``edge-agent trust add``, the thermostat module and the gate policy signed with
``edge-fleet sign`` and installed with ``edge-agent install`` (what the demo and the soak run do).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from agent_devkit.examples import example
from agent_devkit.opa.gate import build_gate
from agent_devkit.procs import run_agent, run_fleet

THERMOSTAT_PREDICATE = {"trigger": {"type": "topic", "topics": ["factory/+/+/temp"], "batch_window_ms": 0},
                        "config": {"metric": "temp", "high": 30.0, "low": 27.0, "actuator_prefix": "actuators"}}


def ok(proc: Any) -> None:
    assert proc.returncode == 0, f"{proc.args}\n{proc.stdout}\n{proc.stderr}"


def sign_and_install(tmp: Path, state: Path, config: Path) -> None:
    keys = tmp / "keys"
    ok(run_fleet("keygen", "--out", str(keys), "--name", "fleet"))
    ok(run_agent("trust", "add", str(keys / "fleet.pub"), "--config", str(config), "--state-dir", str(state)))
    module = tmp / "thermostat.wasm"
    module.write_bytes(example("thermostat"))
    meta = tmp / "thermostat.meta.json"
    meta.write_text(json.dumps(THERMOSTAT_PREDICATE))
    policy = tmp / "gate.tar.gz"
    policy.write_bytes(build_gate())
    for artifact, kind, name, extra in ((module, "module", "thermostat", ["--meta", str(meta)]),
                                        (policy, "policy", "gate", [])):
        bundle = tmp / f"{name}.sigstore.json"
        ok(run_fleet("sign", str(artifact), "--key", str(keys / "fleet.key"), "--kind", kind, "--name", name,
                     "--version", "1", *extra, "--out", str(bundle)))
        ok(run_agent("install", str(artifact), "--bundle", str(bundle), "--config", str(config),
                     "--state-dir", str(state)))
