"""MQTT 3.1.1 packets for the local bus: encoders and an incremental decoder (OASIS MQTT 3.1.1, §2–3).

Why the agent speaks the wire itself on this one link: every sensor reading and every actuation
crosses it, and a general-purpose client (paho under aiomqtt) spent half the event loop on 1-byte
header reads and one ``send`` per PUBACK. Only what a persistent QoS ≤ 1 subscriber and publisher
needs is here: CONNECT/CONNACK, PUBLISH/PUBACK, (UN)SUBSCRIBE/(UN)SUBACK, PINGREQ/PINGRESP, DISCONNECT.
Everything the broker sends is checked; anything else is a :class:`ProtocolViolation`.
"""

from __future__ import annotations

import struct
from collections.abc import Sequence
from dataclasses import dataclass

from agent.errors import AgentError

CONNECT, CONNACK, PUBLISH, PUBACK, PUBREC, PUBREL, PUBCOMP = 1, 2, 3, 4, 5, 6, 7
SUBSCRIBE, SUBACK, UNSUBSCRIBE, UNSUBACK, PINGREQ, PINGRESP, DISCONNECT = 8, 9, 10, 11, 12, 13, 14

PINGREQ_PACKET = b"\xc0\x00"
DISCONNECT_PACKET = b"\xe0\x00"
MAX_REMAINING = 268_435_455  # §2.2.3: four length bytes
KEEP_OF_OVERSIZE = 1024  # bytes of an oversize payload kept so the reject row shows what it was

CONNACK_REASONS = {
    1: "it does not support MQTT 3.1.1",
    2: "it rejected the client id",
    3: "the MQTT service is unavailable",
    4: "it refused the user name or password",
    5: "this client is not authorised to connect",
}

_PUBACK = struct.Struct(">BBH")
_U16 = struct.Struct(">H")


class ProtocolViolation(AgentError):
    """The broker sent bytes that are not valid MQTT 3.1.1 for this session: the link is dropped."""

    code = "mqtt_protocol_violation"


@dataclass(slots=True)
class Publish:
    """One PUBLISH from the broker. ``size`` is the payload's real length; when it exceeds the
    decoder's limit only the first bytes are kept (``truncated``) and the rest was skipped unbuffered."""

    topic: str
    payload: bytes
    qos: int
    retain: bool
    dup: bool
    packet_id: int
    size: int

    @property
    def truncated(self) -> bool:
        return self.size > len(self.payload)


# ---- encoders ------------------------------------------------------------------------------------

def _length(n: int) -> bytes:
    out = bytearray()
    while True:
        n, digit = divmod(n, 128)
        out.append(digit | (0x80 if n else 0))
        if not n:
            return bytes(out)


def _string(s: str | bytes) -> bytes:
    raw = s.encode() if isinstance(s, str) else s
    if len(raw) > 0xFFFF:
        raise ValueError(f"MQTT strings are limited to 65535 bytes (got {len(raw)})")
    return _U16.pack(len(raw)) + raw


def _packet(first: int, body: bytes) -> bytes:
    if len(body) > MAX_REMAINING:
        raise ValueError(f"MQTT packets are limited to {MAX_REMAINING} bytes (got {len(body)})")
    return bytes((first,)) + _length(len(body)) + body


def connect_packet(client_id: str, *, clean_session: bool, keepalive_s: int,
                   username: str = "", password: str = "") -> bytes:
    """CONNECT (§3.1) for protocol level 4; no will (the local bus announces nothing on death)."""
    if not 0 <= keepalive_s <= 0xFFFF:
        raise ValueError(f"keepalive must be 0..65535 s (got {keepalive_s})")
    flags = (0x02 if clean_session else 0) | (0x80 if username else 0) | (0x40 if password else 0)
    if password and not username:
        raise ValueError("an MQTT password needs a user name (MQTT 3.1.1 §3.1.2.9)")
    body = _string("MQTT") + bytes((4, flags)) + _U16.pack(keepalive_s) + _string(client_id)
    if username:
        body += _string(username)
    if password:
        body += _string(password)
    return _packet(CONNECT << 4, body)


def publish_packet(topic: str, payload: bytes, *, qos: int, retain: bool, packet_id: int = 0,
                   dup: bool = False) -> bytes:
    """PUBLISH (§3.3) at QoS 0 or 1 (the local bus never publishes QoS 2)."""
    if qos not in (0, 1):
        raise ValueError(f"the local bus publishes at QoS 0 or 1 (got {qos})")
    if not topic or "+" in topic or "#" in topic or "\0" in topic:
        raise ValueError(f"'{topic}' is not a valid topic to publish to")
    first = (PUBLISH << 4) | (0x08 if dup else 0) | (qos << 1) | (0x01 if retain else 0)
    body = _string(topic) + (_U16.pack(packet_id) if qos else b"") + payload
    return _packet(first, body)


def puback_packet(packet_id: int) -> bytes:
    return _PUBACK.pack(PUBACK << 4, 2, packet_id)


def unsubscribe_packet(packet_id: int, filters: Sequence[str]) -> bytes:
    """UNSUBSCRIBE (§3.10); the fixed-header flags must be 0b0010."""
    if not filters:
        raise ValueError("UNSUBSCRIBE needs at least one topic filter")
    return _packet((UNSUBSCRIBE << 4) | 0x02, _U16.pack(packet_id) + b"".join(_string(f) for f in filters))


