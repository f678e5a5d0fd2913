"""Configuration: TOML file → validated, frozen settings. The whole schema lives in this package.

Every table's dataclass is importable from here (``from agent.config import PolicySettings``); the
config package imports nothing above it, so any layer may depend on its settings.
"""

from agent.config.fleet import FleetSettings
from agent.config.loader import DEFAULT_CONFIG_PATH, load_config
from agent.config.model import AgentConfig, AgentSettings, LocalBrokerSettings, StorageSettings
from agent.config.modules import ModuleSettings
from agent.config.pipeline import PipelineSettings
from agent.config.policy import PolicySettings
from agent.config.sync import KubeEdgeDevice, KubeEdgeSettings, OutboxSettings

__all__ = ["DEFAULT_CONFIG_PATH", "AgentConfig", "AgentSettings", "FleetSettings", "KubeEdgeDevice",
           "KubeEdgeSettings", "LocalBrokerSettings", "ModuleSettings", "OutboxSettings", "PipelineSettings",
           "PolicySettings", "StorageSettings", "load_config"]
