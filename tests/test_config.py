"""Config validation: every bad file is refused with its file, key and problem, before anything happens."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from agent.config import load_config
from agent.config.loader import ENV_VAR
from agent.errors import ConfigError
from agent_devkit.procs import run_agent

BAD_CONFIGS = [
    # (name, file text, words the message must contain)
    ("unknown_key", "[agent]\nlog_levle = 'debug'\n", ["agent.log_levle", "unknown key", "log_level"]),
    ("unknown_table", "[agnet]\nnode_id = 'x'\n", ["agnet", "unknown key"]),
    ("wrong_type", "[local_broker]\nport = '1883'\n", ["local_broker.port", "expected an integer"]),
    ("wrong_type_bool", "[kubeedge]\nenabled = 'yes'\n", ["kubeedge.enabled", "true or false"]),
    ("bad_value", "[local_broker]\nport = 70000\n", ["local_broker.port", "between 1 and 65535", "70000"]),
    ("bad_choice", "[agent]\nlog_level = 'verbose'\n", ["agent.log_level", "one of", "'verbose'"]),
    ("not_positive", "[agent]\nheartbeat_interval_s = 0\n", ["agent.heartbeat_interval_s", "greater than 0"]),
    ("not_finite", "[agent]\nstop_timeout_s = inf\n", ["agent.stop_timeout_s", "finite"]),
    ("list_item", "[local_broker]\nsubscriptions = ['a/#', 3]\n", ["local_broker.subscriptions[1]", "string"]),
    ("table_expected", "agent = 3\n", ["'agent'", "expected a table"]),
    ("invalid_toml", "[agent\nnode_id = 'x'\n", ["not valid TOML", "line 1"]),
]


@pytest.mark.parametrize(("name", "text", "words"), BAD_CONFIGS, ids=[c[0] for c in BAD_CONFIGS])
def test_bad_config_is_refused_with_file_key_and_problem(tmp_path: Path, name: str, text: str,
                                                        words: list[str]) -> None:
    path = tmp_path / f"{name}.toml"
    path.write_text(text)
    with pytest.raises(ConfigError) as info:
        load_config(path)
    message = str(info.value)
    assert str(path) in message
    for word in words:
        assert word in message, message


def test_missing_named_file_names_it(tmp_path: Path) -> None:
    path = tmp_path / "nope.toml"
    with pytest.raises(ConfigError, match="config file not found") as info:
        load_config(path)
    assert str(path) in str(info.value)


def test_missing_default_file_runs_on_defaults(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.delenv(ENV_VAR, raising=False)
    monkeypatch.setattr("agent.config.loader.DEFAULT_CONFIG_PATH", tmp_path / "absent.toml")
    config = load_config(None)
    assert config.state_dir == Path("/var/lib/edge-agent")
    assert config.local_broker.port == 1883


def test_env_var_names_the_file_and_state_dir_override_wins(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    path = tmp_path / "env.toml"
    path.write_text("[agent]\nnode_id = 'gw-7'\nstate_dir = '/srv/edge'\n")
    monkeypatch.setenv(ENV_VAR, str(path))
    assert load_config(None).node_id == "gw-7"
    assert load_config(None).state_dir == Path("/srv/edge")
    assert load_config(None, tmp_path / "other").state_dir == tmp_path / "other"
    monkeypatch.setenv(ENV_VAR, str(tmp_path / "gone.toml"))
    with pytest.raises(ConfigError, match=r"gone\.toml"):
        load_config(None)


def test_relative_state_dir_is_relative_to_the_config_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "etc").mkdir()
    path = tmp_path / "etc" / "agent.toml"
    path.write_text("[agent]\nstate_dir = '../var/state'\n")
    monkeypatch.chdir("/")
    assert load_config(path).state_dir == tmp_path / "var" / "state"


def test_secret_values_never_appear_in_errors_or_reprs(tmp_path: Path) -> None:
    path = tmp_path / "secret.toml"
    path.write_text("[local_broker]\npassword = 98765432123\n")
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert "local_broker.password" in str(info.value)
    assert "98765432123" not in str(info.value)
    path.write_text("[local_broker]\npassword = 'hunter2-very-secret'\n")
    config = load_config(path)
    assert config.local_broker.password == "hunter2-very-secret"
    assert "hunter2-very-secret" not in repr(config)


@pytest.mark.parametrize("command", ["run", "status"])
def test_cli_exits_2_on_a_bad_config_and_creates_nothing(tmp_path: Path, command: str) -> None:
    state = tmp_path / "state"
    path = tmp_path / "bad.toml"
    path.write_text(f"[agent]\nstate_dir = '{state}'\n\n[storage]\nsynchronous = 'OFF'\n")
    proc = run_agent(command, "--config", str(path), timeout=60)
    assert proc.returncode == 2, proc.stderr
    assert str(path) in proc.stderr
    assert "storage.synchronous" in proc.stderr
    assert "Traceback" not in proc.stderr
    assert not state.exists()


def test_cli_usage_error_exits_2(tmp_path: Path) -> None:
    proc = run_agent("status", "--no-such-option")
    assert proc.returncode == 2
    proc = run_agent("run", "--config", str(tmp_path / "missing.toml"), "--state-dir", str(tmp_path / "s"))
    assert proc.returncode == 2
    assert "missing.toml" in proc.stderr and "not found" in proc.stderr
    assert not (tmp_path / "s").exists()


def test_env_config_is_used_by_the_cli(tmp_path: Path) -> None:
    path = tmp_path / "env.toml"
    path.write_text("[agent]\nlog_level = 'loud'\n")
    proc = run_agent("status", "--state-dir", str(tmp_path / "s"), env={ENV_VAR: str(path)})
    assert proc.returncode == 2
    assert "agent.log_level" in proc.stderr
    assert os.path.basename(path) in proc.stderr
