"""The ``[outbox]`` and ``[kubeedge]`` tables: store-and-forward and device-twin sync."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from agent.config.schema import positive, setting


@dataclass(frozen=True)
class OutboxSettings:
    disk_budget_bytes: int = setting(512 * 1024 * 1024, check=positive,
                                     doc="Most bytes the outbox may hold on disk before it degrades.")


@dataclass(frozen=True)
class KubeEdgeSettings:
    enabled: bool = setting(False, doc="Sync device twins to EdgeCore over the local broker.")
    node_name: str = setting("", doc="KubeEdge node name of this gateway; empty = agent.node_id.")
    namespace: str = setting("default", doc="Namespace of the devices (v1.17+ topic shape).")
    topic_style: Literal["v1.17", "v1.15"] = setting(
        "v1.17", doc="Device id in topics: v1.17 = {namespace}/{name}, v1.15 = {name}.")
