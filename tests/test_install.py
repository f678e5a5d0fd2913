"""scripts/packaging/install.sh into a staging root, twice: same result, the technician's config kept."""

from __future__ import annotations

import os
import re
import subprocess
from pathlib import Path

import pytest

from agent_devkit import REPO

SCRIPT = REPO / "scripts" / "packaging" / "install.sh"


def _install(root: Path, *extra: str) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if k not in ("VIRTUAL_ENV", "DESTDIR")}
    return subprocess.run(["bash", str(SCRIPT), "--root", str(root), *extra], capture_output=True, text=True,
                          timeout=600, env=env, cwd="/")


def _tree(root: Path) -> dict[str, bytes]:
    """Files outside the venv, by path: what a re-run must leave exactly as it was."""
    out: dict[str, bytes] = {}
    for p in sorted(root.rglob("*")):
        rel = p.relative_to(root).as_posix()
        if p.is_file() and not rel.startswith("opt/edge-agent/venv/"):
            out[rel] = p.read_bytes()
    return out


@pytest.mark.slow
def test_install_is_idempotent_and_keeps_the_config(tmp_path: Path) -> None:
    root = tmp_path / "root"
    first = _install(root)
    assert first.returncode == 0, first.stdout + first.stderr
    assert "user: skipped (--root mode)" in first.stdout
    assert "systemd: skipped (--root mode)" in first.stdout
    unit = root / "etc/systemd/system/edge-agent.service"
    conf = root / "etc/edge-agent/agent.toml"
    assert unit.read_bytes() == (REPO / "systemd/edge-agent.service").read_bytes()
    assert conf.read_bytes() == (REPO / "configs/agent.example.toml").read_bytes()
    assert oct(conf.stat().st_mode & 0o777) == "0o640"
    assert oct((root / "var/lib/edge-agent").stat().st_mode & 0o777) == "0o750"
    agent = root / "opt/edge-agent/venv/bin/edge-agent"
    assert agent.is_file()
    docs = re.search(r"^Documentation=(.+)$", unit.read_text(), re.M)
    assert docs, "the unit names its documentation"
    for uri in docs.group(1).split():  # what `systemctl help edge-agent` opens is installed
        assert uri.startswith("file:///") and (root / uri.removeprefix("file:///")).is_file(), uri
    # the installed agent (not the repo's) runs and reads the installed config
    status = subprocess.run([str(agent), "status", "--json", "--config", str(conf), "--state-dir",
                             str(tmp_path / "state")], capture_output=True, text=True, timeout=120, cwd="/")
    assert status.returncode == 1 and '"never_started"' in status.stdout, status.stderr

    # a technician edits the config; a second run changes nothing of theirs and nothing else
    conf.write_text(conf.read_text() + "\n# edited on site\n")
    before = _tree(root)
    second = _install(root)
    assert second.returncode == 0, second.stdout + second.stderr
    assert "config: kept existing" in second.stdout
    assert "unit: unchanged" in second.stdout
    assert "venv: exists" in second.stdout
    assert _tree(root) == before


@pytest.mark.slow
def test_install_refuses_to_enable_an_invalid_existing_config(tmp_path: Path) -> None:
    root = tmp_path / "root"
    (root / "etc/edge-agent").mkdir(parents=True)
    (root / "etc/edge-agent/agent.toml").write_text("[agent]\nlog_level = 'loud'\n")
    proc = _install(root)
    assert proc.returncode == 2
    assert "agent.log_level" in proc.stderr
    assert not (root / "var/lib/edge-agent").exists()


def test_install_rejects_unknown_options(tmp_path: Path) -> None:
    proc = subprocess.run(["bash", str(SCRIPT), "--frobnicate"], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2 and "unknown option" in proc.stderr
