"""The configuration model: one frozen dataclass per TOML table, the whole schema in this package.

The root tables (``[agent]``, ``[storage]``, ``[local_broker]``) are here; each subsystem's table
has its own module next to this one (``policy``, ``modules``, ``pipeline``, ``sync``, ``fleet``), so
the config package depends on nothing but the schema helpers and every other package can import
its settings without a cycle. ``configs/agent.example.toml`` documents every key and a test checks
the two agree.
"""

from __future__ import annotations

import socket
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Literal

from agent.config.fleet import FleetSettings
from agent.config.modules import ModuleSettings
from agent.config.pipeline import AuditSettings, PipelineSettings
from agent.config.policy import PolicySettings
from agent.config.schema import non_empty, non_negative, port, positive, setting
from agent.config.sync import KubeEdgeSettings, OutboxSettings
from agent.config.telemetry import TelemetrySettings


@dataclass(frozen=True)
class AgentSettings:
    node_id: str = setting("", doc="Stable gateway id used in client ids and topics; empty = the host name.")
    state_dir: Path = setting(Path("/var/lib/edge-agent"),
                              doc="Where the SQLite state and caches live; relative = relative to the config file.")
    log_level: Literal["debug", "info", "warning", "error"] = setting("info", doc="Lowest log level written.")
    log_format: Literal["auto", "json", "console"] = setting(
        "auto", doc="auto = JSON lines with journald priority when not a TTY, readable on a TTY.")
    heartbeat_interval_s: float = setting(5.0, check=positive,
                                          doc="How often the daemon stamps its heartbeat into SQLite.")
    stop_timeout_s: float = setting(10.0, check=positive,
                                    doc="Bound on a graceful stop: how long services get to finish after SIGTERM "
                                        "before the daemon exits anyway.")


@dataclass(frozen=True)
class StorageSettings:
    synchronous: Literal["FULL", "NORMAL"] = setting(
        "FULL", doc="SQLite synchronous mode. FULL survives power cuts; group commits keep it fast.")
    commit_batch_max: int = setting(256, check=positive,
                                    doc="Most write jobs the single writer groups into one commit.")
    min_free_bytes: int = setting(64 * 1024 * 1024, check=non_negative,
                                  doc="Below this free space on the state disk, status reports unhealthy.")


@dataclass(frozen=True)
class LocalBrokerSettings:
    host: str = setting("127.0.0.1", check=non_empty, doc="The gateway's own MQTT broker.")
    port: int = setting(1883, check=port, doc="Its TCP port.")
    client_id: str = setting("", doc="Stable MQTT client id (persistent session); empty = edge-agent-<node_id>.")
    username: str = setting("", doc="MQTT user name, if the broker requires one.")
    password: str = setting("", secret=True, doc="MQTT password (never logged).")
    keepalive_s: int = setting(30, check=positive, doc="MQTT keepalive.")
    subscriptions: list[str] = setting(default_factory=lambda: ("factory/#",),
                                       doc="Topic filters for sensor readings.")
    reconnect_min_s: float = setting(0.5, check=positive,
                                     doc="First reconnect delay (doubles per failure, with jitter).")
    reconnect_max_s: float = setting(30.0, check=positive, doc="Cap of the reconnect backoff.")


@dataclass(frozen=True)
class AgentConfig:
    agent: AgentSettings = field(default_factory=AgentSettings)
    storage: StorageSettings = field(default_factory=StorageSettings)
    local_broker: LocalBrokerSettings = field(default_factory=LocalBrokerSettings)
    policy: PolicySettings = field(default_factory=PolicySettings)
    modules: ModuleSettings = field(default_factory=ModuleSettings)
    outbox: OutboxSettings = field(default_factory=OutboxSettings)
    kubeedge: KubeEdgeSettings = field(default_factory=KubeEdgeSettings)
    fleet: FleetSettings = field(default_factory=FleetSettings)
    pipeline: PipelineSettings = field(default_factory=PipelineSettings)
    audit: AuditSettings = field(default_factory=AuditSettings)
    telemetry: TelemetrySettings = field(default_factory=TelemetrySettings)

    @property
    def node_id(self) -> str:
        return self.agent.node_id or socket.gethostname()

    @property
    def state_dir(self) -> Path:
        return self.agent.state_dir

    @property
    def db_path(self) -> Path:
        return self.agent.state_dir / "agent.db"

    def with_state_dir(self, state_dir: Path) -> AgentConfig:
        return replace(self, agent=replace(self.agent, state_dir=state_dir))
