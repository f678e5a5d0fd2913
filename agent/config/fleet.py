"""The ``[fleet]`` table: the link to the fleet manager's MQTT broker and the hot-swap guard rails."""

from __future__ import annotations

from dataclasses import dataclass
from urllib.parse import urlsplit

from agent.config.schema import between, non_empty, non_negative, positive, setting


def _url(value: str) -> str | None:
    if value == "" or value.startswith(("mqtt://", "mqtts://")):
        return None
    return "must start with mqtt:// or mqtts:// (for example mqtts://fleet.example:8883)"


def _registry_url(value: str) -> str | None:
    if value == "":
        return None
    parts = urlsplit(value)
    if parts.scheme in ("http", "https") and parts.hostname and parts.path in ("", "/"):
        return None
    return "must look like https://host[:port] (no path: the repository prefix is registry_prefix)"


def _repo_prefix(value: str) -> str | None:
    import re

    if value == "" or re.match(r"^[a-z0-9]+(?:(?:[._]|__|-+)[a-z0-9]+)*(?:/[a-z0-9]+(?:(?:[._]|__|-+)[a-z0-9]+)*)*$",
                               value):
        return None
    return "must be a repository path: lower-case letters, digits, '.', '_', '-', separated by '/'"


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
    registry: str = setting("", check=_registry_url,
                            doc="OCI registry releases and desired state are pulled from, https://host[:port] "
                            "(empty = releases arrive only as retained MQTT messages). See docs/registry.md.")
    registry_prefix: str = setting("edge", check=_repo_prefix,
                                   doc="Repository prefix: releases in <prefix>/<kind>/<name>, desired state in "
                                   "<prefix>/desired-state.")
    registry_mirror: str = setting("", check=_registry_url,
                                   doc="A mirror or pull-through cache tried before the registry (e.g. the site's "
                                   "cache); everything read is digest- and signature-checked, so it need not be "
                                   "trusted.")
    registry_username: str = setting("", doc="Registry user (basic auth, or the bearer-token flow).")
    registry_password: str = setting("", secret=True, doc="Registry password (never logged).")
    registry_token: str = setting("", secret=True, doc="A static bearer token instead of user/password.")
    registry_ca: str = setting("", doc="PEM file of the CA that signed the registry's (and the mirror's) "
                               "certificate; empty = the system trust store.")
    registry_poll_s: float = setting(300.0, check=positive,
                                     doc="How often the desired state is pulled without a doorbell (each wait "
                                     "jittered by +-20 %); also the longest a missed doorbell delays a release.")
    registry_doorbell_jitter_s: float = setting(5.0, check=non_negative,
                                                doc="A doorbell is answered after a random wait in [0, this], so a "
                                                "fleet does not hit the registry in one instant.")
    registry_pull_concurrency: int = setting(2, check=positive,
                                             doc="Blob downloads at once (a gateway rarely needs more than one).")
