"""The commands as users run them (real subprocesses): edge-fleet keygen/sign/verify, edge-agent
trust/install/status, and a running daemon noticing a CLI install without a restart."""

from __future__ import annotations

import json
import os
import sqlite3
import time
from pathlib import Path

from agent_devkit.procs import agent_process, run_agent, run_fleet, status_json
from agent_devkit.releases import Signer, policy_wasm, wasm_module


def test_fleet_keygen_sign_verify(tmp_path: Path) -> None:
    art = tmp_path / "counter.wasm"
    art.write_bytes(wasm_module())
    meta = tmp_path / "meta.json"
    meta.write_text(json.dumps({"entrypoints": ["run"], "trigger": {"type": "interval", "every_s": 10}}))
    for key_type in ("ecdsa-p256", "ed25519"):
        keys = tmp_path / key_type
        proc = run_fleet("keygen", "--out", str(keys), "--type", key_type)
        assert proc.returncode == 0, proc.stderr
        assert (keys / "release.key").stat().st_mode & 0o777 == 0o600
        assert run_fleet("keygen", "--out", str(keys)).returncode == 1  # never overwrites a key
        bundle = tmp_path / f"{key_type}.sigstore.json"
        proc = run_fleet("sign", str(art), "--key", str(keys / "release.key"), "--kind", "module", "--name",
                         "counter", "--version", "3", "--meta", str(meta), "--out", str(bundle))
        assert proc.returncode == 0, proc.stderr
        doc = json.loads(bundle.read_text())
        assert doc["mediaType"] == "application/vnd.dev.sigstore.bundle.v0.3+json"
        assert doc["dsseEnvelope"]["payloadType"] == "application/vnd.in-toto+json"
        ok = run_fleet("verify", str(art), "--bundle", str(bundle), "--key", str(keys / "release.pub"))
        assert ok.returncode == 0 and "counter v3" in ok.stdout, ok.stderr
        floor = run_fleet("verify", str(art), "--bundle", str(bundle), "--key", str(keys / "release.pub"),
                          "--floor", "3")
        assert floor.returncode == 1 and "[version_not_newer]" in floor.stderr
    other = tmp_path / "other.wasm"
    other.write_bytes(wasm_module(exports=("x",)))
    bad = run_fleet("verify", str(other), "--bundle", str(tmp_path / "ed25519.sigstore.json"), "--key",
                    str(tmp_path / "ed25519" / "release.pub"))
    assert bad.returncode == 1 and "[digest_mismatch]" in bad.stderr
    wrong_key = run_fleet("verify", str(art), "--bundle", str(tmp_path / "ed25519.sigstore.json"), "--key",
                          str(tmp_path / "ecdsa-p256" / "release.pub"))
    assert wrong_key.returncode == 1 and "[unknown_key]" in wrong_key.stderr


def test_encrypted_key_needs_passphrase(tmp_path: Path) -> None:
    import subprocess
    import sys
    env = {**os.environ, "EDGE_FLEET_PASSPHRASE": "correct horse"}
    code = "from agent.cli.fleet_main import main; raise SystemExit(main())"

    def fleet(*args: str, environ: dict[str, str]) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, env=environ,
                              timeout=60, stdin=subprocess.DEVNULL)
    assert fleet("keygen", "--out", str(tmp_path / "k"), environ=env).returncode == 0
    assert b"ENCRYPTED" in (tmp_path / "k" / "release.key").read_bytes()
    art = tmp_path / "a.wasm"
    art.write_bytes(wasm_module())
    args = ("sign", str(art), "--key", str(tmp_path / "k" / "release.key"), "--kind", "module", "--name", "a",
            "--version", "1", "--out", str(tmp_path / "b.json"))
    no_pass = {k: v for k, v in os.environ.items() if k != "EDGE_FLEET_PASSPHRASE"}
    refused = fleet(*args, environ=no_pass)
    assert refused.returncode == 1 and "EDGE_FLEET_PASSPHRASE" in refused.stderr
    wrong = fleet(*args, environ={**no_pass, "EDGE_FLEET_PASSPHRASE": "wrong"})
    assert wrong.returncode == 1 and "passphrase" in wrong.stderr
    assert fleet(*args, environ=env).returncode == 0


