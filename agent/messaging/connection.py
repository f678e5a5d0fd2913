"""One MQTT 3.1.1 connection to the local broker as an asyncio protocol (no threads, no polling).

Why it is built this way:
- the transport reads whatever the socket has (up to 256 KiB) and the :class:`~wire.Decoder`
  splits it, instead of three small ``recv`` calls per packet; at most ``PACKETS_PER_TURN`` are
  handled per loop turn, so a redelivery flood after a restart cannot starve the acks (every
  stored-but-unacked message is a duplicate if the agent dies right then);
- writes made in one loop turn (e.g. the PUBACKs of one SQLite commit) leave in ONE ``send``;
- a message is acknowledged only when its owner calls :meth:`MqttConnection.ack` (after the commit),
  and only on the connection that received it; the broker's in-flight window is the back-pressure,
  and reading pauses if un-acknowledged messages ever pile up beyond ``max_unacked`` anyway;
- keepalive: PINGREQ when idle, and a broker that stops answering is dropped, not waited on.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import time
from collections.abc import Callable, Sequence
from typing import Any

from agent.errors import AgentError
from agent.messaging import wire

OnPublish = Callable[[wire.Publish], None]
PACKETS_PER_TURN = 64


class MqttError(AgentError):
    """The local MQTT link failed; the message says how (refused, lost, timed out)."""

    code = "mqtt_error"


class ConnectRefused(MqttError):
    code = "mqtt_connect_refused"


class ConnectionLost(MqttError):
    code = "mqtt_connection_lost"


class SubscribeRefused(MqttError):
    code = "mqtt_subscribe_refused"


class MqttConnection(asyncio.Protocol):
    """The protocol object; build it with :func:`open_connection`."""

    def __init__(self, on_publish: OnPublish, *, keepalive_s: int, max_unacked: int = 10_000,
                 max_packet: int = 16 * 1024 * 1024) -> None:
        self._on_publish = on_publish
        self._keepalive_s = keepalive_s
        self._max_unacked = max_unacked
        self._decoder = wire.Decoder(max_packet)
        self._loop = asyncio.get_running_loop()
        self._transport: asyncio.Transport | None = None
        self._out = bytearray()
        self._flush_scheduled = False
        self._paused = False
        self._ack_wait = False
        self._more_scheduled = False
        self._next_id = 0
        self._waiting: dict[int, asyncio.Future[Any]] = {}  # our packet id → PUBACK / SUBACK
        self._unacked = 0
        self._last_sent = time.monotonic()
        self._ping_sent: float | None = None
        self._keepalive_timer: asyncio.TimerHandle | None = None
        self.connack: asyncio.Future[bool] = self._loop.create_future()  # → session present
        self.closed: asyncio.Future[None] = self._loop.create_future()  # → the reason, as an exception
        self.host = ""

    # ---- asyncio.Protocol ---------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self._transport = transport
        sock = transport.get_extra_info("socket")
        if sock is not None and sock.family in (socket.AF_INET, socket.AF_INET6):
            # Nagle + delayed ACK held small QoS 1 packets (PUBACKs, actuations) for tens of ms
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def data_received(self, data: bytes) -> None:
        self._decoder.feed(data)
        self._process()

    def _process(self) -> None:
        """Handle a bounded number of packets; if more are buffered, stop reading the socket and
        continue in a later loop turn, behind whatever is ready (commits, acks, actuations)."""
        self._more_scheduled = False
        if self.closed.done():  # dropped meanwhile: what is still buffered comes again on the next link
            return
        try:
            packets = self._decoder.packets(PACKETS_PER_TURN)
            for packet in packets:
                if isinstance(packet, wire.Publish):
                    if packet.qos:
                        self._unacked += 1
                    self._on_publish(packet)
                else:
                    self._control(*packet)
        except wire.ProtocolViolation as exc:
            self._fail(exc)
            return
        except Exception as exc:  # a bug here must drop the link (and redeliver), never stall it
            self._fail(MqttError(f"handling a packet from the local broker failed: {type(exc).__name__}: {exc}"))
            return
        if len(packets) == PACKETS_PER_TURN and self._transport is not None:
            self._more_scheduled = True
            self._loop.call_soon(self._process)
        self._pace()

    def _pace(self) -> None:
        """Pause socket reads while buffered packets wait or too many messages wait for their ack."""
        transport = self._transport
        if transport is None:
            return
        if self._unacked > self._max_unacked:
            self._ack_wait = True
        elif self._unacked <= self._max_unacked // 2:
            self._ack_wait = False
        pause = self._ack_wait or self._more_scheduled
        if pause != self._paused:
            self._paused = pause
            if pause:
                transport.pause_reading()
            else:
                transport.resume_reading()

    def connection_lost(self, exc: Exception | None) -> None:
        self._transport = None
        reason = ConnectionLost(f"the local broker closed the connection ({exc or 'end of stream'})")
        self._fail(reason)

    # ---- API ----------------------------------------------------------------------------------

    @property
    def is_open(self) -> bool:
        return self._transport is not None and not self.closed.done()

    @property
    def unacked(self) -> int:
        return self._unacked

    def ack(self, packet_id: int) -> bool:
        """PUBACK a QoS 1 message this connection delivered; False if the connection is gone."""
        if not self.is_open:
            return False
        self._unacked -= 1
        self._send(wire.puback_packet(packet_id))
        if self._ack_wait:
            self._pace()
        return True

    async def publish(self, topic: str, payload: bytes, *, qos: int, retain: bool, timeout_s: float) -> None:
        """Send a message; at QoS 1 wait for the broker's PUBACK (``MqttError`` otherwise)."""
        if qos not in (0, 1):
            raise ValueError(f"the local bus publishes at QoS 0 or 1 (got {qos})")
        if not self.is_open:
            raise ConnectionLost("the local broker connection is closed")
        if qos == 0:
            self._send(wire.publish_packet(topic, payload, qos=0, retain=retain))
            return
        packet_id, done = self._expect()
        try:
            packet = wire.publish_packet(topic, payload, qos=1, retain=retain, packet_id=packet_id)
        except ValueError:
            self._waiting.pop(packet_id, None)  # never sent: the id is free again
            raise
        self._send(packet)
        await self._wait(packet_id, done, timeout_s, f"PUBACK for '{topic}'")

    async def subscribe(self, filters: Sequence[tuple[str, int]], *, timeout_s: float) -> list[int]:
        """Subscribe and return the granted QoS per filter; a refused filter raises ``SubscribeRefused``."""
        if not self.is_open:
            raise ConnectionLost("the local broker connection is closed")
        packet_id, done = self._expect()
        self._send(wire.subscribe_packet(packet_id, filters))
        codes: list[int] = await self._wait(packet_id, done, timeout_s, "SUBACK")
        if len(codes) != len(filters):
            raise SubscribeRefused(f"the local broker answered {len(codes)} codes for {len(filters)} filters")
        refused = [f for (f, _), c in zip(filters, codes, strict=True) if c == 0x80]
        if refused:
            raise SubscribeRefused(f"the local broker refused the subscription to {', '.join(refused)} "
                                   "(check its ACL for this client id / user)")
        return codes

    async def unsubscribe(self, filters: Sequence[str], *, timeout_s: float) -> None:
        """Drop subscriptions the persistent session still holds (e.g. removed from the config)."""
        if not self.is_open:
            raise ConnectionLost("the local broker connection is closed")
        packet_id, done = self._expect()
        self._send(wire.unsubscribe_packet(packet_id, filters))
        await self._wait(packet_id, done, timeout_s, "UNSUBACK")

    def close(self) -> None:
        """Polite DISCONNECT (the session stays on the broker), then close the socket."""
        transport = self._transport
        if transport is not None and not transport.is_closing():
            self._out += wire.DISCONNECT_PACKET
            self._flush()
            transport.close()
        self._transport = None
        self._fail(ConnectionLost("the connection was closed by the agent"))

    # ---- internals ----------------------------------------------------------------------------

    def _send(self, packet: bytes) -> None:
        self._out += packet
        self._last_sent = time.monotonic()
        if not self._flush_scheduled:
            self._flush_scheduled = True
            self._loop.call_soon(self._flush)

    def _flush(self) -> None:
        self._flush_scheduled = False
        if self._out and self._transport is not None and not self._transport.is_closing():
            self._transport.write(bytes(self._out))
        self._out.clear()

    def _expect(self) -> tuple[int, asyncio.Future[Any]]:
        if len(self._waiting) >= 0xFFFF:
            raise MqttError("65535 publishes are already waiting for the local broker")
        while True:
            self._next_id = self._next_id % 0xFFFF + 1
            if self._next_id not in self._waiting:
                done: asyncio.Future[Any] = self._loop.create_future()
                self._waiting[self._next_id] = done
                return self._next_id, done

    async def _wait(self, packet_id: int, done: asyncio.Future[Any], timeout_s: float, what: str) -> Any:
        try:
            async with asyncio.timeout(timeout_s):
                return await done
        except TimeoutError:
            raise MqttError(f"no {what} from the local broker within {timeout_s:g} s") from None
        finally:
            self._waiting.pop(packet_id, None)

    def _control(self, kind: int, flags: int, body: bytes) -> None:
        if kind in (wire.PUBACK, wire.UNSUBACK):
            waiter = self._waiting.get(wire.packet_id_of(kind, body))
            if waiter is not None and not waiter.done():
                waiter.set_result(None)
        elif kind == wire.SUBACK:
            waiter = self._waiting.get(wire.packet_id_of(kind, body))
            if waiter is not None and not waiter.done():
                waiter.set_result(list(body[2:]))
        elif kind == wire.PINGRESP:
            self._ping_sent = None
        elif kind == wire.CONNACK:
            self._connack(body)
        else:
            raise wire.ProtocolViolation(f"the broker sent an unexpected MQTT packet of type {kind}")

    def _connack(self, body: bytes) -> None:
        if len(body) != 2 or self.connack.done():
            raise wire.ProtocolViolation("the broker sent a malformed or second CONNACK")
        if body[1]:
            why = wire.CONNACK_REASONS.get(body[1], f"return code {body[1]}")
            self._fail(ConnectRefused(f"the local broker {self.host} refused the connection: {why}"))
            return
        self.connack.set_result(bool(body[0] & 0x01))
        self._arm_keepalive()

    def _arm_keepalive(self) -> None:
        if self._keepalive_s > 0 and self.is_open:
            self._keepalive_timer = self._loop.call_later(self._keepalive_s / 2, self._keepalive)

    def _keepalive(self) -> None:
        now = time.monotonic()
        if self._ping_sent is not None and now - self._ping_sent > self._keepalive_s:
            self._fail(ConnectionLost(f"the local broker did not answer a ping within {self._keepalive_s} s"))
            return
        if self._ping_sent is None and now - self._last_sent >= self._keepalive_s / 2:
            self._ping_sent = now
            self._send(wire.PINGREQ_PACKET)
        self._arm_keepalive()

    def _fail(self, exc: AgentError) -> None:
        """Settle everything that waits on this connection with ``exc``; close the socket."""
        if self._keepalive_timer is not None:
            self._keepalive_timer.cancel()
        for fut in (self.connack, self.closed):
            if not fut.done():
                fut.set_exception(exc)
        # nobody may be awaiting these two; retrieve the exception so asyncio does not warn
        for fut in (self.connack, self.closed):
            with contextlib.suppress(BaseException):
                fut.exception()
        waiting, self._waiting = self._waiting, {}
        for waiter in waiting.values():
            if not waiter.done():
                waiter.set_exception(exc)
        if self._transport is not None:
            self._transport.abort()
            self._transport = None


