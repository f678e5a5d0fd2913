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


READ_CHUNK = 16384


class _ReadBuffer:
    """Bytes received from the socket but not yet consumed by paho's packet parser."""

    def __init__(self) -> None:
        self.sock: object | None = None
        self.data = b""
        self.pos = 0
        self.refills = 0  # socket reads still allowed in the current loop_read call

    def pending(self) -> int:
        return len(self.data) - self.pos


def enable_buffered_reads(client: aiomqtt.Client) -> None:
    """Make paho read the socket in large chunks instead of 1-byte header reads (fewer syscalls).

    paho parses every packet with ``recv(1)`` for the command byte, ``recv(1)`` per length byte and
    one ``recv`` for the body: 3+ system calls per packet, which dominated the local bus's CPU at
    1k readings/s. This wraps paho's ``_sock_recv`` (a private method; checked here, like the
    manual ack) with a per-socket buffer filled by one ``recv(64 KiB)``, and re-runs paho's
    ``loop_read`` while buffered bytes remain, so nothing buffered waits for the next readiness
    event. Only ONE socket read per ``loop_read`` (one readiness event): a flood of redelivered
    messages must not keep the loop parsing while acknowledgements wait to be written (more
    duplicates after a crash). Errors, EOF and TLS keep paho's own handling (the refill goes
    through the original method).
    """
    paho: Any = paho_of(client)
    orig_recv = getattr(paho, "_sock_recv", None)
    orig_loop_read = getattr(paho, "loop_read", None)
    if not callable(orig_recv) or not callable(orig_loop_read):
        raise ManualAckUnavailable("this paho-mqtt version has no _sock_recv/loop_read to buffer reads with; "
                                   "reinstall the pinned versions")
    buf = _ReadBuffer()

    def sock_recv(bufsize: int) -> bytes:
        sock = paho._sock
        if buf.sock is not sock:  # a new connection: never hand over bytes of the old one
            buf.sock, buf.data, buf.pos = sock, b"", 0
        if buf.pos >= len(buf.data):
            if buf.refills <= 0:
                # one socket read per readiness event: yield to the loop (acks, commits) instead of
                # parsing a flood for as long as the broker sends; the level-triggered reader fires again
                raise BlockingIOError()
            buf.refills -= 1
            data: bytes = orig_recv(READ_CHUNK)  # raises BlockingIOError / OSError as paho expects
            if not data:
                return data  # EOF: paho reports the lost connection
            buf.data, buf.pos = data, 0
        end = buf.pos + bufsize
        chunk = buf.data[buf.pos:end]
        buf.pos += len(chunk)
        return chunk

    def loop_read(max_packets: int = 1) -> Any:
        buf.refills = 1
        rc = orig_loop_read(max_packets)
        while int(rc) == 0 and buf.pending() > 0 and buf.sock is paho._sock and paho._sock is not None:
            rc = orig_loop_read(max_packets)
        return rc

    paho._sock_recv = sock_recv
    paho.loop_read = loop_read

