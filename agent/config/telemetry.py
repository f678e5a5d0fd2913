"""The ``[telemetry]`` table: historian-style tiers of the readings kept on the gateway."""

from __future__ import annotations

from dataclasses import dataclass

from agent.config.schema import non_negative, setting

DAY = 86_400


@dataclass(frozen=True)
class TelemetrySettings:
    keep_1m_s: float = setting(2.0 * DAY, check=non_negative,
                               doc="How long 1-minute rollups (count, min, max, mean, last per device and metric) "
                                   "are kept on the gateway; 0 = no 1-minute tier.")
    keep_1h_s: float = setting(35.0 * DAY, check=non_negative,
                               doc="How long 1-hour rollups are kept on the gateway; 0 = no 1-hour tier.")
    cloud_rollups: bool = setting(True, doc="Send the 1-minute and 1-hour rollups to the cloud through the outbox "
                                            "(the outage is covered by rollups, raw readings only the recent past).")
    raw_recent_s: float = setting(3600.0, check=non_negative,
                                  doc="While the uplink is up, raw readings are sent too: at reconnect those of the "
                                      "last raw_recent_s seconds, then every new one. 0 = never send raw readings.")
