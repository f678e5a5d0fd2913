"""The ``[outbox]`` and ``[kubeedge]`` tables: store-and-forward and device-twin sync."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from agent.config.schema import between, non_negative, port, positive, setting

DAY = 86_400


def _url(value: str) -> str | None:
    if value == "" or value.startswith(("mqtt://", "mqtts://")):
        return None
    return "must be empty (no uplink) or mqtt://host:port or mqtts://host:port"


@dataclass(frozen=True)
class OutboxSettings:
    disk_budget_bytes: int = setting(512 * 1024 * 1024, check=positive,
                                     doc="Most bytes the outbox may hold on disk before it sheds detail "
                                         "(raw telemetry, 1-minute rollups, events, 1-hour rollups, then audit "
                                         "detail into counts), each shed range reported by a gap record; control "
                                         "records, audit counts and transitions are never shed.")
    ttl_control_s: int = setting(0, check=non_negative, doc="Age after which control records expire; 0 = never.")
    ttl_audit_s: int = setting(0, check=non_negative, doc="Age after which audit records (decision log) expire; "
                                                          "0 = never.")
    ttl_events_s: int = setting(45 * DAY, check=non_negative, doc="Age after which events expire; 0 = never.")
    ttl_telemetry_s: int = setting(35 * DAY, check=non_negative,
                                   doc="Age after which telemetry summaries expire; 0 = never.")
    pull_decisions: bool = setting(True, doc="Send the audit trail to the cloud: each sealed audit window (counts "
                                             "and full records) becomes one outbox record (audit class).")
    pack_wait_s: float = setting(60.0, check=positive,
                                 doc="Module events wait at most this long (boot clock) to be packed, many per "
                                     "compressed outbox record.")
    maintenance_interval_s: float = setting(30.0, check=positive,
                                            doc="How often expiry, the disk budget and the decision cursor run.")
    uplink_url: str = setting("", check=_url, doc="Broker the outbox drains to (mqtt://host:port or mqtts://); "
                                                  "empty = store only, never drain. Small sites: the fleet broker.")
    uplink_client_id: str = setting("", doc="Stable MQTT client id of the drain (persistent session); "
                                            "empty = edge-agent-<node_id>-outbox.")
    uplink_username: str = setting("", doc="MQTT user name on the uplink broker, if required.")
    uplink_password: str = setting("", secret=True, doc="MQTT password on the uplink broker (never logged).")
    uplink_topic: str = setting("edge/{node_id}/outbox/{class}",
                                doc="Topic of a drained batch; {node_id} and {class} are replaced.")
    keepalive_s: int = setting(30, check=positive, doc="MQTT keepalive of the uplink connection.")
    batch_records: int = setting(200, check=between(1, 10_000), doc="Most records in one published batch.")
    batch_max_bytes: int = setting(256 * 1024, check=between(1024, 16 * 1024 * 1024),
                                   doc="Most payload bytes in one published batch.")
    inflight: int = setting(16, check=between(1, 1000), doc="QoS 1 batches published but not yet acknowledged.")
    rate_limit_records_s: float = setting(50_000.0, check=non_negative,
                                          doc="Most records drained per second; 0 = unlimited.")
    jitter_max_s: float = setting(10.0, check=non_negative,
                                  doc="Random wait (0..this) after the uplink comes back, before draining, "
                                      "so a fleet does not reconnect in a storm.")
    reconnect_max_s: float = setting(60.0, check=positive, doc="Cap of the uplink reconnect backoff.")
    publish_timeout_s: float = setting(30.0, check=positive, doc="A batch not acknowledged within this "
                                                                 "counts as a lost link (it is sent again).")


@dataclass(frozen=True)
class KubeEdgeDevice:
    name: str = setting("", doc="KubeEdge Device name; empty = the agent's device name.")
    namespace: str = setting("", doc="Its namespace; empty = kubeedge.namespace.")
    properties: dict[str, str] = setting(default_factory=dict,
                                         doc="Agent property name -> twin name (unlisted names map to themselves).")
    only_mapped: bool = setting(False, doc="Publish only the properties listed in 'properties'.")


@dataclass(frozen=True)
class KubeEdgeSettings:
    enabled: bool = setting(False, doc="Sync device twins to EdgeCore over the local broker.")
    node_name: str = setting("", doc="KubeEdge node name of this gateway; empty = agent.node_id.")
    namespace: str = setting("default", doc="Namespace of the devices (v1.17+ topic shape).")
    topic_style: Literal["v1.17", "v1.15"] = setting(
        "v1.17", doc="Device id in topics: v1.17 = {namespace}/{name}, v1.15 = {name}.")
    host: str = setting("", doc="Broker EdgeCore listens on; empty = local_broker.host.")
    port: int = setting(0, check=lambda v: None if v == 0 else port(v),
                        doc="Its port; 0 = local_broker.port.")
    client_id: str = setting("", doc="MQTT client id of the twin sync; empty = edge-agent-<node_id>-kubeedge.")
    devices: dict[str, KubeEdgeDevice] = setting(
        default_factory=dict, doc="Per agent device: [kubeedge.devices.<device>] name, namespace, properties, "
                                  "only_mapped. Devices not listed sync under their own name.")
    only_listed_devices: bool = setting(False, doc="Sync only devices listed under kubeedge.devices.")
    resync_interval_s: float = setting(120.0, check=positive,
                                       doc="Republish the full twin state this often (EdgeCore re-sends "
                                           "nothing after its own cloud link returns).")
    poll_interval_s: float = setting(1.0, check=positive, doc="How often changed properties are looked for.")
    answer_timeout_s: float = setting(5.0, check=positive, doc="Wait this long for a result before retrying.")
    max_attempts: int = setting(5, check=positive, doc="Retries of one update before the device is marked "
                                                       "failing (until the next full resync).")
    max_messages_s: float = setting(25.0, check=positive,
                                    doc="Most messages per second to EdgeCore (its uplink is throttled).")
    membership_interval_s: float = setting(300.0, check=positive, doc="How often membership/get is asked.")
    device_state: Literal["online", "ok"] = setting("online", doc="State reported by state/update.")
    reconnect_max_s: float = setting(30.0, check=positive, doc="Cap of the reconnect backoff.")
