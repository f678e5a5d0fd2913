"""The one place that reaches into aiomqtt for paho's manual acknowledgement.

aiomqtt 2.5.1 acknowledges QoS 1 messages on receipt and has no public switch to stop it (see the
platform notes: acked-then-dropped messages). Its ``Client`` keeps the paho client in ``_client``;
paho 2.x offers ``manual_ack_set(True)`` and ``ack(mid, qos)``. Everything that depends on that
private attribute lives here, so a library upgrade breaks one small, tested module loudly.
"""

from __future__ import annotations

from typing import Any, Protocol, cast

import aiomqtt

from agent.errors import AgentError


class ManualAckUnavailable(AgentError):
    """The installed aiomqtt/paho no longer exposes what manual acknowledgement needs."""

    code = "manual_ack_unavailable"


class PahoAcker(Protocol):
    def manual_ack_set(self, on: bool) -> None: ...

    def ack(self, mid: int, qos: int) -> Any: ...


def paho_of(client: aiomqtt.Client) -> PahoAcker:
    """The paho client inside an aiomqtt client, checked for the two methods we call."""
    paho = getattr(client, "_client", None)
    if paho is None or not callable(getattr(paho, "manual_ack_set", None)) or not callable(
            getattr(paho, "ack", None)):
        raise ManualAckUnavailable(
            "this aiomqtt/paho-mqtt version does not expose manual acknowledgement "
            "(expected aiomqtt 2.5.x with paho-mqtt 2.x); reinstall the pinned versions")
    return cast(PahoAcker, paho)


def enable_manual_ack(client: aiomqtt.Client) -> PahoAcker:
    """Switch off ack-on-receipt; call before connecting. Returns the handle to ack with."""
    paho = paho_of(client)
    paho.manual_ack_set(True)
    return paho


def send_ack(paho: PahoAcker, mid: int, qos: int) -> bool:
    """Send PUBACK (QoS 1) / PUBCOMP (QoS 2) for ``mid``; False if the socket refused it."""
    if qos <= 0:
        return True
    rc = paho.ack(mid, qos)
    return int(rc) == 0