def subscribe_packet(packet_id: int, filters: Sequence[tuple[str, int]]) -> bytes:
    """SUBSCRIBE (§3.8); the fixed-header flags must be 0b0010."""
    if not filters:
        raise ValueError("SUBSCRIBE needs at least one topic filter")
    body = _U16.pack(packet_id) + b"".join(_string(f) + bytes((q,)) for f, q in filters)
    return _packet((SUBSCRIBE << 4) | 0x02, body)


# ---- decoder -------------------------------------------------------------------------------------

class Decoder:
    """Splits the byte stream from the broker into packets; keeps a partial packet for the next read.

    ``packets`` gives ``(type, flags, body)`` for control packets and :class:`Publish` for messages,
    a bounded number per call so that one big read cannot hold the event loop (and the PUBACKs of
    the commits that finish meanwhile) for long.
    A PUBLISH larger than ``max_packet`` is not buffered: its head is kept, the rest is skipped as
    it streams in, and it is delivered truncated (so a huge message cannot exhaust memory, and it is
    still acknowledged and recorded instead of being redelivered forever).
    """

    def __init__(self, max_packet: int = 16 * 1024 * 1024) -> None:
        self.max_packet = max_packet
        self._buf = bytearray()
        self._skip = 0  # bytes of an oversize PUBLISH still to discard
        self._pending: Publish | None = None  # that PUBLISH, delivered once it is skipped

    def feed(self, data: bytes) -> None:
        """Take bytes read from the socket (parsed later, by :meth:`packets`)."""
        self._buf += data

    def packets(self, limit: int) -> list[Publish | tuple[int, int, bytes]]:
        """Up to ``limit`` complete packets from what was fed; the rest stays for the next call."""
        out: list[Publish | tuple[int, int, bytes]] = []
        buf = self._buf
        pos = 0
        end = len(buf)
        try:
            while len(out) < limit:
                if self._pending is not None:
                    take = min(self._skip, end - pos)
                    self._skip -= take
                    pos += take
                    if self._skip:
                        break  # the whole read was oversize payload
                    out.append(self._pending)
                    self._pending = None
                    continue
                if pos >= end:
                    break
                header = self._header(buf, pos, end)
                if header is None:
                    break
                first, start, length = header
                kind = first >> 4
                if length > self.max_packet:
                    if kind != PUBLISH:
                        raise ProtocolViolation(
                            f"the broker sent a {length}-byte control packet (type {kind}); "
                            "MQTT control packets are a few bytes")
                    need = self._head_needed(buf, start, end, length)
                    if need is None:
                        break
                    self._pending = decode_publish(first & 0x0F, bytes(buf[start:start + need]), length,
                                                   partial=True)
                    self._skip = length - need
                    pos = start + need
                    continue
                if start + length > end:
                    break
                body = bytes(buf[start:start + length])
                pos = start + length
                out.append(decode_publish(first & 0x0F, body, length) if kind == PUBLISH
                           else (kind, first & 0x0F, body))
        finally:
            del buf[:pos]
        return out

    @staticmethod
    def _header(buf: bytearray, pos: int, end: int) -> tuple[int, int, int] | None:
        """(first byte, body start, remaining length) or None when the header is incomplete."""
        first = buf[pos]
        length = 0
        shift = 0
        i = pos + 1
        while True:
            if i >= end:
                return None
            byte = buf[i]
            length |= (byte & 0x7F) << shift
            i += 1
            if not byte & 0x80:
                return first, i, length
            shift += 7
            if shift > 21:
                raise ProtocolViolation("the broker sent a packet length longer than four bytes (§2.2.3)")

    @staticmethod
    def _head_needed(buf: bytearray, start: int, end: int, length: int) -> int | None:
        """Bytes of an oversize PUBLISH to hold before skipping (topic, packet id, some payload);
        None until they are all here."""
        if end - start < 2:
            return None
        need = min(length, 2 + _U16.unpack_from(buf, start)[0] + 2 + KEEP_OF_OVERSIZE)
        return need if end - start >= need else None


def decode_publish(flags: int, body: bytes, length: int, *, partial: bool = False) -> Publish:
    """A PUBLISH body (§3.3.2–3.3.3) from the broker; QoS 2 is refused (the bus subscribes at ≤ 1)."""
    qos = (flags >> 1) & 0x03
    if qos > 1:
        raise ProtocolViolation(f"the broker sent a QoS {qos} message although the bus subscribed at QoS ≤ 1")
    if len(body) < 2:
        raise ProtocolViolation("the broker sent a PUBLISH without a topic")
    topic_len = _U16.unpack_from(body, 0)[0]
    at = 2 + topic_len
    if at + (2 if qos else 0) > len(body):
        raise ProtocolViolation("the broker sent a PUBLISH shorter than its topic")
    try:
        topic = body[2:at].decode()
    except UnicodeDecodeError as exc:
        raise ProtocolViolation("the broker sent a topic that is not UTF-8") from exc
    packet_id = 0
    if qos:
        packet_id = _U16.unpack_from(body, at)[0]
        at += 2
        if packet_id == 0:
            raise ProtocolViolation("the broker sent a QoS 1 message with packet id 0")
    payload = body[at:]
    size = length - at if partial else len(payload)
    return Publish(topic, payload, qos, bool(flags & 0x01), bool(flags & 0x08), packet_id, size)


def packet_id_of(kind: int, body: bytes) -> int:
    """The packet id of a PUBACK/SUBACK-like packet, checked for length."""
    if len(body) < 2:
        raise ProtocolViolation(f"the broker sent a type-{kind} packet without a packet id")
    return int(_U16.unpack_from(body, 0)[0])