def test_trust_commands_install_and_status(tmp_path: Path) -> None:
    state = tmp_path / "state"
    signer = Signer.create()
    priv, pub = signer.write(tmp_path / "keys")
    art = tmp_path / "p.wasm"
    art.write_bytes(policy_wasm())
    bundle = tmp_path / "p.sigstore.json"
    assert run_fleet("sign", str(art), "--key", str(priv), "--kind", "policy", "--name", "line1-safety",
                     "--version", "2", "--out", str(bundle)).returncode == 0
    sd = ("--state-dir", str(state))
    # not trusted yet
    proc = run_agent("install", str(art), "--bundle", str(bundle), *sd)
    assert proc.returncode == 1 and "REJECTED [unknown_key]" in proc.stderr
    # trusted, but only for modules
    assert run_agent("trust", "add", str(pub), "--kinds", "module", *sd).returncode == 0
    proc = run_agent("install", str(art), "--bundle", str(bundle), *sd)
    assert proc.returncode == 1 and "[key_out_of_scope]" in proc.stderr
    # re-scoped to policies named line1-*
    proc = run_agent("trust", "add", str(pub), "--kinds", "policy", "--names", "line1-*", *sd)
    assert proc.returncode == 0, proc.stderr
    listed = json.loads(run_agent("trust", "list", "--json", *sd).stdout)
    assert [(k["key_id"], k["kinds"], k["names"]) for k in listed] == [(signer.key_id, ["policy"], "line1-*")]
    proc = run_agent("install", str(art), "--bundle", str(bundle), *sd)
    assert proc.returncode == 0, proc.stderr
    assert "installed policy line1-safety v2" in proc.stdout
    again = run_agent("install", str(art), "--bundle", str(bundle), *sd)
    assert again.returncode == 1 and "[version_not_newer]" in again.stderr
    _, report = status_json(state)
    rels = report["releases"]
    assert isinstance(rels, list)
    assert [(r["kind"], r["name"], r["version"], r["state"], r["signer_key"]) for r in rels] == [
        ("policy", "line1-safety", 2, "active", signer.key_id[:16])]
    text = run_agent("status", *sd).stdout
    assert "Installed releases" in text and "line1-safety" in text
    assert run_agent("trust", "remove", signer.key_id[:12], *sd).returncode == 0
    assert json.loads(run_agent("trust", "list", "--json", *sd).stdout) == []


def test_running_daemon_picks_up_cli_install(tmp_path: Path) -> None:
    state = tmp_path / "state"
    signer = Signer.create()
    priv, pub = signer.write(tmp_path / "keys")
    with agent_process(state) as agent:
        agent.wait_ready()
        conn = sqlite3.connect(f"file:{state / 'agent.db'}?mode=ro", uri=True)
        try:  # the daemon persists trusted time at start (a later clock reset cannot go below it)
            deadline = time.monotonic() + 20
            while time.monotonic() < deadline and not conn.execute(
                    "SELECT 1 FROM trust_state WHERE key = 'last_good_time'").fetchone():
                time.sleep(0.1)
            row = conn.execute("SELECT value FROM trust_state WHERE key = 'last_good_time'").fetchone()
            assert row is not None and float(row[0]) > 1.7e9
        finally:
            conn.close()
        assert run_agent("trust", "add", str(pub), "--state-dir", str(state)).returncode == 0
        for version in (1, 2):
            art = tmp_path / f"m{version}.wasm"
            art.write_bytes(wasm_module(exports=(f"v{version}",)))
            bundle = tmp_path / f"m{version}.json"
            assert run_fleet("sign", str(art), "--key", str(priv), "--kind", "module", "--name", "counter",
                             "--version", str(version), "--out", str(bundle)).returncode == 0
            proc = run_agent("install", str(art), "--bundle", str(bundle), "--state-dir", str(state))
            assert proc.returncode == 0, proc.stderr
            conn = sqlite3.connect(f"file:{state / 'agent.db'}?mode=ro", uri=True)
            try:
                deadline = time.monotonic() + 20
                while time.monotonic() < deadline:
                    rows = dict(conn.execute("SELECT key, value FROM trust_state").fetchall())
                    if rows.get("daemon_seen_generation") == rows.get("generation"):
                        break
                    time.sleep(0.1)
                else:
                    raise AssertionError(f"daemon did not notice the install: {rows}\n{agent.output()}")
            finally:
                conn.close()
        assert agent.proc.poll() is None  # no restart happened
        assert "releases_changed" in agent.output()
        _, report = status_json(state)
        rels = report["releases"]
        assert isinstance(rels, list) and [r["version"] for r in rels] == [2, 1]
        assert agent.stop() == 0
