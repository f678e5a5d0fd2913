"""Configuration: TOML file → validated, frozen settings."""

from agent.config.loader import DEFAULT_CONFIG_PATH, load_config
from agent.config.model import AgentConfig

__all__ = ["DEFAULT_CONFIG_PATH", "AgentConfig", "load_config"]