async def open_connection(host: str, port: int, on_publish: OnPublish, *, client_id: str,
                          clean_session: bool, keepalive_s: int, username: str = "", password: str = "",
                          timeout_s: float = 10.0) -> tuple[MqttConnection, bool]:
    """Connect and complete the MQTT handshake; returns the connection and "session present".

    ``on_publish`` may be called right after CONNACK (a persistent session's queued messages
    arrive at once), so whatever it needs must exist before this is called.
    """
    loop = asyncio.get_running_loop()
    try:
        async with asyncio.timeout(timeout_s):
            _, conn = await loop.create_connection(
                lambda: MqttConnection(on_publish, keepalive_s=keepalive_s), host, port)
    except TimeoutError:
        raise MqttError(f"the local broker {host}:{port} did not accept a TCP connection within "
                        f"{timeout_s:g} s") from None
    except OSError as exc:
        raise MqttError(f"cannot reach the local broker {host}:{port}: {exc.strerror or exc}") from exc
    conn.host = f"{host}:{port}"
    conn._send(wire.connect_packet(  # noqa: SLF001 - the handshake is the connection's own first packet
        client_id, clean_session=clean_session, keepalive_s=keepalive_s, username=username, password=password))
    try:
        async with asyncio.timeout(timeout_s):
            session_present = await conn.connack
    except TimeoutError:
        conn.close()
        raise MqttError(f"the local broker {host}:{port} did not answer CONNECT within {timeout_s:g} s") from None
    except BaseException:
        conn.close()
        raise
    return conn, session_present
