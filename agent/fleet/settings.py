"""The ``[fleet]`` table: the link to the fleet manager's MQTT broker."""

from __future__ import annotations

from dataclasses import dataclass

from agent.config.schema import setting


@dataclass(frozen=True)
class FleetSettings:
    enabled: bool = setting(False, doc="Connect to a fleet broker for releases and rollout status.")
    url: str = setting("", doc="Fleet broker, mqtt://host:port or mqtts://host:port.")
