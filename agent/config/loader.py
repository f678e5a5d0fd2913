"""Find, read and validate the config file before anything else happens."""

from __future__ import annotations

import os
import tomllib
from pathlib import Path

from agent.config.model import AgentConfig
from agent.config.schema import parse
from agent.errors import ConfigError

DEFAULT_CONFIG_PATH = Path("/etc/edge-agent/agent.toml")
ENV_VAR = "EDGE_AGENT_CONFIG"


def resolve_path(explicit: Path | None) -> tuple[Path, bool]:
    """The config path and whether the user named it (a named file must exist)."""
    if explicit is not None:
        return explicit, True
    env = os.environ.get(ENV_VAR)
    if env:
        return Path(env), True
    return DEFAULT_CONFIG_PATH, False


def load_config(explicit: Path | None = None, state_dir: Path | None = None) -> AgentConfig:
    """Load and validate the config; ``state_dir`` (from ``--state-dir``) overrides the file.

    A missing *default* file is not an error: a gateway with no config still runs on defaults.
    A relative ``agent.state_dir`` is taken relative to the config file's directory.
    """
    path, named = resolve_path(explicit)
    if path.exists():
        try:
            raw = tomllib.loads(path.read_text(encoding="utf-8"))
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError(f"{path}: not valid TOML: {exc}") from exc
        except (OSError, UnicodeDecodeError) as exc:
            raise ConfigError(f"{path}: cannot read the config file: {exc}") from exc
        config = parse(str(path), AgentConfig, raw)
        if not config.state_dir.is_absolute():
            # relative to the file, not to wherever the command happens to run
            config = config.with_state_dir(Path(os.path.normpath((path.parent / config.state_dir).absolute())))
    elif named:
        raise ConfigError(f"{path}: config file not found (named by --config or ${ENV_VAR})")
    else:
        config = AgentConfig()
    if state_dir is not None:
        config = config.with_state_dir(Path(os.path.normpath(state_dir.absolute())))
    return config
