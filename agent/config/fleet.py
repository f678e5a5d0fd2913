"""The ``[fleet]`` table: the link to the fleet manager's MQTT broker and the hot-swap guard rails."""

from __future__ import annotations

from dataclasses import dataclass

from agent.config.schema import between, non_empty, non_negative, positive, setting


def _url(value: str) -> str | None:
    if value == "" or value.startswith(("mqtt://", "mqtts://")):
        return None
    return "must start with mqtt:// or mqtts:// (for example mqtts://fleet.example:8883)"


def _topic_word(value: str) -> str | None:
    if any(c in value for c in "/+#\x00"):
        return "must not contain '/', '+', '#' (it is one level of an MQTT topic)"
    return None


def _topic_words(values: tuple[str, ...]) -> str | None:
    for v in values:
        problem = _topic_word(v) if v else "must not contain empty names"
        if problem is not None:
            return f"group {v!r} {problem}"
    return None


@dataclass(frozen=True)
class FleetSettings:
    enabled: bool = setting(False, doc="Connect to a fleet broker for releases and rollout status.")
    url: str = setting("", check=_url, doc="Fleet broker, mqtt://host:port or mqtts://host:port.")
    client_id: str = setting("", doc="Stable MQTT client id (persistent session); empty = edge-fleet-<node_id>.")
    username: str = setting("", doc="MQTT user name; with mutual TLS the broker may take it from the "
                            "certificate instead (use_identity_as_username).")
    password: str = setting("", secret=True, doc="MQTT password (never logged).")
    tls_ca: str = setting("", doc="PEM file of the CA that signed the broker's certificate (mqtts://); "
                          "empty = the system trust store.")
    tls_cert: str = setting("", doc="PEM client certificate for mutual TLS (its CN should be the node id).")
    tls_key: str = setting("", doc="PEM private key of tls_cert (keep it 0600).")
    site: str = setting("", check=_topic_word, doc="Site name: releases published to site/<site> reach this gateway.")
    groups: list[str] = setting(default_factory=tuple, check=_topic_words,
                                doc="Group names: releases published to group/<g> reach this gateway.")
    topic_prefix: str = setting("edge/v1", check=non_empty, doc="Root of every fleet topic.")
    keepalive_s: int = setting(30, check=positive, doc="MQTT keepalive of the fleet link.")
    reconnect_min_s: float = setting(0.5, check=positive, doc="First reconnect backoff (full jitter below it).")
    reconnect_max_s: float = setting(60.0, check=positive,
                                     doc="Cap of the exponential reconnect backoff; each wait is uniform in "
                                     "[0, cap] so thousands of gateways do not reconnect in lockstep.")
    max_release_bytes: int = setting(16 * 1024 * 1024, check=positive,
                                     doc="Largest release message accepted (the JSON envelope with the base64 "
                                     "artifact); keep the broker's message_size_limit at least this large.")
    shadow_inputs: int = setting(200, check=non_negative,
                                 doc="How many recently recorded decision inputs a new policy is "
                                 "shadow-evaluated on before it goes live (0 = skip).")
    health_window_s: float = setting(30.0, check=positive,
                                     doc="How long a freshly activated release is watched before it is "
                                     "considered good.")
    health_min_evals: int = setting(20, check=non_negative,
                                    doc="Evaluations needed in the window before the latency/error-rate "
                                    "rules can judge (a trap always counts).")
    health_max_traps: int = setting(0, check=non_negative,
                                    doc="Traps tolerated in the window; one more rolls back.")
    health_max_error_rate: float = setting(0.05, check=between(0.0, 1.0),
                                           doc="Fraction of failed evaluations (errors + deadline hits) that "
                                           "rolls back.")
    health_max_latency_ratio: float = setting(3.0, check=positive,
                                              doc="Roll back when the new release's p99 latency exceeds the "
                                              "previous one's by this factor (judged from 200 evaluations on).")
    max_starts_in_health_window: int = setting(2, check=non_negative,
                                               doc="Starts after a crash or failure tolerated while a release's "
                                               "health window is open (the window survives restarts); one more "
                                               "rolls the release back before it runs again (crash loop).")
